"""The versions the gpu profile is written against, and the TensorRT-LLM API surface it relies on.

TensorRT-LLM cannot be installed on our CI machines (its wheels live on NVIDIA's index), so the
field names of the LLM API objects we construct are recorded here as data, captured by reading the
source; tests check that every argument we pass is one of them. docs/gpu.md ("Sources read for
TensorRT-LLM 1.2.1") says which file versions were read and how they relate to the v1.2.1 tag.
"""

from __future__ import annotations

# NVIDIA's Triton TensorRT-LLM container, release 26.07 (Triton 2.71; server issue #8945).
CONTAINER_TAG = "nvcr.io/nvidia/tritonserver:26.07-trtllm-python-py3"
CONTAINER_VERSIONS = {
    "triton": "2.71",
    "python": "3.12",  # tensorrtllm_backend's Dockerfile @ 8addf2f installs python3.12
    "tensorrt_llm": "1.2.1",  # built from branch release/1.2.1 (tensorrtllm_backend @ 8addf2f)
    "tensorrt": "10.14",  # tensorrtllm_backend's Dockerfile @ 8addf2f builds 10.14.1.48
    "cuda": "13.1",  # server issue #8945; the driver floor for it was not read
}
# TensorRT-LLM releases the patch point and the settings (trtllm_gemma3.py, llm_engine.py) were checked
# against; docs/gpu.md says which source versions that covered. Any other release is refused, by the
# build and at model load: check_tensorrt_llm_version.
TENSORRT_LLM_READ = ("1.2.1",)
# TensorRT-LLM's requirements.txt pins nvidia-modelopt[torch]~=0.37.0 from 1.1 through the 1.3 line.
MODELOPT_VERSION = "0.37.0"
# ModelOpt with list-shaped presets, which the tests and benchmarks/studies/gpu_check.py also run against: what
# `pip install --no-deps --target DIR` needs beside this environment's torch and transformers.
MODELOPT_LIST_SHAPE = ("nvidia-modelopt==0.47.0", "omegaconf==2.4.0", "antlr4-python3-runtime==4.9.3")


class UnsupportedTensorRTLLM(RuntimeError):
    """The installed TensorRT-LLM is not a release this package's gpu profile was written against."""


def check_tensorrt_llm_version(version: str) -> None:
    """Refuse a TensorRT-LLM whose source we have not read (release candidates and post releases too).

    A local build label (`1.2.1+nv26.07`) is accepted: it is the same release.
    """
    from packaging.version import InvalidVersion, Version  # ships with pip and TensorRT-LLM

    try:
        parsed = Version(version)
    except InvalidVersion:
        parsed = None
    if parsed is None or parsed.public not in TENSORRT_LLM_READ:
        raise UnsupportedTensorRTLLM(
            f"TensorRT-LLM {version} is installed; the gpu profile was written against "
            f"{', '.join(TENSORRT_LLM_READ)} ({CONTAINER_TAG}). Run it in that container, or re-read the "
            "upstream files listed in docs/gpu.md (\"Sources read for TensorRT-LLM 1.2.1\") at the new "
            "release, then add it to medgemma_triton.gpu.pins.TENSORRT_LLM_READ"
        )

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
    "checkpoint_format", "kv_connector_config", "mm_encoder_only", "disable_flashinfer_sampling",
})
# TorchLlmArgs.attn_backend is a free string; these are the backends the PyTorch flow implements.
ATTENTION_BACKENDS = frozenset({"TRTLLM", "FLASHINFER", "FLASHINFER_STAR_ATTENTION", "VANILLA"})
# TorchLlmArgs.sampler_type: a SamplerType or its name; "auto" is TorchSampler unless beam search is asked for.
SAMPLER_TYPES = frozenset({"TRTLLMSampler", "TorchSampler", "auto"})

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
