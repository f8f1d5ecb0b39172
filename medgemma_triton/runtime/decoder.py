"""The exported Gemma 3 decoder (decoder.onnx) run with ONNX Runtime: numpy only, no torch.

Graph contract (export/decoder.py writes it; the `llm` Triton model and the tests drive it):
  inputs   input_ids [B,T] int64; attention_mask [B,P+T] int64 (1 real, 0 left padding);
           position_ids [B,T] int64; image_embeddings [N,hidden] float32 (the rows for the image soft
           tokens of input_ids in row-major order, not scaled; N may be 0);
           past_key_values.{i}.key / .value [B,kv_heads,P_i,head_dim] float32 for every layer i:
             P_i = P on global layers; on sliding layers the last S <= P of those keys (S >= min(P, W-1))
  outputs  logits [B,vocab] float32 (last position only); present.{i}.key / .value [B,kv_heads,P_i',head_dim]:
             P+T on global layers, min(S+T, W-1) on sliding layers (W = sliding_window)
The graph builds the causal, padding, sliding-window and same-image bidirectional masks itself.
The image mask is built among one call's tokens, so an image is never split across calls: a prompt
is prefilled in one call (prefill), or in chunks that end only outside an image's soft tokens
(prefill_chunk with chunk_ends). Chunked logits match one call's to float rounding (tests/test_engine_batching.py).

Every cache is right-aligned: column -1 of every layer is the newest token. Rows of a batch may have
different lengths: shorter rows are left-padded with zeros and attention_mask marks those columns 0
(step_batch, prefill_batch, generate_greedy). Graphs exported before the sliding cache was trimmed
return full-length sliding presents; everything here works with either (it never assumes a length).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from medgemma_triton.runtime.host_check import check_decoder_export
from medgemma_triton.spec import ModelSpec

INPUT_IDS = "input_ids"
ATTENTION_MASK = "attention_mask"
POSITION_IDS = "position_ids"
IMAGE_EMBEDDINGS = "image_embeddings"
LOGITS = "logits"
# Set (to "1") in a decoder graph whose products quantize their activations once per call with one scale
# for all rows (DynamicQuantizeMatMul: the int8 export). Its prefill runs the first token alone: Gemma's
# first token (BOS, the attention sink) carries activations far larger than any other row's, and sharing
# a call with it coarsens every other row's quantization (measured per CPU class: docs/quantization.md).
PREFILL_FIRST_TOKEN_ALONE = "medgemma_triton.prefill_first_token_alone"


def sliding_cache_length(text) -> int:
    """Keys a sliding layer keeps: a query at q sees keys k > q - sliding_window, so the last window - 1."""
    if text.sliding_window < 2:
        raise ValueError(f"sliding_window {text.sliding_window} must be >= 2")
    return text.sliding_window - 1


def kv_cache_bytes(text, context: int, trimmed: bool = True, dtype_bytes: int = 4) -> int:
    """KV-cache bytes one sequence holds at `context` tokens (fp32 by default, as the ONNX graph's cache).

    trimmed=False: every layer keeps every key (graphs exported before the sliding cache was trimmed).
    """
    per_token_per_layer = 2 * text.num_kv_heads * text.head_dim * dtype_bytes  # a key and a value
    keep = sliding_cache_length(text)
    return sum(
        per_token_per_layer * (min(context, keep) if trimmed and text.is_sliding(layer) else context)
        for layer in range(text.num_layers)
    )


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

    @property
    def kv_bytes(self) -> int:
        """Bytes held by this sequence's KV cache (0 before prefill)."""
        return sum(a.nbytes for a in self.past) if self.past is not None else 0


@dataclass(eq=False)
class _BatchCache:
    """step_batch's last batch: its states in order, the cache lists it gave them, and its present."""

    states: list[SequenceState]
    pasts: list[list[np.ndarray]]
    present: list[np.ndarray]

    def holds(self, states: list[SequenceState]) -> bool:
        """True if `states` are this batch in order and none has a cache from anywhere else since."""
        return (
            len(states) == len(self.states)
            and all(a is b for a, b in zip(states, self.states))
            and all(s.past is past for s, past in zip(states, self.pasts))
        )


class DecoderInputs:
    """What every decoder checks of its inputs, and where its prefill chunks end (OnnxDecoder here,
    runtime/llamacpp.LlamaDecoder for GGUF files): one set of rules for both engines."""

    first_token_alone = False  # prefill the first token in a call of its own (chunk_ends)

    def __init__(self, spec: ModelSpec):
        self.spec = spec
        self.text = spec.text

    def release(self, state) -> None:
        """A request is done with its state (from any thread). OnnxDecoder's state is its own cache: nothing to do."""

    def close(self) -> None:
        """Free what the decoder holds outside Python (LlamaDecoder)."""

    def check_prompt(self, prompt_ids: np.ndarray) -> np.ndarray:
        prompt_ids = np.asarray(prompt_ids)
        if prompt_ids.ndim != 1 or prompt_ids.size == 0:
            raise ValueError(f"prompt_ids must be a non-empty 1-D array of token ids, got shape {prompt_ids.shape}")
        if not np.issubdtype(prompt_ids.dtype, np.integer):
            raise ValueError(f"prompt_ids must be integer token ids, got {prompt_ids.dtype}")
        if prompt_ids.min() < 0 or prompt_ids.max() >= self.text.vocab_size:
            raise ValueError(f"prompt_ids must lie in [0, {self.text.vocab_size}) (the vocabulary)")
        return prompt_ids

    def chunk_ends(self, prompt_ids: np.ndarray, chunk_tokens: int) -> list[int]:
        """Where prefill_chunk calls end for a prompt: every `chunk_tokens` tokens (0: the whole prompt in
        one call), moved back to the start of an image that a chunk would split, or forward to its end
        when the image alone is longer than a chunk. The first token goes alone for graphs that ask it."""
        length = int(prompt_ids.size)
        image = np.asarray(prompt_ids) == self.spec.tokens.image
        ends = [1] if self.first_token_alone and length > 1 else []
        start = ends[-1] if ends else 0
        size = chunk_tokens if chunk_tokens > 0 else length
        while start < length:
            end = min(start + size, length)
            while start < end < length and image[end] and image[end - 1]:
                end -= 1  # back to the start of the image that `end` splits
            if end == start:  # one image longer than a chunk: take it whole
                end = start + 1
                while end < length and image[end] and image[end - 1]:
                    end += 1
            ends.append(end)
            start = end
        return ends

    @staticmethod
    def _distinct(states: Sequence[SequenceState], what: str) -> list[SequenceState]:
        states = list(states)
        if not states:
            raise ValueError(f"{what} needs at least one sequence")
        if len({id(s) for s in states}) != len(states):
            raise ValueError(f"{what}: the same sequence is given twice")
        return states

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


class OnnxDecoder(DecoderInputs):
    def __init__(self, model_path: str | Path, spec: ModelSpec, intra_op_threads: int | None = None):
        import onnxruntime as ort

        super().__init__(spec)
        # a quantized export of an older scheme, or a CPU whose kernels get its products wrong, is refused
        self.host_check = check_decoder_export(model_path)
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
        metadata = self.session.get_modelmeta().custom_metadata_map
        self.first_token_alone = metadata.get(PREFILL_FIRST_TOKEN_ALONE) == "1"
        self._last_batch: _BatchCache | None = None
        self.batch_cache_reuses = 0  # step_batch calls that fed the previous call's present as is

    # --- per-request incremental API (the Triton `llm` model) ---

    def new_sequence(self, prompt_ids: np.ndarray, image_embeddings: np.ndarray | None = None) -> SequenceState:
        prompt_ids = self.check_prompt(prompt_ids)
        image_rows = self._image_rows([prompt_ids], [image_embeddings])
        return SequenceState(prompt_ids=prompt_ids.astype(np.int64), image_embeddings=image_rows)

    def prefill(self, state: SequenceState) -> np.ndarray:
        """Run the whole prompt; returns the next-token logits [vocab]."""
        if state.prefilled:
            raise ValueError("this sequence is already prefilled; call step() with the next token")
        ids = state.prompt_ids[None, :]
        length = ids.shape[1]
        # image soft tokens always follow <start_of_image>, so the first token is never one: an image still
        # arrives whole in one call
        start = 1 if self.first_token_alone and length > 1 else 0
        past = self.empty_past(1)
        if start:
            _, past = self.run(ids[:, :1], np.ones((1, 1), dtype=np.int64), np.zeros((1, 1), dtype=np.int64),
                               self.no_images(), past)
        logits, past = self.run(
            ids[:, start:],
            np.ones((1, length), dtype=np.int64),
            np.arange(start, length, dtype=np.int64)[None, :],
            state.image_embeddings,
            past,
        )
        state.past, state.position = past, length
        return logits[0]

    def prefill_chunk(self, state: SequenceState, end: int) -> np.ndarray | None:
        """Prefill the prompt's tokens from state.position up to `end` (from chunk_ends: never inside an
        image); returns the next-token logits [vocab] once the whole prompt is in, else None."""
        ids, length, start = state.prompt_ids, state.prompt_ids.size, state.position
        if not start < end <= length:
            raise ValueError(f"prefill_chunk: end {end} must lie in ({start}, {length}]")
        image = self.spec.tokens.image
        rows = state.image_embeddings[int(np.count_nonzero(ids[:start] == image)) : int(np.count_nonzero(ids[:end] == image))]
        logits, past = self.run(ids[None, start:end], np.ones((1, end), dtype=np.int64),
                                np.arange(start, end, dtype=np.int64)[None, :], rows,
                                state.past if state.past is not None else self.empty_past(1))
        state.past, state.position = past, end
        return logits[0] if end == length else None

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

    # --- continuous batching: sequences with different lengths share one graph call ---

    def prefill_batch(self, states: Sequence[SequenceState]) -> np.ndarray:
        """Prefill several new sequences in one call (prompts left-padded); returns logits [len(states), vocab].
        Unlike prefill() (the serving engine's), it never runs the first token alone."""
        states = self._distinct(states, "prefill_batch")
        for state in states:
            if state.prefilled:
                raise ValueError("prefill_batch: a sequence is already prefilled; use step_batch")
        width = max(s.prompt_ids.size for s in states)
        ids = np.full((len(states), width), self.spec.tokens.pad, dtype=np.int64)
        attention_mask = np.zeros((len(states), width), dtype=np.int64)
        for row, state in enumerate(states):
            ids[row, width - state.prompt_ids.size :] = state.prompt_ids
            attention_mask[row, width - state.prompt_ids.size :] = 1
        position_ids = np.where(attention_mask == 1, np.cumsum(attention_mask, axis=1) - 1, 0)
        image_rows = [s.image_embeddings for s in states if s.image_embeddings.shape[0]]
        images = np.concatenate(image_rows, axis=0) if image_rows else self.no_images()
        logits, present = self.run(ids, attention_mask, position_ids, images, self.empty_past(len(states)))
        for row, state in enumerate(states):
            state.past = self._row_cache(present, row, [0] * len(present), state.prompt_ids.size)
            state.position = state.prompt_ids.size
        return logits

    def step_batch(self, states: Sequence[SequenceState], token_ids: Sequence[int]) -> np.ndarray:
        """Append one token to each prefilled sequence in one graph call; returns logits [len(states), vocab].

        Sequences may be at different positions and may join or leave between calls: a call left-pads
        every layer's cache to the longest row and writes each row's own present back to its state.
        When the batch is the previous call's batch, in order, and no row was stepped elsewhere since,
        that call's present is already this left-padded cache (its padding columns are the zeros the
        call was given) and is fed as is: steady-state decoding copies no cache in Python.
        """
        states = self._distinct(states, "step_batch")
        tokens = np.asarray(token_ids, dtype=np.int64).reshape(-1)
        if tokens.size != len(states):
            raise ValueError(f"step_batch: {len(states)} sequences but {tokens.size} token ids")
        for state in states:
            if not state.prefilled:
                raise ValueError("step_batch: prefill() every sequence before stepping it")
        if tokens.min() < 0 or tokens.max() >= self.text.vocab_size:
            raise ValueError(f"step_batch: token ids must lie in [0, {self.text.vocab_size}) (the vocabulary)")
        positions = np.array([s.position for s in states], dtype=np.int64)
        total = int(positions.max()) + 1
        attention_mask = (np.arange(total)[None, :] >= (total - 1 - positions)[:, None]).astype(np.int64)
        lengths = [[s.past[layer].shape[2] for s in states] for layer in range(len(self.past_names))]
        last = self._last_batch
        self._last_batch = None  # the states change below; a failed call must not leave a stale cache
        if last is not None and last.holds(states):
            past = last.present
            self.batch_cache_reuses += 1
        else:
            past = [self._left_pad([s.past[layer] for s in states]) for layer in range(len(self.past_names))]
        logits, present = self.run(tokens[:, None], attention_mask, positions[:, None], self.no_images(), past)
        for row, state in enumerate(states):
            state.past = self._row_cache(present, row, [lengths[layer][row] for layer in range(len(present))], 1)
            state.position += 1
            state.generated.append(int(tokens[row]))
        self._last_batch = _BatchCache(states, [s.past for s in states], present)
        return logits

    def release_batch(self) -> None:
        """Drop the last batch's present (step_batch keeps it for reuse) once its sequences are gone."""
        self._last_batch = None

    @staticmethod
    def _left_pad(caches: list[np.ndarray]) -> np.ndarray:
        """[1,H,L_i,D] per row -> [rows,H,max L_i,D], each row right-aligned, zeros on the left."""
        width = max(c.shape[2] for c in caches)
        if all(c.shape[2] == width for c in caches):
            return np.concatenate(caches, axis=0)
        _, heads, _, head_dim = caches[0].shape
        batched = np.zeros((len(caches), heads, width, head_dim), dtype=caches[0].dtype)
        for row, cache in enumerate(caches):
            batched[row, :, width - cache.shape[2] :] = cache[0]
        return batched

    @staticmethod
    def _row_cache(present: list[np.ndarray], row: int, past_lengths: list[int], new_tokens: int) -> list[np.ndarray]:
        """A row's own columns of each present: its past plus the new tokens, capped at what the layer kept.

        Views into the batch's present (no copy); the next call copies them into its own batch.
        """
        return [
            p[row : row + 1, :, p.shape[2] - min(length + new_tokens, p.shape[2]) :]
            for p, length in zip(present, past_lengths)
        ]

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
            **{name: np.ascontiguousarray(p) for name, p in zip(self.past_names, past)},
        }
        logits, *present = self.session.run(self.output_names, feeds)
        return logits, present
