"""Incremental detokenization and stop strings with the real Gemma 3 tokenizer (the dev checkpoint's)."""

from __future__ import annotations

import numpy as np
import pytest

from medgemma_triton.runtime.detokenize import (
    REPLACEMENT_CHAR,
    IncrementalDetokenizer,
    StopStrings,
    decode_delta,
    next_offsets,
)
from medgemma_triton.runtime.tokenizer import load_tokenizer

TEXTS = {
    "english": "The chest X-ray shows no acute cardiopulmonary process. Heart size is normal.",
    "french accents": "Élève à l'hôpital : déjà vu, ça coûte cher — où est la façade ?",
    "german": "Größenänderung über die Straße; Lungenentzündung ausgeschlossen. ÄÖÜäöüß",
    "chinese": "胸部X光片显示没有急性心肺疾病。心脏大小正常。",
    "japanese": "胸部レントゲンでは、急性の心肺疾患は認められません。",
    "arabic": "لا تظهر الأشعة السينية للصدر أي عملية قلبية رئوية حادة.",
    "hindi": "छाती के एक्स-रे में कोई तीव्र हृदय-फुफ्फुसीय प्रक्रिया नहीं दिखती।",
    "emoji": "Result 🙂🫁🧑‍⚕️👍🏽 done 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ꙮ𓀀",
    "code": "def triage(x):\n    if x > 0:\n\treturn  'urgent'\n\n\n    # trailing   \n```\n",
    "leading spaces": "   three leading spaces and   inner   runs ",
    "newlines only": "\n\n\n\n",
    "literal sentencepiece marker": "a\u2581b \u2581\u2581c",
}


@pytest.fixture(scope="module")
def tokenizer(dev_checkpoint):
    return load_tokenizer(str(dev_checkpoint))


def generated_ids(tokenizer, text: str) -> list[int]:
    """What generation looks like: text tokens followed by <end_of_turn> <eos> (special, skipped)."""
    return tokenizer.encode(text, add_special_tokens=False).ids + [tokenizer.token_to_id("<end_of_turn>"), 1]


def stream(detokenizer: IncrementalDetokenizer, ids: list[int], chunk_sizes) -> list[str]:
    deltas, position = [], 0
    for size in chunk_sizes:
        if position >= len(ids):
            break
        deltas.append(detokenizer.add(ids[position : position + size]))
        position += size
    deltas.append(detokenizer.add(ids[position:]))
    deltas.append(detokenizer.flush())
    return deltas


@pytest.mark.parametrize("name", list(TEXTS))
def test_token_by_token_deltas_concatenate_to_the_full_decode(tokenizer, name):
    ids = generated_ids(tokenizer, TEXTS[name])
    deltas = stream(IncrementalDetokenizer(tokenizer), ids, [1] * len(ids))
    full = tokenizer.decode(ids, skip_special_tokens=True)
    assert "".join(deltas) == full
    if name != "literal sentencepiece marker":  # a literal '▁' decodes as a space, in the reference too
        assert full == TEXTS[name]
    assert not any(REPLACEMENT_CHAR in delta for delta in deltas)


@pytest.mark.parametrize("seed", range(5))
def test_random_chunks_concatenate_to_the_full_decode(tokenizer, seed):
    rng = np.random.default_rng(seed)
    ids = generated_ids(tokenizer, "".join(TEXTS.values()))
    deltas = stream(IncrementalDetokenizer(tokenizer), ids, rng.integers(0, 5, size=len(ids)).tolist())
    assert "".join(deltas) == tokenizer.decode(ids, skip_special_tokens=True)
    assert not any(REPLACEMENT_CHAR in delta for delta in deltas)


def test_matches_transformers_decode(tokenizer, dev_checkpoint):
    from transformers import AutoTokenizer

    reference = AutoTokenizer.from_pretrained(dev_checkpoint)
    for text in TEXTS.values():
        ids = [2] + generated_ids(tokenizer, text)
        deltas = stream(IncrementalDetokenizer(tokenizer), ids, [1] * len(ids))
        assert "".join(deltas) == reference.decode(ids, skip_special_tokens=True)


def test_emoji_uses_byte_fallback_and_waits_for_the_whole_character(tokenizer):
    ids = tokenizer.encode("🫁", add_special_tokens=False).ids
    pieces = [tokenizer.id_to_token(i) for i in ids]
    assert len(ids) == 4 and all(p.startswith("<0x") for p in pieces), pieces  # one byte token per UTF-8 byte
    detokenizer = IncrementalDetokenizer(tokenizer)
    assert [detokenizer.add([i]) for i in ids] == ["", "", "", "🫁"]


