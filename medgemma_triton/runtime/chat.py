"""Chat messages -> prompt token ids, exactly as transformers' Gemma3Processor.apply_chat_template builds them.

The reference (transformers 5.23, `processor.apply_chat_template(messages, add_generation_prompt=True,
tokenize=True)`) does four things, each reproduced here without importing transformers:
1. renders the checkpoint's Jinja chat template in a sandboxed environment (utils/chat_template_utils.py)
   with the tokenizer's special tokens (bos_token, ...) as template variables;
2. replaces every `<start_of_image>` the template wrote with the full image sequence
   (spec.image_sequence_text(): "\\n\\n<start_of_image>" + mm_tokens_per_image soft tokens + "<end_of_image>\\n\\n");
3. tokenizes with the checkpoint's tokenizer.json, adding no special tokens when the prompt already
   starts with bos_token (it always does for Gemma 3's template);
4. checks that the number of image placeholders equals the number of images.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.utils
import numpy as np
from jinja2.sandbox import ImmutableSandboxedEnvironment

from medgemma_triton.runtime.limits import InvalidRequest, Limits
from medgemma_triton.runtime.messages import count_image_parts, messages_from_text_input, text_parts
from medgemma_triton.runtime.tokenizer import load_tokenizer, special_tokens_map
from medgemma_triton.spec import ModelSpec

# --- the Jinja environment of transformers.utils.chat_template_utils._cached_compile_jinja_template ---


class _GenerationTag(jinja2.ext.Extension):
    """transformers' AssistantTracker parses {% generation %}...{% endgeneration %}; rendering it is a no-op."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render_body"), [], [], body).set_lineno(lineno)

    def _render_body(self, caller):
        return caller()


class _TemplateDict:
    """transformers' `dict` global: constructs dicts without exposing the dict type to the sandbox."""

    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
        return dict.fromkeys(*args, **kwargs)


class _TemplateNamespace(jinja2.utils.Namespace):
    """transformers' `namespace` global: rejects underscore-prefixed attributes."""

    def __init__(*args, **kwargs):
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(
                f"Chat templates cannot store underscore-prefixed attributes on a namespace, but got {name!r}."
            )


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # transformers overrides Jinja's tojson, which HTML-escapes
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format):
    return datetime.now().strftime(format)


def compile_chat_template(chat_template: str) -> jinja2.Template:
    environment = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    environment.filters["tojson"] = _tojson
    environment.globals["raise_exception"] = _raise_exception
    environment.globals["strftime_now"] = _strftime_now
    environment.globals["dict"] = _TemplateDict()
    environment.globals["namespace"] = _TemplateNamespace
    return environment.from_string(chat_template)


