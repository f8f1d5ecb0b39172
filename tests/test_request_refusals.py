"""Bad requests as a client sees them: a real Triton server, the `medgemma` model over tritonclient's
gRPC stream. Each refusal is an `invalid argument: ` sentence that names the place and what is wrong,
never a Python type name, repr or memory address, and the server serves the next request.
"""

from __future__ import annotations

import io
import json
import re

import numpy as np
import pytest
from PIL import Image

from serving_fixtures import MedgemmaStream

from medgemma_triton.client.errors import strip_ensemble_prefix
from medgemma_triton.contract import INVALID_ARGUMENT_PREFIX

INTERNALS = re.compile(r"\b0x[0-9a-fA-F]+|object at|Error|Traceback|<_io|b'|\bdict object|codec")
SUPPORTED = "PNG, JPEG, BMP, TIFF, WEBP, GIF"


def _encoded(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


PNG = _encoded(Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 48, 3), dtype=np.uint8)), "PNG")
ICO = _encoded(Image.new("RGB", (8, 8)), "ICO")
USER_WITH_IMAGE = [{"role": "user", "content": [{"type": "text", "text": "Describe"}, {"type": "image"}]}]

REFUSALS = {
    # name: (request, what the message must say)
    "lone surrogate in a text part": (
        dict(messages='[{"role": "user", "content": [{"type": "text", "text": "chest \\ud800 x-ray"}]}]'),
        ["messages[0].content[0].text", "not valid Unicode", "U+D800"],
    ),
    "lone surrogate in string content": (
        dict(messages='[{"role": "user", "content": "\\udc00"}]'),
        ["messages[0].content ", "not valid Unicode", "U+DC00"],
    ),
    "text_input that is not UTF-8": (dict(text_input=b"caf\xe9 \xff"), ["text_input", "not valid UTF-8", "offset 3"]),
    "image in a system message": (
        dict(messages=[{"role": "system", "content": [{"type": "image"}]}, {"role": "user", "content": "hi"}],
             images=[PNG]),
        ["messages[0].content[0]", "system message", "put images in a user message"],
    ),
    "unsupported image format": (dict(messages=USER_WITH_IMAGE, images=[ICO]), ["images[0]", SUPPORTED]),
    "bytes that are no image": (dict(messages=USER_WITH_IMAGE, images=[b"hello, not an image"]), ["images[0]", SUPPORTED]),
    "damaged image header": (dict(messages=USER_WITH_IMAGE, images=[PNG[:40] + bytes(60)]), ["images[0]", SUPPORTED]),
    "truncated image": (dict(messages=USER_WITH_IMAGE, images=[PNG[: len(PNG) // 2]]),
                        ["images[0]", "PNG", "truncated", SUPPORTED]),
}


@pytest.fixture(scope="module")
def stream(tiny_server):
    s = MedgemmaStream(tiny_server.url)
    yield s
    s.close()


@pytest.mark.parametrize("name", REFUSALS)
def test_a_refusal_says_where_and_what_in_plain_words(stream, name):
    request, words = REFUSALS[name]
    outcome = stream.request(timeout_s=60, max_tokens=4, **request)
    assert outcome.error is not None, "not refused"
    message = strip_ensemble_prefix(outcome.error)
    assert message.startswith(INVALID_ARGUMENT_PREFIX), message
    assert all(word in message for word in words), (message, words)
    assert not INTERNALS.search(message), message
    served = stream.request(timeout_s=120, max_tokens=4, messages=json.dumps(USER_WITH_IMAGE), images=[PNG])
    assert served.error is None and served.completion_tokens > 0, served.error
