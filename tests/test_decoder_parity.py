"""The ONNX decoder (export/decoder.py + runtime/decoder.py) against transformers' Gemma 3.

Reference: Gemma3ForConditionalGeneration.generate(do_sample=False) at the pinned transformers
version, on both development checkpoints. Image embeddings come from the HF model itself, so these
tests isolate the decoder. Each checkpoint is exported once per session.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from medgemma_triton.runtime.decoder import sliding_cache_length

MAX_NEW_TOKENS = 32
SYSTEM = "You are an expert radiologist."
PARAGRAPH = (
    "The chest radiograph shows clear lungs without focal consolidation, effusion or pneumothorax. "
    "The cardiomediastinal silhouette is within normal limits and the osseous structures are intact. "
)


@dataclass
class Case:
    kind: str
    spec: object
    model: object  # transformers Gemma3ForConditionalGeneration, fp32
    processor: object
    decoder: object  # OnnxDecoder
    onnx_path: Path


# One case per checkpoint per run, shared with tests/test_batched_decode.py (which imports `case`:
# pytest then holds a second fixture definition, so the cache lives here, not in pytest). The decoder is
# the session's fp32 export (tiny_onnx / dev_onnx), the one the served repositories use.
_CASES: dict[Path, Case] = {}


@pytest.fixture(scope="session")
def case(checkpoint, request) -> Case:
    if checkpoint not in _CASES:
        _CASES[checkpoint] = _build_case(checkpoint, request.getfixturevalue(f"{checkpoint.name}_onnx"))
    return _CASES[checkpoint]


def _build_case(checkpoint: Path, onnx_dir: Path) -> Case:
    from transformers import AutoProcessor, Gemma3ForConditionalGeneration

    from medgemma_triton.runtime.decoder import OnnxDecoder
    from medgemma_triton.spec import ModelSpec

    torch.set_num_threads(1)
    spec = ModelSpec.from_checkpoint(checkpoint)
    onnx_path = onnx_dir / "decoder.onnx"
    model = Gemma3ForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(checkpoint)
    processor.tokenizer.padding_side = "left"
    return Case(checkpoint.name, spec, model, processor, OnnxDecoder(onnx_path, spec), onnx_path)


def _image(seed: int, size=(96, 80)):
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def _user(*parts) -> list[dict]:
    content = [{"type": "text", "text": p} if isinstance(p, str) else {"type": "image", "image": p} for p in parts]
    return [{"role": "user", "content": content}]


def _inputs(case: Case, conversations: list[list[dict]]):
    return case.processor.apply_chat_template(
        conversations,
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
        return_tensors="pt",
        processor_kwargs={"padding": True},
    )


def _image_embeddings(case: Case, inputs) -> list[np.ndarray | None]:
    """Per-row image rows from the HF model's own vision tower + projector."""
    ids = inputs["input_ids"].numpy()
    per_row = (ids == case.spec.tokens.image).sum(axis=1) // case.spec.mm_tokens_per_image
    if "pixel_values" not in inputs:
        return [None] * len(ids)
    with torch.no_grad():
        features = case.model.get_image_features(inputs["pixel_values"]).pooler_output.numpy()
    rows, start = [], 0
    for count in per_row:
        rows.append(features[start : start + count].reshape(-1, features.shape[-1]) if count else None)
        start += count
    return rows


def _until_eos(tokens: list[int], eos) -> list[int]:
    for i, token in enumerate(tokens):
        if token in eos:
            return tokens[: i + 1]
    return tokens


def _hf_greedy(case: Case, inputs) -> list[list[int]]:
    with torch.no_grad():
        out = case.model.generate(**inputs, do_sample=False, max_new_tokens=MAX_NEW_TOKENS)
    new = out[:, inputs["input_ids"].shape[1] :].tolist()
    return [_until_eos(row, case.spec.tokens.eos) for row in new]


def _prompts(inputs) -> list[np.ndarray]:
    """Unpadded prompt ids per row (the processor pads on the left)."""
    ids, mask = inputs["input_ids"].numpy(), inputs["attention_mask"].numpy()
    return [row[m == 1] for row, m in zip(ids, mask)]


