"""Chat messages checked and normalised: the model card's message JSON, or a `text_input` turn, into
a list of {"role", "content": [parts]} dicts. No Jinja and no tokenizer: the client, the OpenAI gateway
and `preprocessing` share it (runtime/chat.py renders the prompt from what it returns).
"""

from __future__ import annotations

import json

from medgemma_triton.runtime.limits import InvalidRequest, Limits, check_unicode

ROLES = ("system", "user", "assistant")
PART_TYPES = ("text", "image")


def _too_large(what: str, size: int, limits: Limits) -> InvalidRequest:
    return InvalidRequest(
        f"{what} is {size} bytes; the limit is {limits.max_messages_bytes} bytes "
        f"({Limits.env_name('max_messages_bytes')})"
    )


def _request_text(value: str | bytes, name: str, limits: Limits) -> str:
    """A request's text input, its size checked before it is decoded (a str may hold lone surrogates:
    check_unicode refuses them where they are)."""
    raw = value.encode("utf-8", "surrogatepass") if isinstance(value, str) else bytes(value)
    if len(raw) > limits.max_messages_bytes:
        raise _too_large(name, len(raw), limits)
    if isinstance(value, str):
        return value
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidRequest(
            f"{name} is not valid UTF-8 text (an invalid byte at offset {exc.start}); send it encoded as UTF-8"
        ) from None


def parse_messages(messages_json: str | bytes, limits: Limits) -> list[dict]:
    """Validate MedGemma model-card chat JSON; return it normalized to role/content/type/text keys only.

    Image parts carry no pixels here (any "image"/"url" value from the client is dropped): the n-th
    image part takes the n-th encoded image of the request.
    """
    text = _request_text(messages_json, "messages", limits)
    try:
        messages = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidRequest(f"messages is not valid JSON: {exc}") from None
    except RecursionError:
        raise InvalidRequest("messages is not valid JSON: nested too deeply") from None
    if not isinstance(messages, list):
        raise InvalidRequest(
            f"messages must be a JSON list of {{\"role\", \"content\"}} objects, got a JSON {_json_type(messages)}"
        )
    if not messages:
        raise InvalidRequest("messages is an empty list; send at least one user message")
    return [_parse_message(i, message) for i, message in enumerate(messages)]


def _json_type(value) -> str:
    return {dict: "object", list: "list", str: "string", bool: "boolean", type(None): "null"}.get(
        type(value), "number"
    )


def _shown(value: str, limit: int = 40) -> str:
    """A client's string quoted in a message: escaped, and cut short (it may be a megabyte)."""
    return repr(value) if len(value) <= limit else repr(value[:limit]) + "..."


def _parse_message(index: int, message) -> dict:
    where = f"messages[{index}]"
    if not isinstance(message, dict):
        raise InvalidRequest(f"{where} must be an object with \"role\" and \"content\", got a JSON {_json_type(message)}")
    if "role" not in message:
        raise InvalidRequest(f"{where} has no \"role\"; it must be one of {', '.join(ROLES)}")
    role = message["role"]
    if not isinstance(role, str):
        raise InvalidRequest(f"{where}.role must be a string, got a JSON {_json_type(role)}")
    if role not in ROLES:
        raise InvalidRequest(f"{where}.role is {_shown(role)}; it must be one of {', '.join(ROLES)}")
    if "content" not in message:
        raise InvalidRequest(f"{where} has no \"content\"")
    content = message["content"]
    if isinstance(content, str):
        check_unicode(content, f"{where}.content")
        return {"role": role, "content": content}
    if not isinstance(content, list):
        raise InvalidRequest(
            f"{where}.content must be a string or a list of {{\"type\": \"text\"|\"image\"}} parts, "
            f"got a JSON {_json_type(content)}"
        )
    if not content:
        raise InvalidRequest(f"{where}.content is an empty list")
    parts = []
    for j, part in enumerate(content):
        part_where = f"{where}.content[{j}]"
        if not isinstance(part, dict):
            raise InvalidRequest(f"{part_where} must be an object with a \"type\", got a JSON {_json_type(part)}")
        kind = part.get("type")
        if not isinstance(kind, str):
            problem = "has no \"type\"" if kind is None else f"has a JSON {_json_type(kind)} as its \"type\""
            raise InvalidRequest(f"{part_where} {problem}; it must be one of {', '.join(PART_TYPES)}")
        if kind not in PART_TYPES:
            raise InvalidRequest(f"{part_where}.type is {_shown(kind)}; it must be one of {', '.join(PART_TYPES)}")
        if kind == "image":
            if role == "system":  # Gemma 3's template reads a system turn's first part as text
                raise InvalidRequest(
                    f"{part_where} is an image in a system message, which takes text only; "
                    "put images in a user message"
                )
            parts.append({"type": "image"})
            continue
        if "text" not in part:
            raise InvalidRequest(f"{part_where} is a text part without \"text\"")
        if not isinstance(part["text"], str):
            raise InvalidRequest(f"{part_where}.text must be a string, got a JSON {_json_type(part['text'])}")
        check_unicode(part["text"], f"{part_where}.text")
        parts.append({"type": "text", "text": part["text"]})
    return {"role": role, "content": parts}


def messages_from_text_input(text_input: str | bytes, num_images: int, limits: Limits) -> list[dict]:
    """A plain `text_input` as one user turn; images follow the text, as in the MedGemma model card."""
    text = _request_text(text_input, "text_input", limits)
    check_unicode(text, "text_input")
    parts = [{"type": "text", "text": text}] + [{"type": "image"} for _ in range(num_images)]
    return [{"role": "user", "content": parts}]


def count_image_parts(messages: list[dict]) -> int:
    return sum(
        1
        for message in messages
        if isinstance(message["content"], list)
        for part in message["content"]
        if part["type"] == "image"
    )


def text_parts(messages: list[dict]):
    for i, message in enumerate(messages):
        content = message["content"]
        if isinstance(content, str):
            yield i, content
        else:
            for part in content:
                if part["type"] == "text":
                    yield i, part["text"]
