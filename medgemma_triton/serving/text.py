"""One request's generated text, in the `medgemma` model: token ids in, text deltas and stop words out.

The llm only generates token ids. The pipeline decodes them once, here, incrementally
(runtime.detokenize.IncrementalDetokenizer), and applies the stop words to that text
(runtime.detokenize.StopStrings, which may hold back text that could begin a stop word and cuts the
output before one). Both profiles' llms share this: what a client receives cannot tell them apart.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer

from medgemma_triton.runtime.detokenize import IncrementalDetokenizer, StopStrings


class SequenceText:
    """Generated ids in; stop-word matches and the text released since the last take_text() out."""

    def __init__(self, tokenizer: Tokenizer, stop_words: Iterable[str] = ()):
        self.ids: list[int] = []
        self._detokenizer = IncrementalDetokenizer(tokenizer)
        self._stops = StopStrings(stop_words)
        self.text = ""  # released text (never logged)
        self._taken_chars = 0  # of that, what take_text() has returned
        self.stopped = False

    def add(self, token_id: int) -> bool:
        """Append a generated token; True when a stop word matched (the text ends before it)."""
        self.ids.append(int(token_id))
        self._release(*self._stops.feed(self._detokenizer.add([token_id])))
        return self.stopped

    def finish(self) -> None:
        """End of generation: release what was held back (unless a stop word cut it off)."""
        if self.stopped:
            return
        released, matched = self._stops.feed(self._detokenizer.flush())
        self._release(released, matched)
        if not matched:
            self._release(self._stops.flush(), False)

    def _release(self, text: str, matched: bool) -> None:
        self.text += text
        self.stopped = self.stopped or matched

    def take_text(self) -> str:
        """The text released since the previous call: the next response's `text_output`."""
        delta = self.text[self._taken_chars :]
        self._taken_chars = len(self.text)
        return delta
