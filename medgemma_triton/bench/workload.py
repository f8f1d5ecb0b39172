"""Benchmark workloads: synthetic chat requests of chosen lengths and images, or a JSONL file.

Synthetic images go after the text ("after-text", the model card's single X-ray question), or as a
series: each image followed by its "SLICE k" label, then the text, as MedGemma 1.5's volume recipe
and `chat --series` lay out a CT or MR volume (85 slices).

A request is kept in the contract's wire form (contract.py): chat messages whose image parts carry
no pixels, plus the encoded images in order. The same objects feed the deployment and the
in-process transformers baseline, so both see identical prompts and images.
"""

from __future__ import annotations

import base64
import io
import json
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..client.series import SLICE_LABEL
from ..contract import SAMPLING_DEFAULTS

IMAGE_LAYOUTS = ("after-text", "series")


@dataclass(frozen=True)
class BenchRequest:
    messages: list  # model-card chat messages; image parts are {"type": "image"} without pixels
    images: tuple[bytes, ...] = ()
    max_tokens: int = SAMPLING_DEFAULTS.max_tokens

    def _with_images(self, images) -> list:
        images = iter(images)
        out = []
        for message in self.messages:
            content = message["content"]
            if isinstance(content, list):
                content = [
                    {"type": "image", "image": next(images)} if part.get("type") == "image" else dict(part)
                    for part in content
                ]
            out.append({**message, "content": content})
        return out

    def model_card_messages(self) -> list:
        """The messages as MedGemma's model card writes them: each image part holds a PIL image."""
        from PIL import Image

        return self._with_images(Image.open(io.BytesIO(data)) for data in self.images)

    def client_messages(self) -> list:
        """The messages for `medgemma_triton.client`: each image part holds its encoded bytes."""
        return self._with_images(self.images)


@dataclass(frozen=True)
class LengthDistribution:
    """Token lengths: fixed `N`, `normal:MEAN,STD` or `uniform:LOW,HIGH` (always >= 1)."""

    kind: str
    a: float
    b: float = 0.0

    @classmethod
    def parse(cls, text: str, what: str) -> "LengthDistribution":
        kind, sep, rest = str(text).partition(":")
        try:
            if not sep:
                return cls("fixed", int(kind))
            a, b = (float(v) for v in rest.split(","))
        except ValueError:
            raise ValueError(
                f"{what} {text!r}: expected N, normal:MEAN,STD or uniform:LOW,HIGH (e.g. 128 or normal:128,32)"
            ) from None
        if kind not in ("normal", "uniform"):
            raise ValueError(f"{what} {text!r}: unknown distribution {kind!r} (fixed N, normal:, uniform:)")
        if kind == "uniform" and a > b:
            raise ValueError(f"{what} {text!r}: LOW is above HIGH")
        return cls(kind, a, b)

    def sample(self, rng: np.random.Generator) -> int:
        if self.kind == "fixed":
            value = self.a
        elif self.kind == "normal":
            value = rng.normal(self.a, self.b)
        else:
            value = rng.uniform(self.a, self.b)
        return max(1, int(round(value)))

    def __str__(self) -> str:
        return f"{self.a:g}" if self.kind == "fixed" else f"{self.kind}:{self.a:g},{self.b:g}"


# Filler for synthetic prompts: ordinary clinical English, so the tokenizer sees realistic text.
_WORDS = (
    "patient presents with chest pain shortness of breath history of hypertension diabetes the "
    "radiograph shows clear lungs no effusion heart size normal mild opacity in the left lower lobe "
    "consider infection follow up imaging recommended findings impression bilateral small nodules "
    "stable compared with prior study fracture soft tissue swelling within normal limits and "
    "previous surgery medication allergy review symptoms fever cough for three days"
).split()


class PromptSynthesizer:
    """User text of an exact token count with the checkpoint's tokenizer, or of N words without one
    (Gemma's tokenizer gives close to one token per common English word)."""

    def __init__(self, tokenizer_path: str | Path | None = None):
        self.tokenizer = None
        if tokenizer_path:
            from tokenizers import Tokenizer

            path = Path(tokenizer_path)
            path = path / "tokenizer.json" if path.is_dir() else path
            if not path.is_file():
                raise FileNotFoundError(f"--tokenizer {tokenizer_path}: no tokenizer.json there")
            self.tokenizer = Tokenizer.from_file(str(path))

    def text(self, tokens: int, rng: random.Random) -> str:
        words = [rng.choice(_WORDS) for _ in range(tokens + 8)]
        if self.tokenizer is None:
            return " ".join(words[:tokens])
        ids = self.tokenizer.encode(" ".join(words), add_special_tokens=False).ids
        while len(ids) < tokens:
            words += [rng.choice(_WORDS) for _ in range(tokens)]
            ids = self.tokenizer.encode(" ".join(words), add_special_tokens=False).ids
        return self.tokenizer.decode(ids[:tokens])


