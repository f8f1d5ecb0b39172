"""Continuous batching (OnnxDecoder.step_batch / prefill_batch) is token-identical to decoding alone.

Requests with different prompt lengths (one with an image, one longer than the sliding window, so
trimmed and untrimmed sliding caches share a batch) join at different steps and leave when done; every
request's greedy tokens must equal those of the same request decoded alone with prefill/step. Uses the
decoder exported once per checkpoint by tests/test_decoder_parity.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
from test_decoder_parity import _image, _image_embeddings, _inputs, _long_text, _prompts, _user, case  # noqa: F401

NEW_TOKENS = 24


@dataclass
class Request:
    prompt_ids: np.ndarray
    image_embeddings: np.ndarray | None
    join_step: int
    max_new_tokens: int = NEW_TOKENS


def _request(case, parts, join_step: int, max_new_tokens: int = NEW_TOKENS) -> Request:
    inputs = _inputs(case, [_user(*parts)])
    return Request(_prompts(inputs)[0], _image_embeddings(case, inputs)[0], join_step, max_new_tokens)


def _requests(case) -> list[Request]:
    window = case.spec.text.sliding_window
    return [
        _request(case, ["What are the signs of pneumonia on a chest X-ray?"], join_step=0),
        _request(case, ["Describe this X-ray.", _image(11)], join_step=0, max_new_tokens=9),
        _request(case, ["Summarise this report. " + _long_text(case, window + 8)], join_step=3),
        _request(case, ["Is a widened mediastinum an emergency?"], join_step=5),
        _request(case, ["Compare", _image(12), "with the prior study."], join_step=5),
    ]


def _finished(tokens: list[int], request: Request, eos) -> bool:
    return tokens[-1] in eos or len(tokens) == request.max_new_tokens


def _decode_alone(decoder, request: Request, eos) -> list[int]:
    state = decoder.new_sequence(request.prompt_ids, request.image_embeddings)
    logits = decoder.prefill(state)
    tokens = [int(np.argmax(logits))]
    while not _finished(tokens, request, eos):
        tokens.append(int(np.argmax(decoder.step(state, tokens[-1]))))
    return tokens


def _decode_together(decoder, requests: list[Request], eos) -> tuple[list[list[int]], list[int]]:
    """A scheduler loop as the serving engine runs it: admit joiners, one step_batch over the rest."""
    tokens: list[list[int]] = [[] for _ in requests]
    active: dict[int, object] = {}
    batch_sizes = []
    step = 0
    while active or any(r.join_step >= step for r in requests):
        if active:
            rows = list(active)
            logits = decoder.step_batch([active[i] for i in rows], [tokens[i][-1] for i in rows])
            batch_sizes.append(len(rows))
            for i, row_logits in zip(rows, logits):
                tokens[i].append(int(np.argmax(row_logits)))
                if _finished(tokens[i], requests[i], eos):
                    del active[i]  # leaves; the others go on without it
        joining = [i for i, r in enumerate(requests) if r.join_step == step]
        if joining:
            states = [decoder.new_sequence(requests[i].prompt_ids, requests[i].image_embeddings) for i in joining]
            logits = decoder.prefill_batch(states) if len(states) > 1 else decoder.prefill(states[0])[None]
            for i, state, row_logits in zip(joining, states, logits):
                tokens[i].append(int(np.argmax(row_logits)))
                if not _finished(tokens[i], requests[i], eos):
                    active[i] = state
        step += 1
    return tokens, batch_sizes


def test_batched_decode_matches_decoding_alone(case):
    eos = case.spec.tokens.eos
    requests = _requests(case)
    assert requests[2].prompt_ids.size > case.spec.text.sliding_window
    alone = [_decode_alone(case.decoder, r, eos) for r in requests]
    reuses = case.decoder.batch_cache_reuses
    together, batch_sizes = _decode_together(case.decoder, requests, eos)
    assert case.decoder.batch_cache_reuses > reuses, "steady steps must feed the last batch's present as is"
    print(f"\n{case.kind}: batch sizes per step {batch_sizes}; tokens per request {[len(t) for t in alone]}")
    assert together == alone
    assert max(batch_sizes) >= 3, "the schedule must actually batch several requests"


def _prefilled_twice(decoder, requests):
    """Each request prefilled as two independent sequences (to step alone / batched) and its first token."""
    alone_states, batch_states, tokens = [], [], []
    for request in requests:
        for states in (alone_states, batch_states):
            states.append(decoder.new_sequence(request.prompt_ids, request.image_embeddings))
        tokens.append(int(np.argmax(decoder.prefill(alone_states[-1]))))
        decoder.prefill(batch_states[-1])
    return alone_states, batch_states, tokens


def test_step_batch_reuses_the_previous_batch_cache_only_when_it_is_current(case):
    """An unchanged batch feeds the last present as is; a row stepped alone in between forces a rebuild.

    Either way every row's logits are those of step(): a stale batch cache would feed row 0 a cache one
    token short after its lone step.
    """
    decoder = case.decoder
    alone_states, batch_states, tokens = _prefilled_twice(decoder, _requests(case)[:3])

    def step_both(rows, batched: bool):
        expected = np.stack([decoder.step(alone_states[i], tokens[i]) for i in rows])
        if batched:
            got = decoder.step_batch([batch_states[i] for i in rows], [tokens[i] for i in rows])
        else:
            got = np.stack([decoder.step(batch_states[i], tokens[i]) for i in rows])
        np.testing.assert_allclose(got, expected, atol=1e-4 * max(1.0, float(np.abs(expected).max())))
        for i, row in zip(rows, expected):
            tokens[i] = int(np.argmax(row))

    before = decoder.batch_cache_reuses
    step_both([0, 1, 2], batched=True)  # built from the rows' caches
    step_both([0, 1, 2], batched=True)  # the same batch: reused
    assert decoder.batch_cache_reuses == before + 1
    step_both([0], batched=False)  # row 0 moves on alone: the batch cache is stale
    step_both([0, 1, 2], batched=True)
    step_both([2, 1, 0], batched=True)  # same rows, another order: rebuilt
    step_both([1, 2], batched=True)  # a row left: rebuilt
    step_both([1, 2], batched=True)  # reused
    assert decoder.batch_cache_reuses == before + 2
    for alone, batched in zip(alone_states, batch_states):
        assert alone.position == batched.position


def test_step_batch_logits_match_step(case):
    """Rows at different positions (one past the window, one with an image) get the logits of step()."""
    decoder = case.decoder
    alone_states, batch_states, tokens = _prefilled_twice(decoder, _requests(case)[:3])
    for _ in range(3):
        expected = np.stack([decoder.step(s, t) for s, t in zip(alone_states, tokens)])
        got = decoder.step_batch(batch_states, tokens)
        scale = max(1.0, float(np.abs(expected).max()))
        np.testing.assert_allclose(got, expected, atol=1e-4 * scale)
        tokens = [int(t) for t in expected.argmax(axis=-1)]
    for alone, batched in zip(alone_states, batch_states):
        assert alone.position == batched.position
        assert [p.shape for p in alone.past] == [p.shape for p in batched.past]


def test_prefill_batch_matches_prefill(case):
    decoder = case.decoder
    requests = _requests(case)
    alone = np.stack([decoder.prefill(decoder.new_sequence(r.prompt_ids, r.image_embeddings)) for r in requests])
    states = [decoder.new_sequence(r.prompt_ids, r.image_embeddings) for r in requests]
    got = decoder.prefill_batch(states)
    np.testing.assert_allclose(got, alone, atol=1e-4 * max(1.0, float(np.abs(alone).max())))
    assert [s.position for s in states] == [r.prompt_ids.size for r in requests]


def test_step_batch_rejects_bad_inputs(case):
    decoder = case.decoder
    first, second = decoder.new_sequence(np.array([2, 5, 7])), decoder.new_sequence(np.array([2, 9]))
    with pytest.raises(ValueError, match="prefill"):
        decoder.step_batch([first], [5])
    decoder.prefill_batch([first, second])
    with pytest.raises(ValueError, match="2 sequences but 1 token ids"):
        decoder.step_batch([first, second], [5])
    with pytest.raises(ValueError, match="twice"):
        decoder.step_batch([first, first], [5, 6])
    with pytest.raises(ValueError, match="vocabulary"):
        decoder.step_batch([first, second], [5, case.spec.text.vocab_size])
    with pytest.raises(ValueError, match="at least one"):
        decoder.step_batch([], [])
    with pytest.raises(ValueError, match="already prefilled"):
        decoder.prefill_batch([first])


# --- chunked prefill: what the serving engine runs for long prompts ---


def _chunked(decoder, request: Request, chunk_tokens: int) -> tuple[np.ndarray, object]:
    state = decoder.new_sequence(request.prompt_ids, request.image_embeddings)
    logits = None
    for end in decoder.chunk_ends(state.prompt_ids, chunk_tokens):
        assert logits is None  # only the last chunk returns logits
        logits = decoder.prefill_chunk(state, end)
    return logits, state


def test_chunk_ends_never_split_an_image(case):
    decoder, image = case.decoder, case.spec.tokens.image
    mm = case.spec.mm_tokens_per_image
    for request in _requests(case):
        ids = request.prompt_ids
        for chunk_tokens in (0, 1, 7, mm // 2, mm + 3, 64):
            ends = decoder.chunk_ends(ids, chunk_tokens)
            assert ends[-1] == ids.size and all(b > a for a, b in zip([0] + ends, ends))
            for end in ends[:-1]:
                assert not (ids[end] == image and ids[end - 1] == image), (chunk_tokens, end)
            if chunk_tokens:  # no longer than asked, except one whole image (and what leads to it)
                assert max(b - a for a, b in zip([0] + ends, ends)) <= max(chunk_tokens, mm)
    assert decoder.chunk_ends(_requests(case)[0].prompt_ids, 0) == [_requests(case)[0].prompt_ids.size]


@pytest.mark.parametrize("chunk_tokens", [5, 40])
def test_chunked_prefill_matches_one_call_and_decodes_the_same_tokens(case, chunk_tokens):
    """Chunks smaller than an image and beyond the sliding window: the logits of one call (to float
    rounding), the same KV cache, and the same greedy tokens after."""
    decoder, eos = case.decoder, case.spec.tokens.eos
    for request in _requests(case):
        alone_state = decoder.new_sequence(request.prompt_ids, request.image_embeddings)
        alone = decoder.prefill(alone_state)
        chunked, state = _chunked(decoder, request, chunk_tokens)
        np.testing.assert_allclose(chunked, alone, atol=1e-4 * max(1.0, float(np.abs(alone).max())))
        assert state.position == alone_state.position
        assert [p.shape for p in state.past] == [p.shape for p in alone_state.past]
        tokens = [int(np.argmax(chunked))]
        while not _finished(tokens, request, eos):
            tokens.append(int(np.argmax(decoder.step(state, tokens[-1]))))
        assert tokens == _decode_alone(decoder, request, eos)
