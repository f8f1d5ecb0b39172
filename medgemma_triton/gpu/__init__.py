"""The `gpu` profile: TensorRT vision engine + TensorRT-LLM (PyTorch backend) decoder behind the same `medgemma` model and contract.

Everything here imports without tensorrt, tensorrt_llm or modelopt: those are imported inside the
functions that need them, which run inside NVIDIA's Triton TensorRT-LLM container (see pins.py and
docs/gpu.md). The pure parts (engine plans, quantization recipes, LLM API arguments, configs) are
tested on machines without a GPU.
"""
