"""The exported Gemma 3 decoder (decoder.onnx) run with ONNX Runtime: numpy only, no torch.

Graph contract (export/decoder.py writes it; the `llm` Triton model and the tests drive it):
  inputs   input_ids [B,T] int64; attention_mask [B,P+T] int64 (1 real, 0 left padding);
           position_ids [B,T] int64; image_embeddings [N,hidden] float32 (the rows for the image soft
           tokens of input_ids in row-major order, not scaled; N may be 0);
           past_key_values.{i}.key / .value [B,kv_heads,P,head_dim] float32 for every layer i
  outputs  logits [B,vocab] float32 (last position only); present.{i}.key / .value [B,kv_heads,P+T,head_dim]
The graph builds the causal, padding, sliding-window and same-image bidirectional masks itself.
A prompt is prefilled in one call, so an image is never split across calls (the image mask needs
the whole image in one call).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from medgemma_triton.spec import ModelSpec

INPUT_IDS = "input_ids"
ATTENTION_MASK = "attention_mask"
POSITION_IDS = "position_ids"
IMAGE_EMBEDDINGS = "image_embeddings"
LOGITS = "logits"


def past_names(num_layers: int) -> list[str]:
    return [f"past_key_values.{i}.{kind}" for i in range(num_layers) for kind in ("key", "value")]


def present_names(num_layers: int) -> list[str]:
    return [f"present.{i}.{kind}" for i in range(num_layers) for kind in ("key", "value")]


@dataclass
class SequenceState:
    """One request's decoding state: its prompt until prefilled, then its KV cache and next position."""

    prompt_ids: np.ndarray
    image_embeddings: np.ndarray
    past: list[np.ndarray] | None = None
    position: int = 0  # tokens in the KV cache == the next token's position
    generated: list[int] = field(default_factory=list)

    @property
    def prefilled(self) -> bool:
        return self.past is not None