def _assert_parity(case: Case, conversations):
    inputs = _inputs(case, conversations)
    expected = _hf_greedy(case, inputs)
    got = case.decoder.generate_greedy(
        _prompts(inputs), _image_embeddings(case, inputs), MAX_NEW_TOKENS, case.spec.tokens.eos
    )
    assert got == expected
    return inputs


def _long_text(case: Case, min_tokens: int) -> str:
    text = PARAGRAPH
    while len(case.processor.tokenizer(text)["input_ids"]) < min_tokens:
        text += PARAGRAPH
    return text


def test_text_chat(case):
    conversation = [{"role": "system", "content": [{"type": "text", "text": SYSTEM}]}] + _user(
        "What are the signs of pneumonia on a chest X-ray?"
    )
    _assert_parity(case, [conversation])


def test_one_image(case):
    inputs = _assert_parity(case, [_user("Describe this X-ray.", _image(1))])
    assert (inputs["input_ids"] == case.spec.tokens.image).sum() == case.spec.mm_tokens_per_image


def test_two_images(case):
    _assert_parity(case, [_user("Compare the first image", _image(2), "with the second", _image(3))])


def test_prompt_longer_than_sliding_window(case):
    """An image at the start that the sliding layers must drop, then text past the window."""
    window = case.spec.text.sliding_window
    conversation = _user(_image(4), "Summarise this report. " + _long_text(case, window + 32))
    inputs = _assert_parity(case, [conversation])
    assert inputs["input_ids"].shape[1] > window + case.spec.mm_tokens_per_image


def test_left_padded_batch(case):
    conversations = [
        _user("Describe this X-ray in detail.", _image(5)),
        _user("Is a widened mediastinum an emergency?"),
    ]
    inputs = _assert_parity(case, conversations)
    assert (inputs["attention_mask"] == 0).any(), "the batch must actually be padded"


def _incremental_greedy(case: Case, inputs):
    state = case.decoder.new_sequence(_prompts(inputs)[0], _image_embeddings(case, inputs)[0])
    logits = case.decoder.prefill(state)
    tokens = []
    for _ in range(MAX_NEW_TOKENS):
        tokens.append(int(np.argmax(logits)))
        if tokens[-1] in case.spec.tokens.eos or len(tokens) == MAX_NEW_TOKENS:
            break
        logits = case.decoder.step(state, tokens[-1])
    return tokens, state


