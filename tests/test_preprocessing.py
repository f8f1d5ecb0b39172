"""Preprocessing (chat template, tokenization, image decoding and pixel values) against transformers' processor.

The reference is `AutoProcessor.from_pretrained(checkpoint)` (Gemma3Processor + Gemma3ImageProcessorPil)
and `processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)`.
"""

from __future__ import annotations

import copy
import dataclasses
import io
import json
import re
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest
from PIL import Image

from medgemma_triton.runtime.chat import PromptBuilder
from medgemma_triton.runtime.messages import messages_from_text_input, parse_messages
from medgemma_triton.runtime.images import (
    UnsupportedImageProcessing,
    check_image_processing_supported,
    decode_image,
    pixel_values_from_bytes,
    preprocess_image,
)
from medgemma_triton.runtime.limits import InvalidRequest, Limits
from medgemma_triton.spec import ModelSpec

LIMITS = Limits()
_REFERENCE = {}
_SPECS = {}


def reference_processor(checkpoint):
    if checkpoint not in _REFERENCE:
        from transformers import AutoProcessor

        _REFERENCE[checkpoint] = AutoProcessor.from_pretrained(checkpoint)
    return _REFERENCE[checkpoint]


def model_spec(checkpoint) -> ModelSpec:
    if checkpoint not in _SPECS:  # parsing tokenizer.json takes a second: once per checkpoint
        _SPECS[checkpoint] = ModelSpec.from_checkpoint(checkpoint)
    return _SPECS[checkpoint]


@pytest.fixture(scope="module")
def tiny(tiny_checkpoint):
    spec = model_spec(tiny_checkpoint)
    return tiny_checkpoint, spec, PromptBuilder(spec, tiny_checkpoint, LIMITS)


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def random_image(rng, mode: str, width: int, height: int) -> Image.Image:
    bands = len(Image.new(mode, (1, 1)).getbands())
    if mode == "I;16":
        return Image.fromarray(rng.integers(0, 700, (height, width), dtype=np.uint16))
    channels = [Image.fromarray(rng.integers(0, 256, (height, width), dtype=np.uint8)) for _ in range(bands)]
    return Image.merge(mode, channels) if bands > 1 else channels[0].convert(mode)


def sample_images() -> dict[str, bytes]:
    """Encoded images of odd sizes in the modes clients send."""
    rng = np.random.default_rng(1234)
    palette = random_image(rng, "RGB", 45, 33).convert("P")
    return {
        "RGB PNG": encode(random_image(rng, "RGB", 53, 37), "PNG"),
        "RGBA PNG": encode(random_image(rng, "RGBA", 29, 41), "PNG"),
        "L PNG": encode(random_image(rng, "L", 17, 300), "PNG"),
        "LA PNG": encode(random_image(rng, "LA", 31, 23), "PNG"),
        "P PNG": encode(palette, "PNG"),
        "P PNG with transparency": encode(palette, "PNG", transparency=7),
        "I;16 PNG (16-bit)": encode(random_image(rng, "I;16", 31, 29), "PNG"),
        "CMYK JPEG": encode(random_image(rng, "CMYK", 27, 19), "JPEG"),
        "RGB JPEG": encode(random_image(rng, "RGB", 701, 499), "JPEG", quality=90),
        "1-pixel-wide PNG": encode(random_image(rng, "RGB", 1, 97), "PNG"),
        "1-pixel PNG": encode(random_image(rng, "RGB", 1, 1), "PNG"),
        "GIF": encode(palette, "GIF"),
        "WEBP": encode(random_image(rng, "RGB", 44, 33), "WEBP"),
        "BMP": encode(random_image(rng, "RGB", 7, 13), "BMP"),
        "TIFF float": encode(Image.fromarray(rng.random((20, 30), dtype=np.float32) * 300), "TIFF"),
    }


SAMPLES = sample_images()


def with_pil_images(messages: list[dict], images: list[Image.Image]) -> list[dict]:
    """The model-card form of `messages`: each image part carries its PIL image."""
    messages = copy.deepcopy(messages)
    pending = iter(images)
    for message in messages:
        if isinstance(message["content"], list):
            for part in message["content"]:
                if part["type"] == "image":
                    part.pop("url", None)  # the reference would fetch it
                    part["image"] = next(pending)
    return messages


