"""OpenAI chat messages -> the model card's messages, the format the `medgemma` model takes.

One message maps to one message, and one part to one part, so the indices in the server's refusals
("messages[1].content[0] ...") are the caller's own. Text parts stay text; an `image_url` part becomes
`{"type": "image", "image": <bytes>}` (checked and, where needed, converted by gateway.images), which
client.build_request turns into a `{"type": "image"}` placeholder plus one element of `images` - the
same path the Python client takes. The chat template
is the server's: nothing here renders a prompt.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from medgemma_triton.gateway.errors import invalid
from medgemma_triton.gateway.images import server_image
from medgemma_triton.gateway.media import image_bytes

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
# OpenAI message keys with no meaning for this model that change nothing when dropped
_IGNORED_MESSAGE_KEYS = {"name"}
_REFUSED_MESSAGE_KEYS = {"tool_calls", "function_call", "tool_call_id", "audio"}


@dataclass
class MappedMessages:
    messages: list[dict]  # model-card messages; image parts carry their bytes under "image"
    image_locations: list[str] = field(default_factory=list)  # "messages[i].content[j]" per image, in order

    @property
    def has_images(self) -> bool:
        return bool(self.image_locations)


def map_messages(messages, allowed_dir: Path | None, max_image_bytes: int) -> MappedMessages:
    if not isinstance(messages, list) or not messages:
        raise invalid("messages must be a non-empty list of {\"role\", \"content\"} objects", param="messages")
    mapped = MappedMessages([])
    for i, message in enumerate(messages):
        mapped.messages.append(_map_message(i, message, mapped, allowed_dir, max_image_bytes))
    return mapped


def _map_message(i: int, message, mapped: MappedMessages, allowed_dir, max_image_bytes) -> dict:
    where = f"messages[{i}]"
    if not isinstance(message, Mapping):
        raise invalid(f"{where} must be an object with \"role\" and \"content\"", param="messages")
    role = message.get("role")
    if role not in ROLES:
        raise invalid(f"{where}.role is {role!r}; the gateway takes {', '.join(ROLES)}", param="messages",
                      code="unsupported_role")
    for key in message:
        if key in _REFUSED_MESSAGE_KEYS and message[key] is not None:
            raise invalid(f"{where}.{key} is not supported: this gateway has no tool or function calling",
                          param="messages")
        if key not in _IGNORED_MESSAGE_KEYS | _REFUSED_MESSAGE_KEYS | {"role", "content"}:
            raise invalid(f"{where} has an unsupported field {key!r}", param="messages")
    content = message.get("content")
    if isinstance(content, str):
        return {"role": ROLES[role], "content": content}
    if not isinstance(content, list):
        raise invalid(f"{where}.content must be a string or a list of text and image_url parts", param="messages")
    parts = []
    for j, part in enumerate(content):
        part_where = f"{where}.content[{j}]"
        kind = part.get("type") if isinstance(part, Mapping) else None
        if kind == "text":
            text = part.get("text")
            if not isinstance(text, str):
                raise invalid(f"{part_where}.text must be a string", param="messages")
            parts.append({"type": "text", "text": text})
        elif kind == "image_url":
            image_url = part.get("image_url")
            url = image_url.get("url") if isinstance(image_url, Mapping) else image_url
            data = server_image(image_bytes(url, part_where, allowed_dir, max_image_bytes), part_where)
            parts.append({"type": "image", "image": data})
            mapped.image_locations.append(part_where)
        else:
            raise invalid(f"{part_where}.type is {kind!r}; the gateway takes \"text\" and \"image_url\" parts",
                          param="messages", code="unsupported_content_part")
    return {"role": ROLES[role], "content": parts}
