"""The spec parser against transformers' own config classes, and its one-line errors."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from medgemma_triton.spec import CheckpointError, ModelSpec, medgemma_4b_config

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "processor_config.json",
    "preprocessor_config.json",
    "generation_config.json",
)


def _reference_matches(spec: ModelSpec, config) -> None:
    """Compare our spec with a transformers Gemma3Config (the reference parser)."""
    text = config.text_config
    assert spec.text.hidden_size == text.hidden_size
    assert spec.text.num_layers == text.num_hidden_layers
    assert spec.text.num_heads == text.num_attention_heads
    assert spec.text.num_kv_heads == text.num_key_value_heads
    assert spec.text.head_dim == text.head_dim
    assert spec.text.query_pre_attn_scalar == text.query_pre_attn_scalar
    assert spec.text.vocab_size == text.vocab_size
    assert spec.text.sliding_window == text.sliding_window
    assert list(spec.text.layer_types) == list(text.layer_types)
    assert spec.text.rms_norm_eps == pytest.approx(text.rms_norm_eps)
    rope = text.rope_parameters
    assert spec.text.rope_global.theta == rope["full_attention"]["rope_theta"]
    assert spec.text.rope_global.rope_type == rope["full_attention"]["rope_type"]
    assert spec.text.rope_global.factor == rope["full_attention"].get("factor", 1.0)
    assert spec.text.rope_local.theta == rope["sliding_attention"]["rope_theta"]
    assert spec.text.rope_local.rope_type == rope["sliding_attention"]["rope_type"]
    vision = config.vision_config
    assert spec.vision.image_size == vision.image_size
    assert spec.vision.patch_size == vision.patch_size
    assert spec.vision.hidden_size == vision.hidden_size
    assert spec.vision.num_layers == vision.num_hidden_layers
    assert spec.mm_tokens_per_image == config.mm_tokens_per_image
    assert spec.tokens.image == config.image_token_id
    assert spec.tokens.boi == config.boi_token_id
    assert spec.tokens.eoi == config.eoi_token_id


def test_spec_matches_transformers_for_dev_checkpoints(checkpoint):
    from transformers import AutoConfig, AutoProcessor

    spec = ModelSpec.from_checkpoint(checkpoint)
    _reference_matches(spec, AutoConfig.from_pretrained(checkpoint))
    processor = AutoProcessor.from_pretrained(checkpoint)
    image_processor = processor.image_processor
    assert (spec.image_processing.height, spec.image_processing.width) == (
        image_processor.size["height"],
        image_processor.size["width"],
    )
    assert spec.image_processing.resample == int(image_processor.resample)
    assert spec.image_processing.image_mean == tuple(image_processor.image_mean)
    assert spec.image_processing.image_std == tuple(image_processor.image_std)
    assert spec.image_sequence_text() == processor.full_image_sequence
    tokenizer = processor.tokenizer
    assert spec.tokens.image == tokenizer.image_token_id
    assert spec.tokens.boi == tokenizer.convert_tokens_to_ids(tokenizer.boi_token)
    assert spec.tokens.bos == tokenizer.bos_token_id
    assert spec.chat_template == tokenizer.chat_template


def test_spec_reads_the_published_4b_config_layout(tmp_path, tiny_checkpoint):
    from transformers import Gemma3Config

    published = medgemma_4b_config()  # google/medgemma-4b-it's config.json (transformers 4.50 layout)
    for name in TOKENIZER_FILES:
        shutil.copy(tiny_checkpoint / name, tmp_path / name)
    (tmp_path / "config.json").write_text(json.dumps(published))
    # the hub layout of Gemma 3 4B checkpoints: image settings in preprocessor_config.json, the token
    # count in processor_config.json (no nested image_processor)
    preprocessor = json.loads((tiny_checkpoint / "preprocessor_config.json").read_text())
    size = published["vision_config"]["image_size"]
    preprocessor["size"] = {"height": size, "width": size}
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(preprocessor))
    (tmp_path / "processor_config.json").write_text(
        json.dumps({"image_seq_length": published["mm_tokens_per_image"], "processor_class": "Gemma3Processor"}))
    (tmp_path / "model.safetensors").write_bytes(b"")  # presence only; the spec never reads weights
    spec = ModelSpec.from_checkpoint(tmp_path)
    assert spec.image_processing.height == 896
    _reference_matches(spec, Gemma3Config.from_dict(published))
    # The 4B geometry docs/design.md lists, as the spec derives it.
    assert spec.vision.patches_per_side == 64 and spec.vision.pool_kernel == 4
    assert spec.mm_tokens_per_image == 256 and spec.text.hidden_size == 2560
    assert spec.text.layer_types.count("full_attention") == 34 // 6
    assert spec.text.rope_global.factor == 8.0 and spec.text.rope_local.factor == 1.0
    assert spec.dtype == "bfloat16"


def test_tiny_checkpoint_exercises_every_trap(tiny_checkpoint):
    from safetensors.numpy import load_file

    spec = ModelSpec.from_checkpoint(tiny_checkpoint)
    kinds = set(spec.text.layer_types)
    assert kinds == {"sliding_attention", "full_attention"}
    assert spec.text.layer_types.count("sliding_attention") >= 2
    assert spec.text.sliding_window < 64  # shorter than the test prompts
    assert spec.mm_tokens_per_image < spec.text.sliding_window  # as in the 4B model (256 < 1024)
    assert spec.text.rope_global.rope_type == "linear" and spec.text.rope_global.factor > 1
    assert spec.text.rope_local.rope_type == "default"
    assert spec.text.query_pre_attn_scalar != spec.text.head_dim
    assert spec.text.vocab_size == 262_208 and spec.tokens.image == 262_144
    weights = load_file(str(tiny_checkpoint / "model.safetensors"))
    projector = weights["multi_modal_projector.mm_input_projection_weight"]
    assert abs(projector).max() > 0.01  # transformers zero-initialises it
    norms = [v for k, v in weights.items() if "language_model" in k and "norm" in k]
    assert norms and all(abs(v).max() > 0.01 for v in norms)


def test_serving_spec_import_does_not_pull_torch(tiny_checkpoint):
    code = (
        "import sys; from medgemma_triton.spec import ModelSpec; "
        f"ModelSpec.from_checkpoint({str(tiny_checkpoint)!r}); "
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def _copy_checkpoint(source: Path, target: Path) -> Path:
    target.mkdir()
    for name in TOKENIZER_FILES + ("config.json",):
        shutil.copy(source / name, target / name)
    (target / "model.safetensors").write_bytes(b"")
    return target


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda d: (d / "config.json").unlink(), "missing config.json"),
        (lambda d: (d / "tokenizer.json").unlink(), "missing tokenizer.json"),
        (lambda d: (d / "model.safetensors").unlink(), "no *.safetensors weights"),
        (lambda d: (d / "config.json").write_text("{not json"), "not valid JSON"),
        (
            lambda d: (d / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]})),
            "is not supported",
        ),
        (
            lambda d: (d / "preprocessor_config.json").unlink() or (d / "processor_config.json").unlink(),
            "no image processor settings",
        ),
    ],
    ids=["no-config", "no-tokenizer", "no-weights", "bad-json", "wrong-architecture", "no-processor"],
)
def test_bad_checkpoints_get_one_line_errors(tmp_path, tiny_checkpoint, damage, message):
    bad = _copy_checkpoint(tiny_checkpoint, tmp_path / "ckpt")
    damage(bad)
    with pytest.raises(CheckpointError) as excinfo:
        ModelSpec.from_checkpoint(bad)
    assert message in str(excinfo.value) and "\n" not in str(excinfo.value)


def test_missing_directory(tmp_path):
    with pytest.raises(CheckpointError, match="not a directory"):
        ModelSpec.from_checkpoint(tmp_path / "nowhere")


def _rewrite_tokenizer(directory: Path, change) -> None:
    path = directory / "tokenizer.json"
    path.write_text(json.dumps(change(json.loads(path.read_text(encoding="utf-8")))), encoding="utf-8")


def _without_added(name: str):
    def change(tokenizer: dict) -> dict:
        tokenizer["added_tokens"] = [e for e in tokenizer["added_tokens"] if e["content"] != name]
        return tokenizer
    return change


def _added_tokens_last(tokenizer: dict) -> dict:
    added = tokenizer.pop("added_tokens")
    return {**tokenizer, "added_tokens": added}


@pytest.mark.parametrize("change", [_added_tokens_last, _without_added("<end_of_turn>")],
                         ids=["added-tokens-last", "end-of-turn-only-in-vocab"])
def test_special_tokens_fall_back_to_the_whole_tokenizer(tmp_path, tiny_checkpoint, change):
    """The spec reads only tokenizer.json's leading added_tokens when it can (the whole file is 33 MB
    of JSON); a token found elsewhere, or a file laid out otherwise, gives the same ids."""
    variant = _copy_checkpoint(tiny_checkpoint, tmp_path / "ckpt")
    _rewrite_tokenizer(variant, change)
    assert ModelSpec.from_checkpoint(variant).tokens == ModelSpec.from_checkpoint(tiny_checkpoint).tokens


def test_a_special_token_missing_everywhere_is_named(tmp_path, tiny_checkpoint):
    variant = _copy_checkpoint(tiny_checkpoint, tmp_path / "ckpt")

    def drop(tokenizer: dict) -> dict:
        tokenizer = _without_added("<end_of_turn>")(tokenizer)
        del tokenizer["model"]["vocab"]["<end_of_turn>"]
        return tokenizer

    _rewrite_tokenizer(variant, drop)
    with pytest.raises(CheckpointError, match="tokenizer has no end-of-turn token '<end_of_turn>'"):
        ModelSpec.from_checkpoint(variant)


def _set_processor(directory: Path, name: str, change) -> None:
    path = directory / name
    path.write_text(json.dumps(change(json.loads(path.read_text(encoding="utf-8")))), encoding="utf-8")


def _image_size(size: int):
    def change(settings: dict) -> dict:
        target = settings.get("image_processor", settings)
        target["size"] = {"height": size, "width": size}
        return settings
    return change


def test_processor_settings_are_read_as_transformers_reads_them(tmp_path, tiny_checkpoint):
    """A stale preprocessor_config.json beside processor_config.json's image_processor: transformers
    5.23's AutoProcessor uses the latter, and so does the spec."""
    from transformers import AutoProcessor

    variant = _copy_checkpoint(tiny_checkpoint, tmp_path / "ckpt")
    model_size = ModelSpec.from_checkpoint(tiny_checkpoint).vision.image_size
    _set_processor(variant, "preprocessor_config.json", _image_size(model_size // 2))
    reference = AutoProcessor.from_pretrained(variant).image_processor.size
    spec = ModelSpec.from_checkpoint(variant).image_processing
    assert (spec.height, spec.width) == (reference["height"], reference["width"]) == (model_size, model_size)


@pytest.mark.parametrize("change, named", [
    (lambda d, size: _set_processor(d, "processor_config.json", _image_size(size // 2)),
     "processor_config.json (image_processor) size is {half}x{half} but config.json vision_config.image_size is "
     "{size}x{size}"),
    (lambda d, size: _set_processor(d, "processor_config.json", lambda p: {**p, "image_seq_length": 4}),
     "processor_config.json image_seq_length is 4 but config.json mm_tokens_per_image is {tokens}"),
], ids=["image-size", "image-tokens"])
def test_a_processor_that_disagrees_with_the_model_is_refused_at_build(tmp_path, tiny_checkpoint, change, named,
                                                                        capsys):
    from medgemma_triton.cli import main

    variant = _copy_checkpoint(tiny_checkpoint, tmp_path / "ckpt")
    vision = ModelSpec.from_checkpoint(tiny_checkpoint).vision
    change(variant, vision.image_size)
    expected = named.format(half=vision.image_size // 2, size=vision.image_size, tokens=vision.mm_tokens_per_image)
    with pytest.raises(CheckpointError) as excinfo:
        ModelSpec.from_checkpoint(variant)
    assert expected in str(excinfo.value)
    assert main(["build", "cpu", "--checkpoint", str(variant), "--output", str(tmp_path / "repo")]) != 0
    assert expected in capsys.readouterr().err
    assert not (tmp_path / "repo").exists()
