"""Benchmarks of a served medgemma deployment: load generation, metrics, capacity plan, reports.

`benchmarks/throughput.py` and `benchmarks/latency.py` are thin entry points over this package;
the metric definitions (metrics.py) follow NVIDIA's genai-perf / AIPerf so numbers compare.
"""
