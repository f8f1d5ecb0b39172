"""Sampling parameters (validated request values) and a numpy sampler with transformers' semantics.

temperature 0 is greedy (do_sample=False, the MedGemma model card's setting): argmax, first index on
ties like torch.argmax. Otherwise, in the order of transformers' logits warpers: temperature, top-k
(keeps every token tied with the k-th logit), top-p (drops the lowest tokens whose cumulative
probability stays <= 1 - top_p, always keeping the most likely one), softmax, then one draw from a
numpy Generator seeded with `seed` (the same seed and logits give the same tokens).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from medgemma_triton.contract import SAMPLING_DEFAULTS
from medgemma_triton.runtime.limits import InvalidRequest, Limits, check_unicode

MAX_TEMPERATURE = 2.0
MAX_SEED = 2**64 - 1


def _scalar(name: str, value):
    """A request value as a Python scalar: Triton hands over numpy arrays of shape [1] or [1, 1]."""
    if isinstance(value, np.ndarray):
        if value.size != 1:
            raise InvalidRequest(f"{name} must be a single value, got {value.size} values")
        value = value.reshape(-1)[0]
    if isinstance(value, np.generic):
        value = value.item()
    return value


def _integer(name: str, value) -> int:
    value = _scalar(name, value)
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise InvalidRequest(f"{name} must be an integer, got {value!r}")
    return value


def _real(name: str, value) -> float:
    value = _scalar(name, value)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidRequest(f"{name} must be a number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise InvalidRequest(f"{name} must be a finite number, got {value}")
    return value


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = SAMPLING_DEFAULTS.max_tokens
    temperature: float = SAMPLING_DEFAULTS.temperature
    top_p: float = SAMPLING_DEFAULTS.top_p
    top_k: int = SAMPLING_DEFAULTS.top_k
    seed: int = SAMPLING_DEFAULTS.seed
    stop: tuple[str, ...] = ()

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @classmethod
    def from_request(
        cls,
        limits: Limits,
        vocab_size: int,
        max_tokens=None,
        temperature=None,
        top_p=None,
        top_k=None,
        seed=None,
        stop: Sequence[str | bytes] | None = None,
    ) -> "SamplingParams":
        """Validated parameters; None (an absent optional input) takes contract.SAMPLING_DEFAULTS."""
        d = SAMPLING_DEFAULTS
        max_tokens = d.max_tokens if max_tokens is None else _integer("max_tokens", max_tokens)
        if not 1 <= max_tokens <= limits.max_new_tokens:
            raise InvalidRequest(
                f"max_tokens is {max_tokens}; it must be between 1 and {limits.max_new_tokens} "
                f"({Limits.env_name('max_new_tokens')})"
            )
        temperature = d.temperature if temperature is None else _real("temperature", temperature)
        if not 0.0 <= temperature <= MAX_TEMPERATURE:
            raise InvalidRequest(
                f"temperature is {temperature}; it must be between 0 and {MAX_TEMPERATURE:g} (0 means greedy)"
            )
        top_p = d.top_p if top_p is None else _real("top_p", top_p)
        if not 0.0 < top_p <= 1.0:
            raise InvalidRequest(f"top_p is {top_p}; it must be in (0, 1] (1 means no top-p filter)")
        top_k = d.top_k if top_k is None else _integer("top_k", top_k)
        if not 0 <= top_k <= vocab_size:
            raise InvalidRequest(
                f"top_k is {top_k}; it must be between 0 and the vocabulary size {vocab_size} (0 means no top-k filter)"
            )
        seed = d.seed if seed is None else _integer("random_seed", seed)
        if not 0 <= seed <= MAX_SEED:
            raise InvalidRequest(f"random_seed is {seed}; it must be between 0 and 2**64-1")
        return cls(
            max_tokens=max_tokens,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            seed=seed,
            stop=_stop_words(stop, limits),
        )


def _stop_words(stop, limits: Limits) -> tuple[str, ...]:
    if stop is None:
        return ()
    if isinstance(stop, (str, bytes)):
        stop = [stop]
    elif isinstance(stop, np.ndarray):  # Triton STRING tensor: object array of bytes
        stop = stop.reshape(-1).tolist()
    words = []
    for i, word in enumerate(stop):
        if isinstance(word, bytes):
            try:
                word = word.decode("utf-8")
            except UnicodeDecodeError:
                raise InvalidRequest(f"stop_words[{i}] is not valid UTF-8") from None
        if not isinstance(word, str):
            raise InvalidRequest(f"stop_words[{i}] must be a string, got {word!r}")
        check_unicode(word, f"stop_words[{i}]")
        if not word:
            raise InvalidRequest(f"stop_words[{i}] is empty; stop words must be non-empty strings")
        if len(word) > limits.max_stop_word_chars:
            raise InvalidRequest(
                f"stop_words[{i}] is {len(word)} characters; the limit is {limits.max_stop_word_chars} "
                f"({Limits.env_name('max_stop_word_chars')})"
            )
        words.append(word)
    if len(words) > limits.max_stop_words:
        raise InvalidRequest(
            f"{len(words)} stop words were sent; the limit is {limits.max_stop_words} "
            f"({Limits.env_name('max_stop_words')})"
        )
    return tuple(words)


def filter_logits(logits: np.ndarray, temperature: float, top_k: int, top_p: float) -> np.ndarray:
    """transformers' TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper on one row (float64).

    Filtered tokens become -inf; at least one token always survives.
    """
    scores = np.asarray(logits, dtype=np.float64) / temperature
    if 0 < top_k < scores.shape[-1]:
        kth_largest = np.partition(scores, -top_k)[-top_k]
        scores = np.where(scores < kth_largest, -np.inf, scores)
    if top_p < 1.0:
        ascending = np.argsort(scores, kind="stable")
        cumulative = np.cumsum(_softmax(scores[ascending]))
        remove_sorted = cumulative <= 1.0 - top_p
        remove_sorted[-1] = False  # min_tokens_to_keep=1
        scores = scores.copy()
        scores[ascending[remove_sorted]] = -np.inf
    return scores


def _softmax(scores: np.ndarray) -> np.ndarray:
    exp = np.exp(scores - np.max(scores))
    return exp / exp.sum()


class Sampler:
    """Picks the next token from one row of logits; holds the request's seeded random generator."""

    def __init__(self, params: SamplingParams):
        self.params = params
        self._rng = np.random.Generator(np.random.PCG64(params.seed))

    def probabilities(self, logits: np.ndarray) -> np.ndarray:
        p = self.params
        return _softmax(filter_logits(logits, p.temperature, p.top_k, p.top_p))

    def sample(self, logits: np.ndarray) -> int:
        row = np.asarray(logits).reshape(-1)
        if self.params.greedy:
            return int(np.argmax(row))  # first index among ties, as torch.argmax
        probs = self.probabilities(row)
        cdf = np.cumsum(probs)
        draw = self._rng.random() * cdf[-1]
        index = int(np.searchsorted(cdf, draw, side="right"))
        if index >= row.shape[0]:  # draw rounded up to the total: take the last token that can be drawn
            index = int(np.flatnonzero(probs)[-1])
        return index
