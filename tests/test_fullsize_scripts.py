"""benchmarks/studies/decoder_fullsize.py builds what docs/design.md calls the 4B geometry.

The dry run itself is not run here: even 2 layers (0.86B parameters, the embedding alone is 2.7 GB)
take about 4 minutes on this machine. These tests pin what it builds: the text config is the
published google/medgemma-4b-it one (medgemma_triton/data/medgemma-4b-it.config.json), as the spec
reads it, and a shortened run keeps the 5:1 sliding:global pattern with at least one global layer.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import sys
from pathlib import Path

from medgemma_triton.spec import _text_spec, medgemma_4b_config

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "studies" / "decoder_fullsize.py"


def _load_script():
    module_spec = importlib.util.spec_from_file_location("decoder_fullsize", SCRIPT)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[module_spec.name] = module  # its dataclasses look their module up there
    module_spec.loader.exec_module(module)
    return module


def test_dry_run_text_config_is_the_published_4b():
    script = _load_script()
    config = script.medgemma_4b_config(34)
    published = medgemma_4b_config()
    built = _text_spec(config.to_dict()["text_config"])
    assert built == _text_spec(published["text_config"])
    # docs/design.md's numbers, spelled out
    assert (built.hidden_size, built.intermediate_size, built.num_layers) == (2560, 10240, 34)
    assert (built.num_heads, built.num_kv_heads, built.head_dim, built.query_pre_attn_scalar) == (8, 4, 256, 256)
    assert (built.sliding_window, built.vocab_size, built.tie_word_embeddings) == (1024, 262_208, True)
    assert (built.rope_global.theta, built.rope_global.rope_type, built.rope_global.factor) == (1e6, "linear", 8.0)
    assert (built.rope_local.theta, built.rope_local.rope_type) == (1e4, "default")
    assert config.mm_tokens_per_image == published["mm_tokens_per_image"] == 256
    for key in ("image_token_index", "boi_token_index", "eoi_token_index"):
        assert getattr(config, key.replace("_index", "_id")) == published[key]


def test_shortened_runs_keep_the_pattern_and_a_global_layer():
    script = _load_script()
    full = script.layer_types(34)
    assert full.count("full_attention") == 5 and full[5::6] == ["full_attention"] * 5
    assert script.layer_types(12) == full[:12]
    assert script.layer_types(2) == ["sliding_attention", "full_attention"]
    assert script.layer_types(1) == ["full_attention"]
    short = _text_spec(script.medgemma_4b_config(2).to_dict()["text_config"])
    full_spec = _text_spec(script.medgemma_4b_config(34).to_dict()["text_config"])
    assert dataclasses.replace(short, num_layers=34, layer_types=full_spec.layer_types) == full_spec
