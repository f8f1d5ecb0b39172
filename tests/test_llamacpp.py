"""The llama.cpp decoder (export/gguf.py + runtime/llamacpp.py) against transformers' Gemma 3.

An F32 GGUF, converted and written by llama.cpp's own tools, run with an fp32 KV cache: greedy tokens
must equal Gemma3ForConditionalGeneration.generate(do_sample=False) on both development checkpoints,
with text, one image, two images and a prompt past the sliding window. That proves the converter's
weights, the layer pattern and query scale written for tiny, the masks (image rows decoded with causal
attention off) and the embedding hand-over (image rows fed unscaled). Image embeddings come from the
HF model, so these isolate the decoder; the served path is in tests/test_serving.py.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from test_decoder_parity import (  # noqa: F401
    MAX_NEW_TOKENS,
    SYSTEM,
    _assert_parity,
    _hf_greedy,
    _image,
    _image_embeddings,
    _inputs,
    _long_text,
    _prompts,
    _user,
    case,
)

_DECODERS: dict = {}


@pytest.fixture(scope="session")
def gguf_case(case, request):  # noqa: F811 - the imported fixture
    """The parity case with the checkpoint's F32 GGUF in llama.cpp (exact: fp32 KV cache, no flash attention)."""
    from medgemma_triton.export.gguf import DECODER_GGUF
    from medgemma_triton.runtime.llamacpp import LlamaDecoder

    if case.kind not in _DECODERS:
        gguf = request.getfixturevalue(f"{case.kind}_gguf_f32") / DECODER_GGUF
        _DECODERS[case.kind] = LlamaDecoder(gguf, case.spec, threads=2, max_sequences=4, context_tokens=4096,
                                            exact=True)
    return dataclasses.replace(case, decoder=_DECODERS[case.kind])


def test_text_chat(gguf_case):
    conversation = [{"role": "system", "content": [{"type": "text", "text": SYSTEM}]}] + _user(
        "What are the signs of pneumonia on a chest X-ray?"
    )
    _assert_parity(gguf_case, [conversation])


def test_one_image(gguf_case):
    inputs = _assert_parity(gguf_case, [_user("Describe this X-ray.", _image(1))])
    assert (inputs["input_ids"] == gguf_case.spec.tokens.image).sum() == gguf_case.spec.mm_tokens_per_image


def test_two_images(gguf_case):
    _assert_parity(gguf_case, [_user("Compare the first image", _image(2), "with the second", _image(3))])


def test_prompt_longer_than_sliding_window(gguf_case):
    """An image at the start that the sliding layers must drop, then text past the window."""
    window = gguf_case.spec.text.sliding_window
    inputs = _assert_parity(gguf_case, [_user(_image(4), "Summarise this report. " + _long_text(gguf_case, window + 32))])
    assert inputs["input_ids"].shape[1] > window + gguf_case.spec.mm_tokens_per_image


def test_sequences_decoded_together_match_the_reference(gguf_case):
    """Two requests (one with an image) share every llama_decode step: each gets its own reference tokens."""
    conversations = [_user("Describe this X-ray in detail.", _image(5)), _user("Is a widened mediastinum an emergency?")]
    inputs = _inputs(gguf_case, conversations)
    expected = _hf_greedy(gguf_case, inputs)
    got = gguf_case.decoder.generate_greedy(_prompts(inputs), _image_embeddings(gguf_case, inputs), MAX_NEW_TOKENS)
    assert got == expected


def test_chunked_prefill_gives_the_same_logits(gguf_case):
    """The serving engine prefills in chunks that never split an image: the logits are those of one prefill."""
    decoder = gguf_case.decoder
    inputs = _inputs(gguf_case, [_user("Compare", _image(7), "with", _image(8), _long_text(gguf_case, 40))])
    prompt, images = _prompts(inputs)[0], _image_embeddings(gguf_case, inputs)[0]
    whole = decoder.new_sequence(prompt, images)
    expected = decoder.prefill(whole)
    chunked = decoder.new_sequence(prompt, images)
    ends = decoder.chunk_ends(prompt, 7)
    assert len(ends) > 3
    for end in ends:
        logits = decoder.prefill_chunk(chunked, end)
    try:
        np.testing.assert_allclose(logits, expected, rtol=0, atol=1e-3 * np.abs(expected).max())
        assert logits.argmax() == expected.argmax()
    finally:
        decoder.release(whole)
        decoder.release(chunked)


def test_image_rows_attend_to_the_whole_image(gguf_case, monkeypatch):
    """The prefill's logits after an image match transformers' (its image rows attend to each other);
    the same image decoded causally (the control) lands far from them, so the check can tell."""
    import torch

    decoder = gguf_case.decoder
    inputs = _inputs(gguf_case, [_user("Describe", _image(9), "in one word.")])
    with torch.no_grad():
        reference = gguf_case.model(**inputs).logits[0, -1].numpy()
    prompt, images = _prompts(inputs)[0], _image_embeddings(gguf_case, inputs)[0]

    def prefill_logits():
        state = decoder.new_sequence(prompt, images)
        try:
            return decoder.prefill(state)
        finally:
            decoder.release(state)

    error = np.abs(prefill_logits() - reference).max()
    original = decoder._decode
    monkeypatch.setattr(decoder, "_decode", lambda batch, n, causal: original(batch, n, causal=True))
    causal_error = np.abs(prefill_logits() - reference).max()
    monkeypatch.undo()
    assert error < 1e-3 * np.abs(reference).max()
    assert causal_error > 10 * error