CONVERSATIONS = {
    "text only": [{"role": "user", "content": [{"type": "text", "text": "What is pneumothorax?"}]}],
    "system and user": [
        {"role": "system", "content": [{"type": "text", "text": "You are an expert radiologist."}]},
        {"role": "user", "content": [{"type": "text", "text": "List three signs of pneumonia."}]},
    ],
    "one image": [
        {"role": "system", "content": [{"type": "text", "text": "You are an expert radiologist."}]},
        {"role": "user", "content": [{"type": "text", "text": "Describe this X-ray"}, {"type": "image"}]},
    ],
    "two images": [
        {
            "role": "user",
            "content": [
                {"type": "image", "url": "https://example.org/a.png"},
                {"type": "text", "text": "  Compare these two studies:  "},
                {"type": "image"},
                {"type": "text", "text": "Which is newer?"},
            ],
        }
    ],
    "multi-turn with assistant": [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What do you see?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A chest radiograph.\n\nNo acute findings."}]},
        {"role": "user", "content": [{"type": "text", "text": "Any effusion? Réponds en français, 请"}]},
    ],
    "plain-string content": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "  Hello\n\nthere  "},
        {"role": "assistant", "content": "Hi."},
        {"role": "user", "content": "Define <b>atelectasis</b> & {{ not a template }}"},
    ],
}


@pytest.mark.parametrize("name", list(CONVERSATIONS))
def test_input_ids_match_transformers(checkpoint, name):
    spec = model_spec(checkpoint)
    builder = PromptBuilder(spec, checkpoint, LIMITS)
    messages = CONVERSATIONS[name]
    image_names = ["RGB PNG", "RGBA PNG"]
    parsed = parse_messages(json.dumps(messages), LIMITS)
    num_images = sum(1 for m in parsed if isinstance(m["content"], list) for p in m["content"] if p["type"] == "image")
    images = [Image.open(io.BytesIO(SAMPLES[n])) for n in image_names[:num_images]]

    reference = reference_processor(checkpoint).apply_chat_template(
        with_pil_images(messages, images),
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
        return_tensors="np",
    )
    ids = builder.build(parsed, num_images)
    assert ids.dtype == np.int64 and ids.ndim == 1
    np.testing.assert_array_equal(ids, reference["input_ids"][0])
    assert np.count_nonzero(ids == spec.tokens.image) == num_images * spec.mm_tokens_per_image
    if num_images:
        ours = pixel_values_from_bytes([SAMPLES[n] for n in image_names[:num_images]], spec, LIMITS)
        np.testing.assert_array_equal(ours, reference["pixel_values"])


def test_text_input_is_one_user_turn(tiny):
    checkpoint, spec, builder = tiny
    text = "Describe this X-ray"
    image = Image.open(io.BytesIO(SAMPLES["L PNG"]))
    reference = reference_processor(checkpoint).apply_chat_template(
        [{"role": "user", "content": [{"type": "text", "text": text}, {"type": "image", "image": image}]}],
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
        return_tensors="np",
    )
    np.testing.assert_array_equal(builder.build_from_text_input(text.encode(), 1), reference["input_ids"][0])
    assert messages_from_text_input(text, 0, LIMITS) == [{"role": "user", "content": [{"type": "text", "text": text}]}]


def test_rendered_prompt_matches_transformers(tiny):
    checkpoint, _, builder = tiny
    for messages in CONVERSATIONS.values():
        expected = reference_processor(checkpoint).apply_chat_template(messages, add_generation_prompt=True)
        assert builder.render(parse_messages(json.dumps(messages), LIMITS)) == expected


@pytest.mark.parametrize("sample", list(SAMPLES))
def test_pixel_values_match_transformers(checkpoint, sample):
    spec = model_spec(checkpoint)
    data = SAMPLES[sample]
    reference = reference_processor(checkpoint).image_processor(Image.open(io.BytesIO(data)), return_tensors="np")
    ours = preprocess_image(decode_image(data, LIMITS), spec)
    processing = spec.image_processing
    assert ours.shape == (3, processing.height, processing.width) and ours.dtype == np.float32
    np.testing.assert_array_equal(ours, reference["pixel_values"][0])