class OnnxDecoder:
    def __init__(self, model_path: str | Path, spec: ModelSpec, intra_op_threads: int | None = None):
        import onnxruntime as ort

        self.spec = spec
        self.text = spec.text
        options = ort.SessionOptions()
        if intra_op_threads is not None:
            options.intra_op_num_threads = intra_op_threads
        self.session = ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
        self.past_names = past_names(self.text.num_layers)
        self.present_names = present_names(self.text.num_layers)
        expected_inputs = [INPUT_IDS, ATTENTION_MASK, POSITION_IDS, IMAGE_EMBEDDINGS, *self.past_names]
        graph_inputs = [i.name for i in self.session.get_inputs()]
        if sorted(graph_inputs) != sorted(expected_inputs):
            raise ValueError(
                f"{model_path}: decoder graph inputs {graph_inputs} do not match the checkpoint's "
                f"{self.text.num_layers} layers (expected {expected_inputs}); re-export it from this checkpoint"
            )
        self.output_names = [LOGITS, *self.present_names]

    # --- per-request incremental API (the Triton `llm` model) ---

    def new_sequence(self, prompt_ids: np.ndarray, image_embeddings: np.ndarray | None = None) -> SequenceState:
        prompt_ids = np.asarray(prompt_ids)
        if prompt_ids.ndim != 1 or prompt_ids.size == 0:
            raise ValueError(f"prompt_ids must be a non-empty 1-D array of token ids, got shape {prompt_ids.shape}")
        if not np.issubdtype(prompt_ids.dtype, np.integer):
            raise ValueError(f"prompt_ids must be integer token ids, got {prompt_ids.dtype}")
        if prompt_ids.min() < 0 or prompt_ids.max() >= self.text.vocab_size:
            raise ValueError(f"prompt_ids must lie in [0, {self.text.vocab_size}) (the vocabulary)")
        image_rows = self._image_rows([prompt_ids], [image_embeddings])
        return SequenceState(prompt_ids=prompt_ids.astype(np.int64), image_embeddings=image_rows)

    def prefill(self, state: SequenceState) -> np.ndarray:
        """Run the whole prompt; returns the next-token logits [vocab]."""
        if state.prefilled:
            raise ValueError("this sequence is already prefilled; call step() with the next token")
        ids = state.prompt_ids[None, :]
        length = ids.shape[1]
        logits, past = self.run(
            ids,
            np.ones((1, length), dtype=np.int64),
            np.arange(length, dtype=np.int64)[None, :],
            state.image_embeddings,
            self.empty_past(1),
        )
        state.past, state.position = past, length
        return logits[0]

    def step(self, state: SequenceState, token_id: int) -> np.ndarray:
        """Append one token; returns the next-token logits [vocab]."""
        if not state.prefilled:
            raise ValueError("prefill() the sequence before step()")
        token_id = int(token_id)
        if not 0 <= token_id < self.text.vocab_size:
            raise ValueError(f"token id {token_id} is outside the vocabulary [0, {self.text.vocab_size})")
        logits, past = self.run(
            np.array([[token_id]], dtype=np.int64),
            np.ones((1, state.position + 1), dtype=np.int64),
            np.array([[state.position]], dtype=np.int64),
            self.no_images(),
            state.past,
        )
        state.past, state.position = past, state.position + 1
        state.generated.append(token_id)
        return logits[0]

    # --- batch API (left-padded, like transformers generate) ---

    def generate_greedy(
        self,
        prompts: Sequence[np.ndarray],
        image_embeddings: Sequence[np.ndarray | None] | None = None,
        max_new_tokens: int = 32,
        eos_ids: Sequence[int] | None = None,
    ) -> list[list[int]]:
        """Greedy tokens per prompt, each list ending at its first eos (included), as HF generate."""
        if not prompts:
            raise ValueError("generate_greedy needs at least one prompt")
        if image_embeddings is None:
            image_embeddings = [None] * len(prompts)
        if len(image_embeddings) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(image_embeddings)} image_embeddings entries")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        eos = np.array(self.spec.tokens.eos if eos_ids is None else list(eos_ids), dtype=np.int64)
        prompts = [np.asarray(p) for p in prompts]
        for p in prompts:
            if p.ndim != 1 or p.size == 0:
                raise ValueError(f"each prompt must be a non-empty 1-D array of token ids, got shape {p.shape}")
        image_rows = self._image_rows(prompts, image_embeddings)
        batch, width = len(prompts), max(p.size for p in prompts)
        ids = np.full((batch, width), self.spec.tokens.pad, dtype=np.int64)
        attention_mask = np.zeros((batch, width), dtype=np.int64)
        for row, p in enumerate(prompts):
            ids[row, width - p.size :] = p
            attention_mask[row, width - p.size :] = 1
        # transformers' positions for a left-padded batch: cumsum of the mask, 0 on padding
        position_ids = np.where(attention_mask == 1, np.cumsum(attention_mask, axis=1) - 1, 0)
        logits, past = self.run(ids, attention_mask, position_ids, image_rows, self.empty_past(batch))
        next_position = position_ids[:, -1:] + 1
        unfinished = np.ones(batch, dtype=bool)
        generated: list[list[int]] = [[] for _ in range(batch)]
        for step in range(max_new_tokens):
            tokens = logits.argmax(axis=-1)  # first index on ties, as torch.argmax
            # finished rows keep decoding pad tokens (HF generate does the same; they are not returned)
            tokens = np.where(unfinished, tokens, self.spec.tokens.pad)
            for row in np.flatnonzero(unfinished):
                generated[row].append(int(tokens[row]))
            unfinished &= ~np.isin(tokens, eos)
            if not unfinished.any() or step == max_new_tokens - 1:
                break
            attention_mask = np.concatenate([attention_mask, np.ones((batch, 1), dtype=np.int64)], axis=1)
            logits, past = self.run(tokens[:, None], attention_mask, next_position, self.no_images(), past)
            next_position = next_position + 1
        return generated

    # --- internals ---

    def _image_rows(self, prompts: Sequence[np.ndarray], image_embeddings: Sequence[np.ndarray | None]) -> np.ndarray:
        """Validate per-prompt image rows against the prompts' image tokens; concatenate row-major."""
        hidden, image_token = self.text.hidden_size, self.spec.tokens.image
        rows = []
        for index, (ids, embeddings) in enumerate(zip(prompts, image_embeddings)):
            image_tokens = int(np.count_nonzero(ids == image_token)) if image_token >= 0 else 0
            if embeddings is None:
                if image_tokens:
                    raise ValueError(
                        f"prompt {index} has {image_tokens} image tokens but no image_embeddings were given"
                    )
                continue
            embeddings = np.asarray(embeddings)
            if embeddings.ndim == 3:  # [images, tokens_per_image, hidden] from the vision encoder
                embeddings = embeddings.reshape(-1, embeddings.shape[-1])
            if embeddings.ndim != 2 or embeddings.shape[1] != hidden:
                raise ValueError(
                    f"image_embeddings for prompt {index} must be [rows, {hidden}] float32, got {embeddings.shape}"
                )
            if embeddings.shape[0] != image_tokens:
                raise ValueError(
                    f"prompt {index} has {image_tokens} image tokens but {embeddings.shape[0]} image embedding "
                    f"rows; each image needs {self.spec.mm_tokens_per_image} rows"
                )
            if embeddings.shape[0]:
                rows.append(embeddings.astype(np.float32, copy=False))
        return np.concatenate(rows, axis=0) if rows else self.no_images()

    def no_images(self) -> np.ndarray:
        return np.zeros((0, self.text.hidden_size), dtype=np.float32)

    def empty_past(self, batch: int) -> list[np.ndarray]:
        shape = (batch, self.text.num_kv_heads, 0, self.text.head_dim)
        return [np.zeros(shape, dtype=np.float32) for _ in self.past_names]

    def run(
        self,
        input_ids: np.ndarray,
        attention_mask: np.ndarray,
        position_ids: np.ndarray,
        image_embeddings: np.ndarray,
        past: list[np.ndarray],
    ) -> tuple[np.ndarray, list[np.ndarray]]:
        """One graph call (the contract above): returns (logits [B,vocab], present KV per layer)."""
        feeds = {
            INPUT_IDS: input_ids.astype(np.int64, copy=False),
            ATTENTION_MASK: attention_mask.astype(np.int64, copy=False),
            POSITION_IDS: position_ids.astype(np.int64, copy=False),
            IMAGE_EMBEDDINGS: image_embeddings,
            **dict(zip(self.past_names, past)),
        }
        logits, *present = self.session.run(self.output_names, feeds)
        return logits, present
