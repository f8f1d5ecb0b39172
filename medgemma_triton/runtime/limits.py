"""Request limits, each overridable by one environment variable named in its error messages."""

from __future__ import annotations

import os
from dataclasses import dataclass, fields


class InvalidRequest(ValueError):
    """Bad input from a client: becomes gRPC INVALID_ARGUMENT with this message."""


@dataclass(frozen=True)
class Limits:
    max_images: int = 128  # MEDGEMMA_MAX_IMAGES (a CT or MR volume is sent as 85 slices)
    max_image_bytes: int = 32 * 1024 * 1024  # MEDGEMMA_MAX_IMAGE_BYTES (encoded size)
    max_image_pixels: int = 8192 * 8192  # MEDGEMMA_MAX_IMAGE_PIXELS (decoded width*height)
    max_image_side: int = 16384  # MEDGEMMA_MAX_IMAGE_SIDE
    max_messages_bytes: int = 1024 * 1024  # MEDGEMMA_MAX_MESSAGES_BYTES
    max_input_tokens: int = 32768  # MEDGEMMA_MAX_INPUT_TOKENS (prompt incl. image tokens; 85 slices: ~22,000 at 4B)
    max_new_tokens: int = 8192  # MEDGEMMA_MAX_NEW_TOKENS (upper bound for max_tokens)
    max_stop_words: int = 16  # MEDGEMMA_MAX_STOP_WORDS
    max_stop_word_chars: int = 256  # MEDGEMMA_MAX_STOP_WORD_CHARS
    # Requests the llm keeps waiting for a decode slot (beyond max_active_requests); more are refused as busy.
    max_queued: int = 32  # MEDGEMMA_MAX_QUEUED

    @staticmethod
    def env_name(field_name: str) -> str:
        return "MEDGEMMA_" + field_name.upper()

    @classmethod
    def from_env(cls, environ=os.environ) -> "Limits":
        values = {}
        for f in fields(cls):
            raw = environ.get(cls.env_name(f.name))
            if raw is None:
                continue
            try:
                value = int(raw)
            except ValueError:
                raise ValueError(f"{cls.env_name(f.name)}={raw!r} is not an integer") from None
            if value <= 0:
                raise ValueError(f"{cls.env_name(f.name)}={value} must be positive")
            values[f.name] = value
        return cls(**values)


def check_unicode(text: str, where: str) -> None:
    """A lone JSON "\\ud800" escape decodes to a surrogate: a str no tokenizer or UTF-8 encoder accepts."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        code = ord(text[exc.start])
        raise InvalidRequest(
            f"{where} is not valid Unicode text: character {exc.start} is the unpaired surrogate U+{code:04X} "
            f"(in JSON, a \\u{code:04x} escape without the other half of its pair); send whole characters, "
            "as UTF-8 or as complete escape pairs"
        ) from None
