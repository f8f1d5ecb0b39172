"""A chat completions request body -> the sampling keywords of client.build_request.

Every body key is either supported, ignored because it cannot change the answer (`user`), accepted
only at the value that means "off" (`n: 1`, `logprobs: false`, `presence_penalty: 0`, ...), or refused
by name: a caller who asks for something this model does not do gets a 400 naming it instead of an
answer that silently lacks it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass

from medgemma_triton.gateway.errors import invalid
from medgemma_triton.runtime.limits import Limits

UINT64 = 2**64

# hints about who is asking or how to cache; they cannot change what is generated
IGNORED = {"user", "safety_identifier", "prompt_cache_key"}


# parameter -> whether a value leaves the feature off (and so can be accepted and ignored)
NEUTRAL = {
    "n": lambda v: v is None or (type(v) is int and v == 1),
    "logprobs": lambda v: v is None or v is False,
    "top_logprobs": lambda v: v is None or (type(v) is int and v == 0),
    "presence_penalty": lambda v: v is None or (type(v) in (int, float) and v == 0),
    "frequency_penalty": lambda v: v is None or (type(v) in (int, float) and v == 0),
    "logit_bias": lambda v: v is None or v == {},
    "tools": lambda v: v is None or v == [],
    "tool_choice": lambda v: v is None or v == "none",
    "parallel_tool_calls": lambda v: v is None,
    "functions": lambda v: v is None or v == [],
    "function_call": lambda v: v is None or v == "none",
    "response_format": lambda v: v is None or v == {"type": "text"},
    "modalities": lambda v: v is None or v == ["text"],
    "audio": lambda v: v is None,
    "prediction": lambda v: v is None,
    "reasoning_effort": lambda v: v is None,
    "web_search_options": lambda v: v is None,
    "store": lambda v: v is None or v is False,
    "metadata": lambda v: v is None or v == {},
    "service_tier": lambda v: v is None or v in ("auto", "default"),
    "verbosity": lambda v: v is None,
}
SUPPORTED = {"model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "seed",
             "stop", "stream", "stream_options"}


@dataclass(frozen=True)
class ChatParams:
    model: str
    messages: list
    stream: bool
    include_usage: bool
    sampling: dict  # build_request's keywords; absent ones take the server's defaults


def _integer(body, name: str, minimum: int | None = None) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if type(value) is not int:
        raise invalid(f"{name} must be an integer, got {_json_type(value)}", param=name)
    if minimum is not None and value < minimum:
        raise invalid(f"{name} is {value}; it must be at least {minimum}", param=name)
    return value


def _number(body, name: str) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if type(value) not in (int, float):
        raise invalid(f"{name} must be a number, got {_json_type(value)}", param=name)
    return float(value)


def _json_type(value) -> str:
    for kind, name in ((bool, "a boolean"), (str, "a string"), (int, "an integer"), (float, "a number"),
                       (list, "a list"), (dict, "an object")):
        if isinstance(value, kind):
            return name
    return "null"


def _max_tokens(body, limit: int) -> int | None:
    """The request's token budget, within the server's MEDGEMMA_MAX_NEW_TOKENS (`limit`)."""
    legacy = _integer(body, "max_tokens")
    current = _integer(body, "max_completion_tokens")
    if legacy is not None and current is not None and legacy != current:
        raise invalid(f"max_tokens ({legacy}) and max_completion_tokens ({current}) differ; send one of them",
                      param="max_completion_tokens")
    value, name = (current, "max_completion_tokens") if current is not None else (legacy, "max_tokens")
    if value is not None and not 1 <= value <= limit:
        raise invalid(f"{name} is {value}; it must be between 1 and {limit} ({Limits.env_name('max_new_tokens')})",
                      param=name)
    return value


def _seed(body) -> int | None:
    seed = _integer(body, "seed")
    if seed is None:
        return None
    if not -(2**63) <= seed < UINT64:
        raise invalid(f"seed {seed} is outside the 64-bit range", param="seed")
    return seed % UINT64  # OpenAI seeds are signed 64-bit; the model's random_seed is unsigned


def _stop(body) -> list[str] | None:
    stop = body.get("stop")
    if stop is None:
        return None
    if isinstance(stop, str):
        return [stop]
    if isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        return stop or None
    raise invalid("stop must be a string or a list of strings", param="stop")


def _stream_options(body, stream: bool) -> bool:
    options = body.get("stream_options")
    if options is None:
        return False
    if not stream:
        raise invalid("stream_options is only allowed when stream is true", param="stream_options")
    if not isinstance(options, Mapping):
        raise invalid("stream_options must be an object", param="stream_options")
    unknown = set(options) - {"include_usage", "include_obfuscation"}
    if unknown:
        raise invalid(f"stream_options.{sorted(unknown)[0]} is not supported", param="stream_options")
    include_usage = options.get("include_usage")
    if include_usage is not None and not isinstance(include_usage, bool):
        raise invalid("stream_options.include_usage must be a boolean", param="stream_options")
    return bool(include_usage)


def first_invalid_text(value) -> tuple[tuple, str] | None:
    """(path, character) of the first text in a decoded JSON value that is not valid Unicode, else None;
    the path is of keys and list indexes, and ends with None where the text is an object's key.

    JSON may escape half of a UTF-16 surrogate pair on its own ("\\ud800"), which decodes to a str no
    UTF-8 encoder takes: nothing later may quote such text, nor send it to the server.
    """
    pending = [((), value)]  # a stack, not recursion: the body may nest as deep as the JSON parser allows
    while pending:
        path, item = pending.pop()
        if isinstance(item, str):
            if (position := _invalid_at(item)) is not None:
                return path, item[position]
        elif isinstance(item, Mapping):
            for key, member in reversed(list(item.items())):
                pending += [((*path, key), member), ((*path, None), key)]
        elif isinstance(item, list):
            pending += [((*path, index), member) for index, member in reversed(list(enumerate(item)))]
    return None


def _invalid_at(text: str) -> int | None:
    if text.isascii():  # base64 images: the common case, checked at memory speed
        return None
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        return exc.start
    return None


def _where(path: tuple) -> str:
    """("messages", 0, "content") -> "messages[0].content"; a final None: "a key in ..."."""
    text = "".join(f"[{step}]" if isinstance(step, int) else f".{step}" for step in path if step is not None)
    text = text.lstrip(".") or "the request body"
    return f"a key in {text}" if path and path[-1] is None else text


def _check_unicode(body) -> None:
    found = first_invalid_text(body)
    if found is not None:
        path, character = found
        raise invalid(
            f"{_where(path)} contains text that is not valid Unicode (a lone surrogate \\u{ord(character):04x}): "
            "send text as UTF-8, and escape a character beyond U+FFFF as a pair (\\ud83d\\ude00)",
            param=path[0] if path and isinstance(path[0], str) else None, code="invalid_unicode",
        )


def parse_chat_request(body, limits: Limits) -> ChatParams:
    """Check a decoded request body and collect what the request asks for; `limits` are the server's."""
    if not isinstance(body, Mapping):
        raise invalid("the request body must be a JSON object")
    _check_unicode(body)
    for name, value in body.items():
        if name in SUPPORTED or name in IGNORED:
            continue
        if name in NEUTRAL:
            if not NEUTRAL[name](value):
                raise invalid(f"{name}={json.dumps(value)} is not supported by this server" if _short(value)
                              else f"{name} is not supported by this server", param=name, code="unsupported_parameter")
            continue
        raise invalid(f"unknown or unsupported parameter {name!r}", param=name, code="unsupported_parameter")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise invalid("model is required: the name GET /v1/models lists", param="model")
    if "messages" not in body:
        raise invalid("messages is required", param="messages")
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise invalid("stream must be a boolean", param="stream")
    stream = bool(stream)
    sampling = {
        "max_tokens": _max_tokens(body, limits.max_new_tokens),
        "temperature": _number(body, "temperature"),
        "top_p": _number(body, "top_p"),
        "top_k": _integer(body, "top_k"),
        "seed": _seed(body),
        "stop": _stop(body),
    }
    return ChatParams(
        model=model,
        messages=body["messages"],
        stream=stream,
        include_usage=_stream_options(body, stream),
        sampling={k: v for k, v in sampling.items() if v is not None},
    )


def _short(value) -> bool:
    return isinstance(value, (bool, int, float)) or (isinstance(value, str) and len(value) <= 40)