def test_16_bit_images_are_clipped_like_the_reference(tiny):
    """Pillow's I;16 -> RGB clips at 255: the reference turns a 16-bit scan white (documented, matched)."""
    _, spec, _ = tiny
    bright = encode(Image.fromarray(np.full((8, 8), 4000, dtype=np.uint16)), "PNG")
    np.testing.assert_array_equal(preprocess_image(decode_image(bright, LIMITS), spec), 1.0)


def test_pan_and_scan_is_refused_at_load(tiny):
    _, spec, _ = tiny
    check_image_processing_supported(spec)
    pan_and_scan = dataclasses.replace(
        spec, image_processing=dataclasses.replace(spec.image_processing, do_pan_and_scan=True)
    )
    with pytest.raises(UnsupportedImageProcessing, match="pan-and-scan") as error:
        check_image_processing_supported(pan_and_scan)
    assert isinstance(error.value, NotImplementedError)


# --- bad requests: each one an InvalidRequest that says what was wrong ---

BAD_MESSAGES = [
    (b"[{", "not valid JSON"),
    (b"\xff\xfe", "not valid UTF-8"),
    ('{"role": "user", "content": "hi"}', "must be a JSON list"),
    ("[]", "empty list"),
    ('["hi"]', "messages[0] must be an object"),
    ('[{"role": "doctor", "content": "hi"}]', "messages[0].role is 'doctor'; it must be one of system, user, assistant"),
    ('[{"content": "hi"}]', 'messages[0] has no "role"'),
    ('[{"role": ["user"], "content": "hi"}]', "messages[0].role must be a string, got a JSON list"),
    ('[{"role": "user", "content": [{"text": "hi"}]}]', 'messages[0].content[0] has no "type"'),
    ('[{"role": "user", "content": [{"type": {}}]}]', 'messages[0].content[0] has a JSON object as its "type"'),
    ('[{"role": "user", "content": "a\\ud800"}]', "messages[0].content is not valid Unicode text: character 1"),
    ('[{"role": "user", "content": [{"type": "text", "text": "\\udfff"}]}]',
     "messages[0].content[0].text is not valid Unicode text: character 0 is the unpaired surrogate U+DFFF"),
    ('[{"role": "user", "content": "\ud800"}]', "messages[0].content is not valid Unicode text"),  # a str, as the client has
    ('[{"role": "system", "content": [{"type": "image"}]}, {"role": "user", "content": "hi"}]',
     "messages[0].content[0] is an image in a system message, which takes text only; put images in a user message"),
    (b'[{"role": "user", "content": "caf\xe9"}]', "messages is not valid UTF-8 text (an invalid byte at offset 33)"),
    ('[{"role": "user"}]', 'messages[0] has no "content"'),
    ('[{"role": "user", "content": 42}]', "messages[0].content must be a string or a list"),
    ('[{"role": "user", "content": []}]', "messages[0].content is an empty list"),
    ('[{"role": "user", "content": [{"type": "audio"}]}]', "content[0].type is 'audio'; it must be one of text, image"),
    ('[{"role": "user", "content": [{"type": "text"}]}]', 'content[0] is a text part without "text"'),
    ('[{"role": "user", "content": [{"type": "text", "text": 7}]}]', "content[0].text must be a string"),
    ('[{"role": "user", "content": ["hi"]}]', "content[0] must be an object"),
]


# what a refusal must not show a user: Python reprs and type names, memory addresses, library internals
INTERNALS = re.compile(r"\b0x[0-9a-fA-F]+|object at|Error|Traceback|<_io|b'|\bdict object|codec")


def assert_plain(message: str) -> None:
    assert not INTERNALS.search(message), message


@pytest.mark.parametrize("messages_json, problem", BAD_MESSAGES)
def test_bad_messages(messages_json, problem):
    with pytest.raises(InvalidRequest, match=re.escape(problem)) as info:
        parse_messages(messages_json, LIMITS)
    assert_plain(str(info.value))


