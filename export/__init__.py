"""HF checkpoint -> ONNX artifacts (needs the `export` extra: torch, transformers, onnx)."""