def test_sequences_are_reused_after_release(gguf_case):
    """More requests than the context has sequences, one after another: each released sequence is free again."""
    decoder = gguf_case.decoder
    prompt = _prompts(_inputs(gguf_case, [_user("What is a pneumothorax?")]))[0]
    expected = decoder.generate_greedy([prompt], max_new_tokens=4)
    for _ in range(decoder.max_sequences + 2):
        assert decoder.generate_greedy([prompt], max_new_tokens=4) == expected


def test_limits_are_refused_not_aborted(gguf_case, request):
    """llama.cpp aborts the process on an image larger than its ubatch or a full KV cache; the decoder
    refuses first (image) or reports llama_decode's code (cache), and the process lives on."""
    from medgemma_triton.export.gguf import DECODER_GGUF
    from medgemma_triton.runtime.llamacpp import LlamaDecodeError, LlamaDecoder

    decoder, spec = gguf_case.decoder, gguf_case.spec
    rows = decoder.ubatch + 1
    prompt = np.concatenate([[spec.tokens.bos], np.full(rows, spec.tokens.image), [spec.tokens.bos]])
    state = decoder.new_sequence(prompt, np.zeros((rows, spec.text.hidden_size), np.float32))
    with pytest.raises(ValueError, match="do not fit one llama.cpp ubatch"):
        decoder.prefill(state)
    decoder.release(state)

    gguf = request.getfixturevalue(f"{gguf_case.kind}_gguf_f32") / DECODER_GGUF
    small = LlamaDecoder(gguf, spec, threads=1, max_sequences=1, context_tokens=256, exact=True)
    try:
        long_prompt = np.full(small.context_tokens + 8, spec.tokens.bos)
        with pytest.raises(LlamaDecodeError, match="KV cache"):
            small.prefill(small.new_sequence(long_prompt))
    finally:
        small.close()


def test_manifest_records_the_gguf(tiny_gguf_f32):
    from medgemma_triton.export.gguf import DECODER_GGUF
    from medgemma_triton.export.llamacpp_build import file_sha256
    from medgemma_triton.runtime.llamacpp import LLAMA_CPP_COMMIT, LLAMA_CPP_PYTHON

    manifest = json.loads((tiny_gguf_f32 / "manifest.json").read_text())
    gguf = manifest["gguf"]
    assert gguf["gguf_type"] == "F32" and gguf["llama_cpp_python"] == LLAMA_CPP_PYTHON
    assert gguf["llama_cpp"] == LLAMA_CPP_COMMIT and gguf["sha256"] == file_sha256(tiny_gguf_f32 / DECODER_GGUF)
    assert gguf["sliding_window_pattern"] == 3  # tiny: sliding, sliding, global, repeated
    assert set(gguf["bytes_by_type"]) == {"F32"}


def test_prompts_and_steps_in_one_call_give_the_logits_of_separate_calls(gguf_case):
    """decode_mixed: two prompts' text and a third sequence's decode step in one llama_decode give each
    the logits of its own calls; an image chunk is refused (it needs a non-causal call of its own)."""
    decoder = gguf_case.decoder
    inputs = _inputs(gguf_case, [_user("Is a widened mediastinum an emergency?"), _user("Hi"), _user("Describe the lungs.")])
    prompts = _prompts(inputs)
    alone = [decoder.new_sequence(p) for p in prompts]
    expected = [decoder.prefill(s) for s in alone]
    expected_step = decoder.step(alone[2], int(expected[2].argmax()))
    for state in alone:
        decoder.release(state)
    mixed = [decoder.new_sequence(p) for p in prompts]
    try:
        decoder.prefill(mixed[2])
        half = prompts[0].size // 2
        first, steps = decoder.decode_mixed([(mixed[0], half), (mixed[1], prompts[1].size)], [mixed[2]],
                                            [int(expected[2].argmax())])
        assert first[0] is None and mixed[0].position == half
        rest, no_steps = decoder.decode_mixed([(mixed[0], prompts[0].size)], [], [])
        assert no_steps.shape[0] == 0
        for got, want in ((rest[0], expected[0]), (first[1], expected[1]), (steps[0], expected_step)):
            np.testing.assert_allclose(got, want, rtol=0, atol=1e-3 * np.abs(want).max())
            assert got.argmax() == want.argmax()
        image_prompt = _prompts(_inputs(gguf_case, [_user("Describe this X-ray.", _image(1))]))[0]
        with_image = decoder.new_sequence(image_prompt, np.zeros(
            (gguf_case.spec.mm_tokens_per_image, gguf_case.spec.text.hidden_size), np.float32))
        with pytest.raises(ValueError, match="text only"):
            decoder.decode_mixed([(with_image, image_prompt.size)], [], [])
        assert with_image.seq_id is None and with_image.position == 0
    finally:
        for state in mixed:
            decoder.release(state)
