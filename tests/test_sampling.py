"""Sampling parameters and the numpy sampler, against transformers' logits warpers where they exist."""

from __future__ import annotations

import re

import numpy as np
import pytest

from medgemma_triton.contract import SAMPLING_DEFAULTS
from medgemma_triton.runtime.limits import InvalidRequest, Limits
from medgemma_triton.runtime.sampling import Sampler, SamplingParams, filter_logits

LIMITS = Limits()
VOCAB = 262_208


def params(**request) -> SamplingParams:
    return SamplingParams.from_request(LIMITS, VOCAB, **request)


def test_defaults_come_from_the_contract():
    p = params()
    assert (p.max_tokens, p.temperature, p.top_p, p.top_k, p.seed, p.stop) == (
        SAMPLING_DEFAULTS.max_tokens,
        SAMPLING_DEFAULTS.temperature,
        SAMPLING_DEFAULTS.top_p,
        SAMPLING_DEFAULTS.top_k,
        SAMPLING_DEFAULTS.seed,
        (),
    )
    assert p.greedy


def test_triton_shaped_values_are_accepted():
    p = params(
        max_tokens=np.array([[64]], dtype=np.int32),
        temperature=np.array([0.7], dtype=np.float32),
        top_k=np.int32(40),
        seed=np.array([2**64 - 1], dtype=np.uint64),
        stop=np.array([b"END", "Fin\u00e9".encode()], dtype=object),
    )
    assert (p.max_tokens, p.top_k, p.seed, p.stop) == (64, 40, 2**64 - 1, ("END", "Fin\u00e9"))
    assert p.temperature == pytest.approx(0.7)


BAD = [
    ({"max_tokens": 0}, "max_tokens is 0; it must be between 1 and 8192 (MEDGEMMA_MAX_NEW_TOKENS)"),
    ({"max_tokens": 9000}, "max_tokens is 9000; it must be between 1 and 8192"),
    ({"max_tokens": 1.5}, "max_tokens must be an integer"),
    ({"max_tokens": np.array([1, 2])}, "max_tokens must be a single value, got 2 values"),
    ({"temperature": -0.1}, "temperature is -0.1; it must be between 0 and 2 (0 means greedy)"),
    ({"temperature": 2.5}, "temperature is 2.5; it must be between 0 and 2"),
    ({"temperature": float("nan")}, "temperature must be a finite number"),
    ({"temperature": "hot"}, "temperature must be a number"),
    ({"top_p": 0.0}, "top_p is 0.0; it must be in (0, 1]"),
    ({"top_p": 1.01}, "top_p is 1.01; it must be in (0, 1]"),
    ({"top_k": -1}, "top_k is -1; it must be between 0 and the vocabulary size 262208 (0 means no top-k filter)"),
    ({"top_k": VOCAB + 1}, f"top_k is {VOCAB + 1}; it must be between 0 and the vocabulary size"),
    ({"seed": -1}, "random_seed is -1; it must be between 0 and 2**64-1"),
    ({"seed": 2**64}, "random_seed is 18446744073709551616; it must be between 0 and 2**64-1"),
    ({"stop": [""]}, "stop_words[0] is empty"),
    ({"stop": ["ok", 3]}, "stop_words[1] must be a string"),
    ({"stop": [b"\xff"]}, "stop_words[0] is not valid UTF-8"),
    ({"stop": ["ok", "a\ud800"]}, "stop_words[1] is not valid Unicode text: character 1 is the unpaired surrogate U+D800"),
    ({"stop": ["x" * 257]}, "stop_words[0] is 257 characters; the limit is 256 (MEDGEMMA_MAX_STOP_WORD_CHARS)"),
    ({"stop": ["w"] * 17}, "17 stop words were sent; the limit is 16 (MEDGEMMA_MAX_STOP_WORDS)"),
]


@pytest.mark.parametrize("request_values, problem", BAD)
def test_validation_messages(request_values, problem):
    with pytest.raises(InvalidRequest, match=re.escape(problem)):
        params(**request_values)


def test_limits_set_the_ranges():
    with pytest.raises(InvalidRequest, match=re.escape("between 1 and 10 (MEDGEMMA_MAX_NEW_TOKENS)")):
        SamplingParams.from_request(Limits(max_new_tokens=10), VOCAB, max_tokens=11)


def test_greedy_takes_the_first_of_tied_maxima():
    logits = np.array([0.5, 3.0, -1.0, 3.0, 3.0], dtype=np.float32)
    sampler = Sampler(params(temperature=0.0, top_k=1, top_p=0.1, seed=5))
    assert [sampler.sample(logits) for _ in range(3)] == [1, 1, 1]