def test_incomplete_character_at_the_end_flushes_like_decode(tokenizer):
    ids = tokenizer.encode("ok 🫁", add_special_tokens=False).ids[:-1]
    detokenizer = IncrementalDetokenizer(tokenizer)
    streamed = "".join(detokenizer.add([i]) for i in ids)
    assert REPLACEMENT_CHAR not in streamed
    assert streamed + detokenizer.flush() == tokenizer.decode(ids, skip_special_tokens=True)


def test_special_tokens_are_skipped(tokenizer):
    specials = ["<start_of_turn>", "<end_of_turn>", "<start_of_image>", "<image_soft_token>", "<eos>", "<pad>"]
    ids = []
    for special in specials:
        ids += tokenizer.encode("word", add_special_tokens=False).ids + [tokenizer.token_to_id(special)]
    deltas = stream(IncrementalDetokenizer(tokenizer), ids, [1] * len(ids))
    assert "".join(deltas) == "word" * len(specials)


def test_stateless_decode_delta_gives_the_same_text(tokenizer):
    """The split between models: one side keeps (window, read_offset), a stateless step calls decode_delta."""
    ids = generated_ids(tokenizer, TEXTS["emoji"] + TEXTS["hindi"])
    detokenizer = IncrementalDetokenizer(tokenizer)
    window, read_offset = [], 0
    for token in ids:
        window.append(token)
        text, complete = decode_delta(tokenizer, window, read_offset)
        assert text == detokenizer.add([token])
        drop, read_offset = next_offsets(len(window), read_offset, text, complete)
        del window[:drop]
        assert (window, read_offset) == detokenizer.window


def test_window_stays_short(tokenizer):
    ids = generated_ids(tokenizer, TEXTS["english"] * 20)
    detokenizer = IncrementalDetokenizer(tokenizer)
    for token in ids:
        detokenizer.add([token])
        assert len(detokenizer.window[0]) <= 8


# --- stop strings ---


def stop_stream(stop_words, deltas):
    stop = StopStrings(stop_words)
    emitted, matched = [], False
    for delta in deltas:
        text, matched = stop.feed(delta)
        emitted.append(text)
        if matched:
            break
    if not matched:
        emitted.append(stop.flush())
    return "".join(emitted), matched, emitted


def token_deltas(tokenizer, text: str) -> list[str]:
    detokenizer = IncrementalDetokenizer(tokenizer)
    return [detokenizer.add([i]) for i in tokenizer.encode(text, add_special_tokens=False).ids]


def test_stop_word_across_token_boundaries(tokenizer):
    deltas = token_deltas(tokenizer, "Findings: normal.\nIMPRESSION_END and more text")
    assert not any("IMPRESSION_END" in d for d in deltas)  # the stop word spans several tokens
    text, matched, _ = stop_stream(["IMPRESSION_END"], deltas)
    assert (text, matched) == ("Findings: normal.\n", True)


def test_stop_word_split_inside_a_delta_and_multibyte(tokenizer):
    text, matched, _ = stop_stream(["。心"], token_deltas(tokenizer, TEXTS["chinese"]))
    assert (text, matched) == ("胸部X光片显示没有急性心肺疾病", True)


def test_partial_match_is_held_back_then_released():
    text, matched, emitted = stop_stream(["STOP"], ["Go ", "ST", "O", "ny", " road"])
    assert (text, matched) == ("Go STOny road", False)
    assert emitted[:3] == ["Go ", "", ""]  # "ST", "STO" could start the stop word


def test_earliest_stop_word_wins_and_nothing_after_a_match():
    stop = StopStrings(["world", "lo w"])
    assert stop.feed("hel") == ("he", False)  # "l" could start "lo w"
    assert stop.feed("lo world") == ("l", True)  # "lo w" starts before "world"
    assert stop.feed("more") == ("", True)
    assert stop.flush() == ""


def test_no_stop_words_passes_text_through():
    assert stop_stream([], ["a", "b"])[:2] == ("ab", False)


def test_stop_word_at_the_very_start():
    assert stop_stream(["\n\n"], ["\n", "\nrest"])[:2] == ("", True)


def test_empty_stop_word_is_refused():
    with pytest.raises(ValueError, match="non-empty"):
        StopStrings(["ok", ""])