@pytest.mark.parametrize("text_input, problem", [
    (b"caf\xe9 \xff", "text_input is not valid UTF-8 text (an invalid byte at offset 3); send it encoded as UTF-8"),
    ("x\udc80", "text_input is not valid Unicode text: character 1 is the unpaired surrogate U+DC80"),
])
def test_bad_text_input(text_input, problem):
    with pytest.raises(InvalidRequest, match=re.escape(problem)) as info:
        messages_from_text_input(text_input, 0, LIMITS)
    assert_plain(str(info.value))


def test_messages_too_large():
    messages = json.dumps([{"role": "user", "content": "x" * 200}])
    with pytest.raises(InvalidRequest, match=r"messages is \d+ bytes; the limit is 100 bytes \(MEDGEMMA_MAX_MESSAGES_BYTES\)"):
        parse_messages(messages, Limits(max_messages_bytes=100))


def _build(builder, messages, num_images):
    return builder.build(parse_messages(json.dumps(messages), builder.limits), num_images)


def test_image_count_mismatch(tiny):
    _, _, builder = tiny
    one_image = CONVERSATIONS["one image"]
    with pytest.raises(InvalidRequest, match="1 image part.* but no images were sent"):
        _build(builder, one_image, 0)
    with pytest.raises(InvalidRequest, match="2 image.* were sent but messages have no"):
        _build(builder, CONVERSATIONS["text only"], 2)
    with pytest.raises(InvalidRequest, match="1 image part.* but 3 image.* were sent"):
        _build(builder, one_image, 3)


def test_too_many_images(tiny):
    checkpoint, spec, _ = tiny
    builder = PromptBuilder(spec, checkpoint, Limits(max_images=1))
    with pytest.raises(InvalidRequest, match=r"2 images; the limit is 1 \(MEDGEMMA_MAX_IMAGES\)"):
        _build(builder, CONVERSATIONS["two images"], 2)
    with pytest.raises(InvalidRequest, match=r"the limit is 1 \(MEDGEMMA_MAX_IMAGES\)"):
        pixel_values_from_bytes([SAMPLES["BMP"]] * 2, spec, Limits(max_images=1))


def test_too_many_input_tokens(tiny):
    checkpoint, spec, _ = tiny
    builder = PromptBuilder(spec, checkpoint, Limits(max_input_tokens=20))
    with pytest.raises(
        InvalidRequest,
        match=rf"the prompt is \d+ tokens \({spec.mm_tokens_per_image} of them image tokens\); "
        r"the limit is 20 \(MEDGEMMA_MAX_INPUT_TOKENS\)",
    ):
        _build(builder, CONVERSATIONS["one image"], 1)


def test_template_errors_are_invalid_requests(tiny):
    _, _, builder = tiny
    with pytest.raises(InvalidRequest, match="roles must alternate"):
        _build(builder, [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], 0)
    # what the template cannot read (here an image first in a system message, which parse_messages
    # refuses earlier) is refused in a sentence, without Jinja's "'dict object' has no attribute 'text'"
    unparsed = [{"role": "system", "content": [{"type": "image"}]}, {"role": "user", "content": "b"}]
    with pytest.raises(InvalidRequest, match="the chat template cannot render these messages") as info:
        builder.render(unparsed)
    assert_plain(str(info.value))


def test_content_the_template_would_drop_is_refused(tiny):
    _, _, builder = tiny
    two_part_system = [
        {"role": "system", "content": [{"type": "text", "text": "Be brief."}, {"type": "text", "text": "Be kind."}]},
        {"role": "user", "content": "hi"},
    ]
    with pytest.raises(InvalidRequest, match=r"dropped text of messages\[0\]"):
        _build(builder, two_part_system, 0)
    image_in_system = [
        {"role": "system", "content": [{"type": "text", "text": "Be brief."}, {"type": "image"}]},
        {"role": "user", "content": "hi"},
    ]
    with pytest.raises(InvalidRequest, match=r"messages\[0\]\.content\[1\] is an image in a system message"):
        _build(builder, image_in_system, 1)


