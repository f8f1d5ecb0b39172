"""Running Triton on a model repository: `launcher` starts, watches and stops tritonserver (used by
`serve`, the tests and the benchmarks); `supervisor` is `medgemma-triton serve`'s loop."""
