"""Patch point: TensorRT-LLM's Gemma 3 VLM takes image embeddings from our TensorRT vision engine.

Why a patch: in TensorRT-LLM (every stored version read, 1.0 through 2026's main, so 1.2.1 too;
docs/gpu.md),
`Gemma3InputProcessor` subclasses the plain `InputProcessor` and implements no
`attach_multimodal_embeddings`, the hook the LLM API calls for `multi_modal_embeddings` prompts
(llama4, llava-next and others implement it; Gemma 3 does not), and `Gemma3VLM.forward` only reads
`multimodal_data["image"]["pixel_values"]`, running its own SigLIP tower on them. (Its own processor
also builds those pixels on CUDA, so its prompts travel as CUDA IPC handles: see below.)

What the patch does, and no more:
- an input processor subclass whose attach_multimodal_embeddings takes our token ids (already
  templated and expanded by preprocessing) and our embeddings, and hands the embeddings on in the
  slot the model reads (`pixel_values`), in host memory: the LLM API turns that slot into a
  shared-tensor handle, CUDA IPC for a GPU tensor, and CUDA cannot open an IPC handle in the process
  that exported it, which is where the single-process executor runs;
- a Gemma3VLM subclass whose `_get_image_features` moves [images, mm_tokens, hidden] tensors to the
  GPU and returns them as they are (already through the projector), and runs the original tower for
  4-D pixel tensors.
Everything else (embedding fusion at image-token positions, the bidirectional image mask, sliding
windows) is TensorRT-LLM's own code path. Both are registered under the same architecture name, so
the executor builds our subclass; that must happen in this process (pins.SINGLE_PROCESS_WORKER_ENV).
The patch refuses to install on a TensorRT-LLM version it was not written for
(pins.check_tensorrt_llm_version).
"""

from __future__ import annotations

from medgemma_triton.gpu import pins

_installed = False


def attach_embeddings(input_ids, images, image_token: int):
    """attach_multimodal_embeddings' result for our prompt: (token ids, extra inputs with the embeddings).

    `input_ids` is a 1-D tensor of the templated, expanded prompt; `images` a list of [n, mm_tokens,
    hidden] tensors. The embeddings stay in host memory (bf16, the model's dtype); see the module docstring.
    """
    import torch

    embeddings = torch.cat([torch.as_tensor(image) for image in images], dim=0)
    if embeddings.dim() != 3:
        raise ValueError(f"image embeddings must be [images, tokens, hidden], got {tuple(embeddings.shape)}")
    image_tokens = int((input_ids == image_token).sum())
    if image_tokens != embeddings.shape[0] * embeddings.shape[1]:
        raise ValueError(f"{image_tokens} image tokens for {embeddings.shape[0] * embeddings.shape[1]} embeddings")
    embeddings = embeddings.to(device="cpu", dtype=torch.bfloat16).contiguous()
    # The model reads this slot; _get_image_features below tells embeddings (3-D) from pixels (4-D).
    return input_ids.to(torch.int32).tolist(), {"multimodal_data": {"image": {"pixel_values": embeddings}}}


def install() -> None:
    global _installed
    if _installed:
        return
    import tensorrt_llm

    # Before any TensorRT-LLM internals are imported: their names are what an unread release may move.
    pins.check_tensorrt_llm_version(tensorrt_llm.__version__)
    from tensorrt_llm._torch.models import modeling_gemma3vl as gemma3vl
    from tensorrt_llm._torch.models.modeling_utils import register_auto_model
    from tensorrt_llm.inputs import (
        MultimodalPlaceholderMetadata,
        MultimodalPlaceholderPlacement,
        register_input_processor,
    )

    for owner, name in ((gemma3vl.Gemma3VLM, "_get_image_features"), (gemma3vl, "Gemma3InputProcessor")):
        if not hasattr(owner, name):
            raise RuntimeError(f"TensorRT-LLM {tensorrt_llm.__version__} has no {name} in modeling_gemma3vl")

    class Gemma3EmbeddingsInputProcessor(gemma3vl.Gemma3InputProcessor):
        def attach_multimodal_embeddings(self, inputs, multimodal_embedding, sampling_params):
            (input_ids,) = multimodal_embedding["input_ids"]
            return attach_embeddings(input_ids, multimodal_embedding["image"], self.model_config.image_token_index)

    @register_auto_model("Gemma3ForConditionalGeneration")
    @register_input_processor(
        Gemma3EmbeddingsInputProcessor,
        model_type="gemma3",
        placeholder_metadata=MultimodalPlaceholderMetadata(
            placeholder_map={"image": "<start_of_image>"},
            placeholder_placement=MultimodalPlaceholderPlacement.BEFORE_TEXT,
        ),
    )
    class Gemma3VLMWithImageEmbeddings(gemma3vl.Gemma3VLM):
        def _get_image_features(self, pixel_values):
            if pixel_values.dim() == 3:  # [images, mm_tokens, hidden] from our vision engine, maybe on the host
                return pixel_values.reshape(-1, pixel_values.shape[-1]).to(device="cuda", dtype=self.model_dtype)
            return super()._get_image_features(pixel_values)

    _installed = True