@pytest.mark.parametrize("marker", ["<start_of_image>", "<image_soft_token>", "<end_of_image>"])
def test_image_markers_in_text_are_refused(tiny, marker):
    _, _, builder = tiny
    with pytest.raises(InvalidRequest, match="reserved image marker"):
        _build(builder, [{"role": "user", "content": f"look {marker} here"}], 0)


def test_text_only_model_refuses_images(tiny):
    checkpoint, spec, _ = tiny
    text_only = dataclasses.replace(spec, architecture="Gemma3ForCausalLM", vision=None, image_processing=None)
    builder = PromptBuilder(text_only, checkpoint, LIMITS)
    with pytest.raises(InvalidRequest, match="takes text only"):
        _build(builder, CONVERSATIONS["one image"], 1)
    assert len(_build(builder, CONVERSATIONS["text only"], 0)) > 0


def _png_claiming_size(width: int, height: int) -> bytes:
    """A small valid PNG whose header claims width x height (a decompression bomb's header)."""
    data = bytearray(encode(Image.new("L", (4, 4)), "PNG"))
    ihdr = bytearray(data[12:29])  # b"IHDR" + 13 bytes of fields
    ihdr[4:12] = struct.pack(">II", width, height)
    data[12:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)))
    return bytes(data)


BAD_IMAGES = [
    (b"", LIMITS, "images\\[0\\] is empty"),
    (SAMPLES["RGB PNG"], Limits(max_image_bytes=100), r"bytes; the limit is 100 bytes \(MEDGEMMA_MAX_IMAGE_BYTES\)"),
    (b"%PDF-1.7\n" + b"0" * 100, LIMITS,
     "images\\[0\\] is not a decodable image: it is in none of the supported formats \\(PNG, JPEG, BMP, TIFF, WEBP, GIF\\)"),
    (encode(Image.new("RGB", (8, 8)), "ICO"), LIMITS, "images\\[0\\] is not a decodable image.*PNG, JPEG"),
    (encode(Image.new("RGB", (5, 5)), "PPM"), LIMITS, "supported formats \\(PNG, JPEG"),
    (bytes(128) + b"DICM" + bytes(64), LIMITS, "DICOM"),
    (SAMPLES["RGB PNG"][: len(SAMPLES["RGB PNG"]) // 2], LIMITS, "corrupt or truncated"),
    (SAMPLES["RGB JPEG"][: len(SAMPLES["RGB JPEG"]) // 2], LIMITS, "corrupt or truncated"),
    (SAMPLES["RGB PNG"][:40], LIMITS, "images\\[0\\]"),
    (
        _png_claiming_size(9000, 9000),
        LIMITS,
        r"9000x9000 pixels \(81000000\); the limit is 67108864 pixels \(MEDGEMMA_MAX_IMAGE_PIXELS\)",
    ),
    (_png_claiming_size(20000, 20000), LIMITS, r"MEDGEMMA_MAX_IMAGE_(SIDE|PIXELS)"),
    (
        _png_claiming_size(20000, 20000),
        Limits(max_image_side=10**6, max_image_pixels=10**9),
        r"too large to decode.*MEDGEMMA_MAX_IMAGE_PIXELS",
    ),
    (_png_claiming_size(40, 3), Limits(max_image_side=32), r"40x3 pixels; the limit is 32 pixels per side \(MEDGEMMA_MAX_IMAGE_SIDE\)"),
    (_png_claiming_size(30, 30), Limits(max_image_pixels=800), r"the limit is 800 pixels \(MEDGEMMA_MAX_IMAGE_PIXELS\)"),
]


@pytest.mark.parametrize("data, limits, problem", BAD_IMAGES, ids=lambda v: None)
def test_bad_images(data, limits, problem):
    with pytest.raises(InvalidRequest, match=problem) as info:
        decode_image(data, limits, name="images[0]")
    assert_plain(str(info.value))


def test_serving_modules_import_neither_torch_nor_transformers():
    code = (
        "import sys\n"
        "import medgemma_triton.runtime.chat, medgemma_triton.runtime.images, medgemma_triton.runtime.detokenize\n"
        "import medgemma_triton.runtime.sampling, medgemma_triton.runtime.tokenizer\n"
        "bad = sorted(m for m in ('torch', 'transformers') if m in sys.modules)\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
