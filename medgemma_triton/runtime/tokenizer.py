"""The checkpoint's fast tokenizer (tokenizer.json) and the special-token strings its chat template sees.

Loaded with `tokenizers` alone: transformers' GemmaTokenizer wraps the same tokenizer.json unchanged
(same normalizer, pre-tokenizer, BOS post-processor and decoder), so ids and decodes are identical.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

from tokenizers import Tokenizer

# transformers' SPECIAL_TOKENS_ATTRIBUTES: the names apply_chat_template passes to the template
_STANDARD_SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


@lru_cache(maxsize=4)
def load_tokenizer(checkpoint_dir: str | Path) -> Tokenizer:
    """One shared Tokenizer per checkpoint (tokenizer.json is ~33 MB; parsing it takes about a second)."""
    return Tokenizer.from_file(str(Path(checkpoint_dir) / "tokenizer.json"))


def _token_text(value) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):  # serialized AddedToken
        return value["content"]
    return None


def special_tokens_map(checkpoint_dir: str | Path) -> dict[str, str]:
    """What `tokenizer.special_tokens_map` holds: the template variables bos_token, eos_token, boi_token, ..."""
    path = Path(checkpoint_dir) / "tokenizer_config.json"
    config = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    tokens = {}
    for name in _STANDARD_SPECIAL_TOKENS:
        text = _token_text(config.get(name))
        if text is not None:
            tokens[name] = text
    # google/medgemma-4b-it: extra_special_tokens; transformers 5 saves model_specific_special_tokens
    for key in ("extra_special_tokens", "model_specific_special_tokens"):
        extra = config.get(key)
        if isinstance(extra, dict):
            for name, value in extra.items():
                text = _token_text(value)
                if text is not None:
                    tokens[name] = text
    return tokens