def kept(scores: np.ndarray) -> set[int]:
    return set(np.flatnonzero(np.isfinite(scores)).tolist())


def test_top_k_keep_sets():
    logits = np.log(np.array([0.1, 0.4, 0.2, 0.2, 0.05, 0.05]))
    assert kept(filter_logits(logits, 1.0, top_k=1, top_p=1.0)) == {1}
    assert kept(filter_logits(logits, 1.0, top_k=2, top_p=1.0)) == {1, 2, 3}  # ties with the k-th survive
    assert kept(filter_logits(logits, 1.0, top_k=4, top_p=1.0)) == {0, 1, 2, 3}
    assert kept(filter_logits(logits, 1.0, top_k=0, top_p=1.0)) == set(range(6))


def test_top_p_keep_sets():
    logits = np.log(np.array([0.05, 0.5, 0.15, 0.3]))
    # ascending cumulative: 0.05, 0.20, 0.50, 1.00; removed while <= 1 - top_p
    assert kept(filter_logits(logits, 1.0, top_k=0, top_p=0.75)) == {1, 3}
    assert kept(filter_logits(logits, 1.0, top_k=0, top_p=0.9)) == {1, 2, 3}
    assert kept(filter_logits(logits, 1.0, top_k=0, top_p=0.3)) == {1}
    assert kept(filter_logits(logits, 1.0, top_k=0, top_p=1e-9)) == {1}  # at least one token is kept
    # top-k first, then top-p over the renormalized survivors (0.5/0.8, 0.3/0.8)
    assert kept(filter_logits(logits, 1.0, top_k=2, top_p=0.6)) == {1}
    assert kept(filter_logits(logits, 1.0, top_k=2, top_p=0.7)) == {1, 3}


def test_filters_match_transformers_warpers():
    import torch
    from transformers.generation.logits_process import (
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    rng = np.random.default_rng(0)
    for temperature, top_k, top_p in [(0.7, 50, 0.9), (1.3, 0, 0.5), (1.0, 5, 1.0), (0.2, 1000, 0.95)]:
        logits = (rng.standard_normal(4096) * 3).astype(np.float32)
        scores = torch.from_numpy(logits)[None]
        for warper in (
            TemperatureLogitsWarper(temperature),
            TopKLogitsWarper(top_k) if top_k else None,
            TopPLogitsWarper(top_p) if top_p < 1.0 else None,
        ):
            if warper is not None:
                scores = warper(None, scores)
        assert kept(filter_logits(logits, temperature, top_k, top_p)) == kept(scores[0].numpy())


def test_same_seed_same_tokens_and_different_seeds_differ():
    logits = np.random.default_rng(1).standard_normal(1000)

    def run(seed):
        sampler = Sampler(params(temperature=1.0, seed=seed))
        return [sampler.sample(logits) for _ in range(50)]

    assert run(1234) == run(1234)
    assert run(1234) != run(1235)
    assert run(2**64 - 1) == run(2**64 - 1)


def test_samples_follow_the_filtered_distribution():
    logits = np.log(np.array([0.05, 0.5, 0.15, 0.3]))
    sampler = Sampler(params(temperature=1.0, top_p=0.9, seed=7))
    counts = np.bincount([sampler.sample(logits) for _ in range(4000)], minlength=4)
    assert counts[0] == 0  # removed by top-p
    np.testing.assert_allclose(counts[1:] / 4000, np.array([0.5, 0.15, 0.3]) / 0.95, atol=0.03)


def test_temperature_sharpens_or_flattens():
    logits = np.array([2.0, 1.0, 0.0, -1.0])

    def top_share(temperature):
        sampler = Sampler(params(temperature=temperature, seed=3))
        return np.mean([sampler.sample(logits) == 0 for _ in range(2000)])

    cold, neutral, hot = top_share(0.1), top_share(1.0), top_share(2.0)
    assert cold > 0.99
    assert neutral == pytest.approx(np.exp(2) / np.exp(logits).sum(), abs=0.04)
    assert hot < neutral - 0.1
    np.testing.assert_allclose(
        Sampler(params(temperature=2.0)).probabilities(logits), np.exp(logits / 2) / np.exp(logits / 2).sum()
    )


def test_filtered_tokens_are_never_drawn():
    logits = np.array([0.0, 10.0, 9.0, -np.inf, 8.0])
    sampler = Sampler(params(temperature=2.0, top_k=2, seed=11))
    assert set(sampler.sample(logits) for _ in range(500)) == {1, 2}
