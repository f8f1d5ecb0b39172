"""One sequence's generated text on the `llm` side, and the window `postprocessing` rebuilds it from.

The llm needs the text to apply stop words (runtime.detokenize.StopStrings, which may hold back
text that could begin a stop word and cut the output before one). `postprocessing` is stateless:
each response carries a token window and four numbers, and
    text_output = window_text(window_ids, read_offset)[text_offset : text_offset + text_chars]
where window_text is the text window_ids[read_offset:] add after window_ids[:read_offset]. The
window starts a few tokens before a point where decoding was complete, so its left context makes
the decode match the llm's incremental one (the invariant runtime.detokenize is tested for).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from tokenizers import Tokenizer

from medgemma_triton.runtime.detokenize import IncrementalDetokenizer, StopStrings, decode_delta

CONTEXT_TOKENS = 4  # left context decoded but not emitted, as vLLM's prefix offset


@dataclass(frozen=True)
class TextWindow:
    window_ids: list[int]
    read_offset: int
    text_offset: int
    text_chars: int


def window_text(tokenizer: Tokenizer, window_ids: Sequence[int], read_offset: int) -> str:
    """decode_delta, plus what a final flush emits when the window ends inside a character."""
    text, complete = decode_delta(tokenizer, window_ids, read_offset)
    if complete:
        return text
    prefix = tokenizer.decode(list(window_ids[:read_offset]), skip_special_tokens=True)
    return tokenizer.decode(list(window_ids), skip_special_tokens=True)[len(prefix) :]


def render(tokenizer: Tokenizer, window: TextWindow) -> str:
    """What postprocessing returns for one response."""
    if window.text_chars <= 0:
        return ""
    text = window_text(tokenizer, window.window_ids, window.read_offset)
    return text[window.text_offset : window.text_offset + window.text_chars]


class SequenceText:
    """Generated ids in; stop-word matches and the windows for each response out."""

    def __init__(self, tokenizer: Tokenizer, stop_words: Iterable[str] = ()):
        self.ids: list[int] = []
        self._detokenizer = IncrementalDetokenizer(tokenizer)
        self._stops = StopStrings(stop_words)
        self._decoded_chars = 0  # text the detokenizer has produced
        self._released_chars = 0  # of that, what stop-word handling lets out
        self._emitted_chars = 0  # of that, what responses have carried
        self._checkpoints: list[tuple[int, int]] = [(0, 0)]  # (tokens, chars) where decoding was complete
        self.text = ""  # released text, for tests (never logged)
        self.stopped = False

    def add(self, token_id: int) -> bool:
        """Append a generated token; True when a stop word matched (the text ends before it)."""
        self.ids.append(int(token_id))
        delta = self._detokenizer.add([token_id])
        if delta:
            self._decoded_chars += len(delta)
            self._checkpoints.append((len(self.ids), self._decoded_chars))
        self._release(*self._stops.feed(delta))
        return self.stopped

    def finish(self) -> None:
        """End of generation: release what was held back (unless a stop word cut it off)."""
        if self.stopped:
            return
        tail = self._detokenizer.flush()
        self._decoded_chars += len(tail)
        released, matched = self._stops.feed(tail)
        self._release(released, matched)
        if not matched:
            self._release(self._stops.flush(), False)

    def _release(self, text: str, matched: bool) -> None:
        self._released_chars += len(text)
        self.text += text
        self.stopped = self.stopped or matched

    def take_window(self) -> TextWindow:
        """The window for the next response: everything released since the previous one."""
        tokens, chars = max(cp for cp in self._checkpoints if cp[1] <= self._emitted_chars)
        start = max(0, tokens - CONTEXT_TOKENS)
        window = TextWindow(
            window_ids=self.ids[start:],
            read_offset=tokens - start,
            text_offset=self._emitted_chars - chars,
            text_chars=self._released_chars - self._emitted_chars,
        )
        self._emitted_chars = self._released_chars
        # checkpoints before the one just used are never needed again
        self._checkpoints = [cp for cp in self._checkpoints if cp >= (tokens, chars)]
        return window