def synthetic_image(size: tuple[int, int], seed: int, image_format: str = "jpeg") -> bytes:
    """A grey radiograph-like image (smooth gradient plus noise): realistic to decode and resize."""
    width, height = size
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = 128 + 60 * np.sin(x / max(width, 1) * np.pi * rng.uniform(1, 3)) * np.cos(y / max(height, 1) * np.pi)
    pixels = np.clip(base + rng.normal(0, 12, size=(height, width)), 0, 255).astype(np.uint8)
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(pixels, mode="L").convert("RGB").save(buffer, format=image_format.upper())
    return buffer.getvalue()


def user_content(text: str, images: int, layout: str = "after-text") -> list[dict]:
    """The user turn's parts for `images` images (pixels not included) and the text, in `layout`."""
    if layout == "after-text":
        return [{"type": "text", "text": text}] + [{"type": "image"}] * images
    if layout == "series":
        slices = [[{"type": "image"}, {"type": "text", "text": SLICE_LABEL.format(k)}] for k in range(1, images + 1)]
        return [part for pair in slices for part in pair] + [{"type": "text", "text": text}]
    raise ValueError(f"image layout {layout!r}: expected one of {', '.join(IMAGE_LAYOUTS)}")


def synthetic_requests(
    count: int,
    input_tokens: LengthDistribution,
    output_tokens: LengthDistribution,
    images_per_request: int = 0,
    image_size: tuple[int, int] | None = None,
    image_format: str = "jpeg",
    tokenizer_path: str | Path | None = None,
    system_prompt: str | None = None,
    seed: int = 0,
    image_layout: str = "after-text",
) -> list[BenchRequest]:
    """`count` distinct requests (no two prompts alike, so no cache can help), each with
    `images_per_request` distinct images laid out as `image_layout` says."""
    if images_per_request and image_size is None:
        raise ValueError("images requested but no image size: pass --image-size or serve a vision encoder")
    rng = np.random.default_rng(seed)
    text_rng = random.Random(seed)
    synthesizer = PromptSynthesizer(tokenizer_path)
    requests = []
    for index in range(count):
        text = synthesizer.text(input_tokens.sample(rng), text_rng)
        content = user_content(text, images_per_request, image_layout)
        messages = [{"role": "user", "content": content}]
        if system_prompt:
            messages.insert(0, {"role": "system", "content": [{"type": "text", "text": system_prompt}]})
        images = tuple(
            synthetic_image(image_size, seed * 100_003 + index * 101 + k, image_format)
            for k in range(images_per_request)
        )
        requests.append(BenchRequest(messages, images, output_tokens.sample(rng)))
    return requests


def _image_bytes(reference: str, base_dir: Path) -> bytes:
    if reference.startswith("data:"):
        return base64.b64decode(reference.partition(",")[2])
    path = Path(reference)
    path = path if path.is_absolute() else base_dir / path
    if not path.is_file():
        raise FileNotFoundError(f"image {reference!r} not found (relative paths are read from {base_dir})")
    return path.read_bytes()


def load_jsonl(path: str | Path, default_max_tokens: int = SAMPLING_DEFAULTS.max_tokens) -> list[BenchRequest]:
    """Requests from a JSONL file, one per line, in the model card's chat format:

    {"messages": [{"role": "user", "content": [{"type": "text", "text": "Describe this X-ray"},
                                                {"type": "image", "image": "xray.png"}]}],
     "max_tokens": 200}

    An image part names a file (relative to the JSONL file) or a `data:` URI; a bare messages list
    is accepted as a line too.
    """
    path = Path(path)
    requests = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}:{number}: not JSON ({exc.msg})") from None
        if isinstance(item, list):
            item = {"messages": item}
        if not isinstance(item, dict) or not isinstance(item.get("messages"), list):
            raise ValueError(f'{path}:{number}: expected {{"messages": [...]}} or a list of chat messages')
        images, messages = [], []
        for message in item["messages"]:
            content = message.get("content")
            if isinstance(content, list):
                parts = []
                for part in content:
                    if part.get("type") == "image":
                        reference = part.get("image") or part.get("path") or part.get("url")
                        if not isinstance(reference, str):
                            raise ValueError(f"{path}:{number}: an image part needs \"image\": a file path or data: URI")
                        images.append(_image_bytes(reference, path.parent))
                        parts.append({"type": "image"})
                    else:
                        parts.append(part)
                content = parts
            messages.append({**message, "content": content})
        max_tokens = int(item.get("max_tokens", default_max_tokens))
        requests.append(BenchRequest(messages, tuple(images), max_tokens))
    if not requests:
        raise ValueError(f"{path}: no requests in the file")
    return requests
