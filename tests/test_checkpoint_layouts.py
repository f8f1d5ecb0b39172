"""Checkpoint layouts build refuses: each names the file and field, what it found and what is supported.

Each case is google/medgemma-4b-it's published config.json (medgemma_triton/data) with one field changed,
beside the tiny checkpoint's tokenizer and processor files, so the refusal is the only thing wrong.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from medgemma_triton.spec import CheckpointError, ModelSpec, medgemma_4b_config

SERVING_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json")


@pytest.fixture
def published_layout(tmp_path, tiny_checkpoint):
    """Write the published 4B layout with `change` applied to its config.json; returns the directory."""
    def write(change) -> Path:
        directory = tmp_path / "ckpt"
        directory.mkdir()
        for name in SERVING_FILES:
            shutil.copy(tiny_checkpoint / name, directory / name)
        config = medgemma_4b_config()
        size = config["vision_config"]["image_size"]
        preprocessor = json.loads((tiny_checkpoint / "preprocessor_config.json").read_text())
        (directory / "preprocessor_config.json").write_text(
            json.dumps({**preprocessor, "size": {"height": size, "width": size}}))
        (directory / "processor_config.json").write_text(
            json.dumps({"image_seq_length": config["mm_tokens_per_image"], "processor_class": "Gemma3Processor"}))
        change(config)
        (directory / "config.json").write_text(json.dumps(config))
        (directory / "model.safetensors").write_bytes(b"")  # presence only; the spec never reads weights
        return directory
    return write


def test_the_unchanged_layout_is_accepted(published_layout):
    spec = ModelSpec.from_checkpoint(published_layout(lambda config: None))
    assert spec.text.rope_global.rope_type == "linear" and spec.architecture == "Gemma3ForConditionalGeneration"


def _text(key, value):
    return lambda config: config["text_config"].update({key: value})


def _rope_parameters(full_type):
    """transformers 5's layout: rope_parameters per attention type instead of rope_scaling."""
    def change(config):
        text = config["text_config"]
        del text["rope_scaling"]
        text["rope_parameters"] = {"full_attention": {"rope_type": full_type, "factor": 8.0},
                                   "sliding_attention": {"rope_type": "default"}}
    return change


def _layer_types(extra):
    def change(config):
        text = config["text_config"]
        pattern = text.pop("sliding_window_pattern")
        layers = ["sliding_attention" if (i + 1) % pattern else "full_attention"
                  for i in range(text["num_hidden_layers"])]
        text["layer_types"] = layers[:-1] + [extra]
    return change


@pytest.mark.parametrize("change, refusal", [
    (lambda config: config.update(architectures=["Gemma3nForConditionalGeneration"]),
     "config.json architectures is ['Gemma3nForConditionalGeneration'], which is not supported "
     "(supported: Gemma3ForConditionalGeneration, Gemma3ForCausalLM)"),
    (_text("rope_scaling", {"rope_type": "yarn", "factor": 8.0}),
     "config.json text_config rope_scaling.rope_type is 'yarn', which is not supported (supported: default, linear)"),
    (_rope_parameters("dynamic"),
     "config.json text_config rope_parameters.full_attention.rope_type is 'dynamic', which is not supported "
     "(supported: default, linear)"),
    (_layer_types("chunked_attention"),
     "config.json text_config layer_types is 'chunked_attention', which is not supported "
     "(supported: sliding_attention, full_attention)"),
    (_text("use_bidirectional_attention", True),
     "config.json text_config use_bidirectional_attention is True, which is not supported "
     "(supported: false or absent)"),
], ids=["architecture", "rope-scaling-type", "rope-parameters-type", "layer-type", "bidirectional-attention"])
def test_an_unsupported_field_is_refused_by_name(published_layout, change, refusal):
    with pytest.raises(CheckpointError) as excinfo:
        ModelSpec.from_checkpoint(published_layout(change))
    assert refusal in str(excinfo.value) and "\n" not in str(excinfo.value)


def test_build_prints_the_refusal_and_writes_nothing(published_layout, tmp_path, capsys):
    from medgemma_triton.cli import main

    checkpoint = published_layout(_text("rope_scaling", {"rope_type": "yarn", "factor": 8.0}))
    assert main(["build", "cpu", "--checkpoint", str(checkpoint), "--output", str(tmp_path / "repo")]) != 0
    assert "config.json text_config rope_scaling.rope_type is 'yarn'" in capsys.readouterr().err
    assert not (tmp_path / "repo").exists()
