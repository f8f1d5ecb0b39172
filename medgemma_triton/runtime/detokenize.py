"""Incremental detokenization and stop strings, for the `medgemma` model (serving/text.py).

Text for new tokens is the difference between two decodes of a short window (the prefix/read-offset
technique of vLLM and TGI): decode(window) minus decode(window[:read_offset]). Decoding a window
rather than single tokens keeps whatever the decoder does across token boundaries (SentencePiece
'▁' -> ' ', byte-fallback tokens <0xE4><0xB8><0xAD> that form one UTF-8 character). A window whose
decode ends in U+FFFD stops inside a multi-byte character: its text is held back until the
character completes (or until flush(), which emits what full decoding would emit).
Special tokens (<end_of_turn>, <eos>, image tokens) are skipped, as decode(skip_special_tokens=True).

Invariant (tested): the concatenated deltas equal tokenizer.decode(all_ids, skip_special_tokens=True).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from tokenizers import Tokenizer

REPLACEMENT_CHAR = "\ufffd"


def decode_delta(tokenizer: Tokenizer, window_ids: Sequence[int], read_offset: int) -> tuple[str, bool]:
    """Text that window_ids[read_offset:] add after window_ids[:read_offset], and whether it is complete.

    Pure: the state is the window and its read offset (IncrementalDetokenizer keeps them).
    complete=False means the window ends inside a character: the text is "" and nothing advances.
    """
    ids = list(window_ids)
    prefix_text = tokenizer.decode(ids[:read_offset], skip_special_tokens=True)
    full_text = tokenizer.decode(ids, skip_special_tokens=True)
    if full_text.endswith(REPLACEMENT_CHAR):
        return "", False
    return full_text[len(prefix_text) :], True


def next_offsets(window_len: int, read_offset: int, text: str, complete: bool) -> tuple[int, int]:
    """(how many window tokens to drop from the front, new read offset in the shortened window).

    After a complete, non-empty delta the next window starts at the old read offset (the tokens just
    emitted give the next decode its left context) and everything in it has been read.
    """
    if complete and text:
        return read_offset, window_len - read_offset
    return 0, read_offset


class IncrementalDetokenizer:
    """Token ids in, text deltas out, for one sequence."""

    def __init__(self, tokenizer: Tokenizer, prompt_tail: Sequence[int] = ()):
        """`prompt_tail`: optional last prompt tokens, read but never emitted (left context for the decoder)."""
        self.tokenizer = tokenizer
        self._window: list[int] = list(prompt_tail)
        self._read_offset = len(self._window)

    @property
    def window(self) -> tuple[list[int], int]:
        """The current (window ids, read offset): what a stateless decode_delta call needs."""
        return list(self._window), self._read_offset

    def add(self, token_ids: Iterable[int]) -> str:
        self._window.extend(int(t) for t in token_ids)
        if len(self._window) == self._read_offset:
            return ""
        text, complete = decode_delta(self.tokenizer, self._window, self._read_offset)
        drop, self._read_offset = next_offsets(len(self._window), self._read_offset, text, complete)
        del self._window[:drop]
        return text

    def flush(self) -> str:
        """What is held back at the end of generation (an incomplete character decodes to U+FFFD, as decode() does)."""
        if len(self._window) == self._read_offset:
            return ""
        prefix_text = self.tokenizer.decode(self._window[: self._read_offset], skip_special_tokens=True)
        full_text = self.tokenizer.decode(self._window, skip_special_tokens=True)
        self._window = []
        self._read_offset = 0
        return full_text[len(prefix_text) :]


class StopStrings:
    """Stop words over a stream of text deltas (OpenAI / TensorRT-LLM semantics).

    feed() returns the text that is safe to emit now and whether a stop word matched. Text that could
    be the start of a stop word is held back until it cannot be; on a match the output ends just
    before the earliest stop word, which is never emitted.
    """

    def __init__(self, stop_words: Iterable[str]):
        self.stop_words = tuple(stop_words)
        if any(not word for word in self.stop_words):
            raise ValueError("stop words must be non-empty strings")
        self._pending = ""
        self.matched = False

    def feed(self, delta: str) -> tuple[str, bool]:
        if self.matched:
            return "", True
        if not self.stop_words:
            return delta, False
        text = self._pending + delta
        positions = [i for i in (text.find(word) for word in self.stop_words) if i >= 0]
        if positions:
            self.matched = True
            self._pending = ""
            return text[: min(positions)], True
        hold = self._held_suffix_length(text)
        self._pending = text[len(text) - hold :]
        return text[: len(text) - hold], False

    def flush(self) -> str:
        """At the end of generation without a match: the held-back text."""
        text, self._pending = self._pending, ""
        return "" if self.matched else text

    def _held_suffix_length(self, text: str) -> int:
        longest = 0
        for word in self.stop_words:
            for length in range(min(len(word) - 1, len(text)), longest, -1):
                if text.endswith(word[:length]):
                    longest = length
                    break
        return longest