def _cache_lengths(case: Case, past) -> tuple[set, set]:
    """(global layers' cache lengths, sliding layers' cache lengths)."""
    text = case.spec.text
    lengths = [(text.is_sliding(i // 2), p.shape[2]) for i, p in enumerate(past)]
    return {n for sliding, n in lengths if not sliding}, {n for sliding, n in lengths if sliding}


def test_incremental_api_matches_generate(case):
    """new_sequence / prefill / step (the Triton llm path) give the reference tokens."""
    inputs = _inputs(case, [_user("Describe this X-ray.", _image(6))])
    tokens, state = _incremental_greedy(case, inputs)
    assert tokens == _hf_greedy(case, inputs)[0]
    assert state.position == len(state.prompt_ids) + len(tokens) - 1


def test_decode_across_the_window_edge(case):
    """Prompt just shorter than the window, decoded step by step past it: the sliding caches stop growing."""
    window = case.spec.text.sliding_window
    tokenizer = case.processor.tokenizer
    text = _long_text(case, window)
    # cut the text so the whole prompt ends a few tokens before the window edge
    words = text.split(" ")
    while _inputs(case, [_user(" ".join(words))])["input_ids"].shape[1] > window - 8:
        words = words[: -max(1, len(words) // 50)]
    inputs = _inputs(case, [_user(" ".join(words))])
    assert window - 24 < inputs["input_ids"].shape[1] <= window - 8, tokenizer.decode(inputs["input_ids"][0][-5:])
    tokens, state = _incremental_greedy(case, inputs)
    assert tokens == _hf_greedy(case, inputs)[0]
    global_lengths, sliding_lengths = _cache_lengths(case, state.past)
    assert global_lengths == {state.position}
    assert sliding_lengths == {min(state.position, sliding_cache_length(case.spec.text))}


def _hf_first_logits(case: Case, inputs) -> np.ndarray:
    with torch.no_grad():
        return case.model(**inputs).logits[:, -1].numpy()


def test_first_step_logits(case):
    inputs = _inputs(case, [_user("Compare the first image", _image(2), "with the second", _image(3))])
    expected = _hf_first_logits(case, inputs)[0]
    state = case.decoder.new_sequence(_prompts(inputs)[0], _image_embeddings(case, inputs)[0])
    got = case.decoder.prefill(state)
    diff = float(np.abs(got - expected).max())
    print(f"\n{case.kind}: first-step logits max |diff| = {diff:.2e} (max |logit| {np.abs(expected).max():.2f})")
    assert diff <= 1e-5 + 2e-5 * float(np.abs(expected).max())


def _prefill_in_chunks(case, ids, rows, splits):
    """decoder.run over ids[splits[i]:splits[i+1]] in turn, image rows with the chunk that holds them;
    yields (end, logits, past) after each chunk."""
    decoder = case.decoder
    past = decoder.empty_past(1)
    for start, end in zip(splits, splits[1:]):
        chunk = ids[start:end]
        chunk_rows = rows if (chunk == case.spec.tokens.image).any() else decoder.no_images()
        logits, past = decoder.run(
            chunk[None], np.ones((1, end), np.int64), np.arange(start, end)[None], chunk_rows, past
        )
        yield end, logits, past


def test_chunked_prefill_matches_one_shot(case):
    """P > 0 and T > 1: the image inside a later chunk, and the text after it in a third."""
    inputs = _inputs(case, [_user("Describe this X-ray.", _image(7), "Be brief.")])
    ids = _prompts(inputs)[0]
    rows = _image_embeddings(case, inputs)[0]
    decoder = case.decoder
    one_shot = decoder.prefill(decoder.new_sequence(ids, rows))

    image_positions = np.flatnonzero(ids == case.spec.tokens.image)
    splits = [0, int(image_positions[0]) - 2, int(image_positions[-1]) + 3, len(ids)]  # an image is never split
    *_, (_, logits, past) = _prefill_in_chunks(case, ids, rows, splits)
    keep = sliding_cache_length(case.spec.text)
    assert _cache_lengths(case, past) == ({len(ids)}, {min(len(ids), keep)})
    np.testing.assert_allclose(logits[0], one_shot, atol=1e-4 * max(1.0, float(np.abs(one_shot).max())))


def test_chunked_prefill_longer_than_window(case):
    """Chunks crossing the window edge, one longer than the window: trimmed sliding caches, one-shot logits."""
    window = case.spec.text.sliding_window
    inputs = _inputs(case, [_user(_image(8), "Summarise this report. " + _long_text(case, 2 * window + 16))])
    ids = _prompts(inputs)[0]
    rows = _image_embeddings(case, inputs)[0]
    decoder = case.decoder
    one_shot_state = decoder.new_sequence(ids, rows)
    one_shot = decoder.prefill(one_shot_state)
    keep = sliding_cache_length(case.spec.text)
    assert _cache_lengths(case, one_shot_state.past) == ({len(ids)}, {keep})

    last_image = int(np.flatnonzero(ids == case.spec.tokens.image)[-1])
    splits = [0, last_image + 2, last_image + 2 + window // 3, last_image + 2 + window // 3 + window + 5, len(ids)]
    assert splits[-2] < len(ids)
    for end, logits, past in _prefill_in_chunks(case, ids, rows, splits):
        assert _cache_lengths(case, past) == ({end}, {min(end, keep)})
    np.testing.assert_allclose(logits[0], one_shot, atol=1e-4 * max(1.0, float(np.abs(one_shot).max())))


def test_image_mask_is_exercised(case):
    """Causal-only attention for image tokens changes the reference logits; the bidirectional mask matches them."""
    from medgemma_triton.export.decoder import Gemma3Decoder

    inputs = _inputs(case, [_user("Compare the first image", _image(2), "with the second", _image(3))])
    expected = _hf_first_logits(case, inputs)[0]
    ids = inputs["input_ids"]
    rows = torch.from_numpy(_image_embeddings(case, inputs)[0])
    text = case.spec.text
    past = [torch.zeros(1, text.num_kv_heads, 0, text.head_dim) for _ in range(2 * text.num_layers)]
    language_model = case.model.model.language_model
    diffs = {}
    for bidirectional in (True, False):
        module = Gemma3Decoder(language_model, case.model.lm_head.weight, case.spec, bidirectional).eval()
        with torch.no_grad():
            logits = module(ids, inputs["attention_mask"], torch.arange(ids.shape[1])[None], rows, *past)[0]
        diffs[bidirectional] = float((logits[0].numpy() - expected).__abs__().max())
    print(f"\n{case.kind}: logits max |diff| vs HF: bidirectional {diffs[True]:.2e}, causal-only {diffs[False]:.2e}")
    assert diffs[True] < 1e-3
    assert diffs[False] > 1e-2 and diffs[False] > 100 * diffs[True]


def test_masks_match_transformers_composition(case):
    """Our masks == transformers' create_masks_for_vision_model, with an image longer than the window.

    That is where transformers 4.57 and 5.x differ (window AND applied after the image OR in 5.x).
    """
    from transformers.models.gemma3.modeling_gemma3 import (
        create_masks_for_vision_model,
        get_block_sequence_ids_for_mask,
    )

    from medgemma_triton.export.decoder import Gemma3Decoder

    window = 4
    image = case.spec.tokens.image
    ids = torch.tensor(
        [
            [0, 0, 2, 5, image, image, image, image, image, image, 7, image, image, 8, 9],
            [2, image, image, image, 6, 7, 8, image, image, image, image, image, image, image, 9],
        ]
    )
    attention_mask = torch.ones_like(ids)
    attention_mask[0, :2] = 0
    config = copy.deepcopy(case.model.config.get_text_config())
    config.sliding_window = window
    config._attn_implementation = "sdpa"
    reference = create_masks_for_vision_model(
        config=config,
        inputs_embeds=torch.zeros(*ids.shape, config.hidden_size),
        attention_mask=attention_mask,
        past_key_values=None,
        position_ids=None,
        block_sequence_ids=get_block_sequence_ids_for_mask((ids == image).long()),
    )
    spec = dataclasses.replace(case.spec, text=dataclasses.replace(case.spec.text, sliding_window=window))
    module = Gemma3Decoder(case.model.model.language_model, case.model.lm_head.weight, spec)
    global_mask, sliding_mask = module.attention_masks(ids, attention_mask, 0)
    torch.testing.assert_close(global_mask, reference["full_attention"])
    torch.testing.assert_close(sliding_mask, reference["sliding_attention"])
    # an image query sees later tokens of its own image even beyond the window's past edge
    assert bool(sliding_mask[1, 0, 7, 13]) and not bool(sliding_mask[1, 0, 13, 7])


def test_runtime_rejects_bad_inputs(case):
    decoder = case.decoder
    image = case.spec.tokens.image
    with pytest.raises(ValueError, match="image tokens but no image_embeddings"):
        decoder.new_sequence(np.array([2, image, 5]))
    with pytest.raises(ValueError, match="image embedding rows"):
        decoder.new_sequence(np.array([2, image, 5]), np.zeros((2, case.spec.text.hidden_size), np.float32))
    with pytest.raises(ValueError, match=r"must be \[rows"):
        decoder.new_sequence(np.array([2, image, 5]), np.zeros((1, 3), np.float32))
    with pytest.raises(ValueError, match="non-empty 1-D"):
        decoder.new_sequence(np.array([[2, 5]]))
    with pytest.raises(ValueError, match="vocabulary"):
        decoder.new_sequence(np.array([2, case.spec.text.vocab_size]))
    state = decoder.new_sequence(np.array([2, 5]))
    with pytest.raises(ValueError, match="prefill"):
        decoder.step(state, 5)
