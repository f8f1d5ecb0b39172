"""MedGemma 1.5's many-image requests through the real server, with its default limits, against transformers.

- A CT series of 90 DICOM files, stored under shuffled names, sent with `medgemma-triton chat --series`,
  answers as transformers' greedy `generate` does on the notebook's own rendering of the same series
  (85 slices sampled by its formula, windowed by its arithmetic, JPEG-encoded by Pillow: test_series.py's
  `notebook_rgb`, computed from the stored values, not by client/series.py).
- Four slide patches in one request, and a prior and a current image, answer token for token too.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from test_series import hounsfield, notebook_rgb, pillow_jpeg, stored_pattern, write_series
from test_serving import png, reference_generate

from medgemma_triton.cli import main
from medgemma_triton.client import MedGemmaClient, load_series, series_messages
from medgemma_triton.runtime.tokenizer import load_tokenizer

SLICES_STORED = 90  # more than the recipe's 85: the notebook's sampling decides which are sent
RECIPE_SLICES = 85
MAX_TOKENS = 12
QUESTION = "Are there any findings in this CT volume?"


def notebook_volume(count: int) -> list[bytes]:
    """The notebook's slices for a series of `count` slices in true order 0..count-1."""
    kept = [int(round(i / RECIPE_SLICES * (count - 1))) for i in range(1, RECIPE_SLICES + 1)]
    return [pillow_jpeg(notebook_rgb(hounsfield(stored_pattern(i)))) for i in kept]


def volume_messages(question: str) -> list[dict]:
    content = []
    for k in range(1, RECIPE_SLICES + 1):
        content += [{"type": "image"}, {"type": "text", "text": f"SLICE {k}"}]
    return [{"role": "user", "content": content + [{"type": "text", "text": question}]}]


@pytest.mark.served  # {name}_server, asked for by name
@pytest.mark.parametrize("name", ["tiny", "dev"])
def test_a_shuffled_ct_series_answers_as_transformers_on_the_notebooks_rendering(name, request, tmp_path, capsys):
    server = request.getfixturevalue(f"{name}_server")
    checkpoint = request.getfixturevalue(f"{name}_checkpoint")
    folder = tmp_path / "series"
    write_series(folder, SLICES_STORED)
    prompt_length, expected = reference_generate(checkpoint, volume_messages(QUESTION), notebook_volume(SLICES_STORED),
                                                 MAX_TOKENS)

    capsys.readouterr()  # what the fixtures printed
    code = main(["chat", "--url", server.url, "--series", str(folder), "--max-tokens", str(MAX_TOKENS), "--json",
                 QUESTION])
    out = capsys.readouterr().out
    assert code == 0, out
    answer = json.loads(out)
    expected_text = load_tokenizer(str(checkpoint)).decode(expected, skip_special_tokens=True)
    assert (answer["prompt_tokens"], answer["completion_tokens"], answer["text"]) == (
        prompt_length, len(expected), expected_text)

    with MedGemmaClient(server.url) as client:  # the same request through the Python API: the ids themselves
        result = client.chat(series_messages(load_series(folder), QUESTION), max_tokens=MAX_TOKENS)
    assert list(result.token_ids) == expected


def _patch(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    return png_of(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))


def png_of(array: np.ndarray) -> bytes:
    import io

    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


MULTI_IMAGE = {
    # name: (user content, image bytes)
    "four slide patches": (
        [{"type": "text", "text": "These are four patches of one H&E slide."}]
        + [{"type": "image"}] * 4 + [{"type": "text", "text": "Describe the tissue."}],
        [_patch(seed) for seed in range(4)],
    ),
    "a prior and a current chest X-ray": (
        [{"type": "text", "text": "Prior study:"}, {"type": "image"}, {"type": "text", "text": "Current study:"},
         {"type": "image"}, {"type": "text", "text": "What changed?"}],
        [png(21), png(22)],
    ),
}


@pytest.mark.parametrize("case", list(MULTI_IMAGE))
def test_many_image_requests_answer_as_transformers(case, tiny_server, tiny_checkpoint):
    content, images = MULTI_IMAGE[case]
    messages = [{"role": "user", "content": content}]
    _, expected = reference_generate(tiny_checkpoint, messages, images, MAX_TOKENS)
    pictures = iter(images)
    sent = [{"role": "user", "content": [{"type": "image", "image": next(pictures)} if part["type"] == "image" else part
                                         for part in content]}]
    with MedGemmaClient(tiny_server.url) as client:
        assert list(client.chat(sent, max_tokens=MAX_TOKENS).token_ids) == expected