class PromptBuilder:
    """Messages -> prompt token ids for one checkpoint (its chat template, tokenizer and image geometry)."""

    def __init__(self, spec: ModelSpec, checkpoint_dir: str | Path, limits: Limits):
        self.spec = spec
        self.limits = limits
        self.tokenizer = load_tokenizer(str(checkpoint_dir))
        self.template_variables = special_tokens_map(checkpoint_dir)
        self.template = compile_chat_template(spec.chat_template)
        self._bos_text = self.template_variables.get("bos_token")
        self._reserved = (
            (spec.tokens.boi_text, spec.tokens.eoi_text, spec.tokens.image_text) if spec.multimodal else ()
        )

    def render(self, messages: list[dict]) -> str:
        """The chat template's text, before image expansion (transformers' apply_chat_template(tokenize=False))."""
        try:
            return self.template.render(
                messages=messages,
                tools=None,
                documents=None,
                add_generation_prompt=True,
                **self.template_variables,
            )
        except jinja2.exceptions.TemplateError as exc:
            if type(exc) is jinja2.exceptions.TemplateError:  # the template's raise_exception: its author's words
                raise InvalidRequest(f"the chat template rejected the messages: {exc}") from None
            # anything else (a field the template reads and the messages lack) names Jinja's internals
            raise InvalidRequest(
                "the chat template cannot render these messages; send them as the model card shows: "
                "an optional first system message of text, then user and assistant turns in alternation"
            ) from None

    def build(self, messages: list[dict], num_images_provided: int) -> np.ndarray:
        """Prompt input ids (int64, 1-D) for validated `messages` with `num_images_provided` encoded images."""
        image_parts = count_image_parts(messages)
        self._check_images(image_parts, num_images_provided)
        for index, text in text_parts(messages):
            for marker in self._reserved:
                if marker in text:
                    raise InvalidRequest(
                        f"messages[{index}] text contains the reserved image marker {marker!r}; "
                        "put images in {\"type\": \"image\"} parts instead"
                    )

        prompt = self.render(messages)
        self._check_nothing_dropped(messages, prompt, image_parts)
        if image_parts:
            prompt = prompt.replace(self.spec.tokens.boi_text, self.spec.image_sequence_text())

        # transformers adds no special tokens when the rendered prompt already starts with bos_token
        add_special_tokens = not (self._bos_text is not None and prompt.startswith(self._bos_text))
        ids = np.asarray(self.tokenizer.encode(prompt, add_special_tokens=add_special_tokens).ids, dtype=np.int64)

        image_tokens = image_parts * self.spec.mm_tokens_per_image
        if image_parts:
            counted = int(np.count_nonzero(ids == self.spec.tokens.image))
            assert counted == image_tokens, f"{counted} image tokens in the prompt, expected {image_tokens}"
        if len(ids) > self.limits.max_input_tokens:
            detail = f" ({image_tokens} of them image tokens)" if image_tokens else ""
            raise InvalidRequest(
                f"the prompt is {len(ids)} tokens{detail}; the limit is {self.limits.max_input_tokens} "
                f"({Limits.env_name('max_input_tokens')})"
            )
        return ids

    def build_from_text_input(self, text_input: str | bytes, num_images_provided: int) -> np.ndarray:
        return self.build(messages_from_text_input(text_input, num_images_provided, self.limits), num_images_provided)

    def _check_images(self, image_parts: int, num_images_provided: int) -> None:
        if not self.spec.multimodal and (image_parts or num_images_provided):
            raise InvalidRequest(f"this model ({self.spec.architecture}) takes text only; the request has images")
        if image_parts != num_images_provided:
            if num_images_provided == 0:
                raise InvalidRequest(
                    f"messages have {image_parts} image part(s) but no images were sent; send one encoded "
                    "image per {\"type\": \"image\"} part in `images`"
                )
            if image_parts == 0:
                raise InvalidRequest(
                    f"{num_images_provided} image(s) were sent but messages have no {{\"type\": \"image\"}} part; "
                    "add one image part per image where it belongs in the conversation"
                )
            raise InvalidRequest(
                f"messages have {image_parts} image part(s) but {num_images_provided} image(s) were sent; "
                "they must match one to one, in order"
            )
        if image_parts > self.limits.max_images:
            raise InvalidRequest(
                f"the request has {image_parts} images; the limit is {self.limits.max_images} "
                f"({Limits.env_name('max_images')})"
            )

    def _check_nothing_dropped(self, messages: list[dict], prompt: str, image_parts: int) -> None:
        # Gemma 3's template reads only the first part of a system message: never drop a user's content silently
        rendered_images = prompt.count(self.spec.tokens.boi_text) if self.spec.multimodal else 0
        if rendered_images != image_parts:
            raise InvalidRequest(
                f"the chat template placed {rendered_images} of {image_parts} image part(s); "
                "images are only allowed in user and assistant messages"
            )
        # the template writes messages in order: one forward scan keeps this linear in the prompt length
        cursor = 0
        for index, text in text_parts(messages):
            stripped = text.strip()  # Gemma 3's template writes text | trim
            found = prompt.find(stripped, cursor)
            cursor = found + len(stripped)
            if found < 0:
                raise InvalidRequest(
                    f"the chat template dropped text of messages[{index}] "
                    "(a system message must be one text part: a string or a single {\"type\": \"text\"} part)"
                )
