"""The versions the gpu profile is written against, and the TensorRT-LLM API surface it relies on.

TensorRT-LLM cannot be installed on our CI machines (its wheels live on NVIDIA's index), so the
field names of the LLM API objects we construct are recorded here as data, captured by reading the
source; tests check that every argument we pass is one of them. Where the source we could read is
not the exact release in the container, the version line below says so.
"""

from __future__ import annotations

# nvcr.io's compatibility matrix for the trtllm-python-py3 container, release 25.12.
CONTAINER_TAG = "nvcr.io/nvidia/tritonserver:25.12-trtllm-python-py3"
CONTAINER_VERSIONS = {
    "python": "3.12.3",
    "torch": "2.9.0a0+145a3a7bda.nv25.10",
    "tensorrt": "10.13.3.9",
    "tensorrt_llm": "1.1.0",
    "cuda": "13.0.2.006",
    "min_driver": "580.95.05",
}
# The vision engine is built weakly typed (BuilderFlag.BF16/FP16 with per-layer fp32 pins, trt_vision.py):
# deprecated since TensorRT 10.12 and removed in 11 (TensorRT's 10.12.0 release notes and its 10.x -> 11.x
# migration guide), so trt_vision refuses to build on another major version.
TENSORRT_MAJOR = 10
# TensorRT-LLM 1.1.0's requirements.txt pins nvidia-modelopt[torch]~=0.37.0.
MODELOPT_VERSION = "0.37.0"

# Source read for the records below (github.com/NVIDIA/TensorRT-LLM, files by path).
SOURCES = {
    "llm_args": (
        "tensorrt_llm/llmapi/llm_args.py, stored version of the 1.1 line (has TorchLlmArgs."
        "mm_encoder_only, ray_worker_extension_cls, Rocket/DeepSeek sparse attention configs); "
        "fields re-checked against the newest stored version, commit 0004396720054fd8e205cbf616f21f0b57c6b412"
    ),
    "sampling_params": "tensorrt_llm/sampling_params.py @ 000a01de66f0eab4ab05640711f0253f50f5209c (version.py: 1.0.0rc4)",
    "gemma3vl": "tensorrt_llm/_torch/models/modeling_gemma3vl.py @ a98a9061d72f6fd39f5d055ebdd2c6878a100e2c "
    "and 0f8dcd9da6467635df7067b2c230811a617f4793",
    "gemma3": "tensorrt_llm/_torch/models/modeling_gemma3.py @ 00e7d1037d247c72af2da216998cd7cf9e846461",
    "generation_result": "tensorrt_llm/executor/result.py (GenerationResult.abort -> executor.abort_request)",
}

# TorchLlmArgs = BaseLlmArgs fields + PyTorch-backend fields (the subset we may pass; not exhaustive).
TORCH_LLM_ARGS_FIELDS = frozenset({
    # BaseLlmArgs
    "model", "tokenizer", "tokenizer_mode", "skip_tokenizer_init", "trust_remote_code",
    "tensor_parallel_size", "dtype", "revision", "tokenizer_revision", "pipeline_parallel_size",
    "context_parallel_size", "gpus_per_node", "enable_attention_dp", "load_format",
    "enable_lora", "lora_config", "kv_cache_config", "enable_chunked_prefill",
    "guided_decoding_backend", "iter_stats_max_iterations", "request_stats_max_iterations",
    "peft_cache_config", "scheduler_config", "cache_transceiver_config", "speculative_config",
    "max_batch_size", "max_input_len", "max_seq_len", "max_beam_width", "max_num_tokens",
    "gather_generation_logits", "num_postprocess_workers", "postprocess_tokenizer_dir",
    "reasoning_parser", "backend", "return_perf_metrics", "orchestrator_type",
    # TorchLlmArgs
    "build_config", "garbage_collection_gen0_threshold", "cuda_graph_config", "attention_dp_config",
    "disable_overlap_scheduler", "moe_config", "attn_backend", "sampler_type",
    "enable_iter_perf_stats", "enable_iter_req_stats", "print_iter_log", "perf_metrics_max_requests",
    "batch_wait_timeout_ms", "batch_wait_timeout_iters", "batch_wait_max_tokens_ratio",
    "torch_compile_config", "enable_autotuner", "enable_layerwise_nvtx_marker", "enable_min_latency",
    "stream_interval", "force_dynamic_quantization", "allreduce_strategy", "checkpoint_loader",
    "checkpoint_format", "kv_connector_config", "mm_encoder_only",
})
# TorchLlmArgs.attn_backend is a free string; these are the backends the PyTorch flow implements.
ATTENTION_BACKENDS = frozenset({"TRTLLM", "FLASHINFER", "FLASHINFER_STAR_ATTENTION", "VANILLA"})

KV_CACHE_CONFIG_FIELDS = frozenset({
    "enable_block_reuse", "max_tokens", "max_attention_window", "sink_token_length",
    "free_gpu_memory_fraction", "host_cache_size", "onboard_blocks", "cross_kv_cache_fraction",
    "secondary_offload_min_priority", "event_buffer_max_size", "attention_dp_events_gather_period_ms",
    "enable_partial_reuse", "copy_on_partial_reuse", "use_uvm", "max_gpu_total_bytes", "dtype",
    "mamba_ssm_cache_dtype", "tokens_per_block",
})

SAMPLING_PARAMS_FIELDS = frozenset({
    "end_id", "pad_id", "max_tokens", "bad", "bad_token_ids", "stop", "stop_token_ids",
    "include_stop_str_in_output", "embedding_bias", "logits_processor", "apply_batched_logits_processor",
    "n", "best_of", "use_beam_search", "top_k", "top_p", "top_p_min", "top_p_reset_ids", "top_p_decay",
    "seed", "temperature", "min_tokens", "beam_search_diversity_rate", "repetition_penalty",
    "presence_penalty", "frequency_penalty", "length_penalty", "early_stopping", "no_repeat_ngram_size",
    "min_p", "beam_width_array", "logprobs", "prompt_logprobs", "return_context_logits",
    "return_generation_logits", "exclude_input_from_output", "return_encoder_output",
    "return_perf_metrics", "additional_model_outputs", "lookahead_config", "guided_decoding",
    "ignore_eos", "detokenize", "add_special_tokens", "truncate_prompt_tokens", "skip_special_tokens",
    "spaces_between_special_tokens",
})

# LLM.generate_async keyword arguments we use (present from 0.20 through the newest source read).
GENERATE_ASYNC_PARAMS = frozenset({"inputs", "sampling_params", "streaming"})
# Keys of the prompt dict (tensorrt_llm.inputs.data.TextPrompt) the LLM API dispatches on.
TEXT_PROMPT_KEYS = frozenset({"prompt", "multi_modal_data", "multi_modal_embeddings", "mm_processor_kwargs", "query"})

# Environment variable that runs the executor worker in the calling process (no MPI proxy process);
# the embeddings patch (trtllm_gemma3.py) must be registered in the process that builds the model.
SINGLE_PROCESS_WORKER_ENV = "TLLM_WORKER_USE_SINGLE_PROCESS"
