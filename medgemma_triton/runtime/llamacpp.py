"""The Gemma 3 decoder of a GGUF file run by llama.cpp (llama-cpp-python's low-level API): the cpu
profile's quantized precisions (int4 = Q4_K_M, int8 = Q8_0). The only module that imports llama_cpp.

It keeps OnnxDecoder's interface (new_sequence, chunk_ends, prefill_chunk, prefill, step, step_batch,
release_batch), so the serving engine, the quality gates and the parity tests drive either one, and adds
release(state), which frees the request's sequence in llama.cpp's KV cache.

Assumptions this rests on (asserted where they can be; docs/llamacpp.md says why each holds):
- One llama context per decoder, with `max_sequences` sequences sharing one unified KV cache of
  `context_tokens` cells (kv_unified: any mix of sequences shares one ubatch, so a decode step of every
  active request reads the weights once). Only the thread that owns the decoder calls into it;
  release() may come from any thread and is carried out at the owner's next call.
- Every sequence's positions run 0, 1, 2, ... over its whole prompt and generation (1-D RoPE, as
  transformers), and each call's rows of one sequence continue its positions.
- Token embeddings are scaled by sqrt(hidden) inside llama.cpp; image rows fed through `embd` are not
  (llama.cpp's gemma3 graph), which is what the vision encoder hands over: transformers splices the
  projector's rows in after scaling the text embeddings.
- An image's soft tokens go in one call of their own, with causal attention off, as llama.cpp's mtmd
  decodes Gemma 3 images: every row of the image then sees the whole image and everything before it
  (sliding window still applied), which is transformers' "causal or same image" mask. Text before and
  after goes in causal calls. A run of consecutive image tokens is one such call (transformers groups
  it as one image), so it must fit one ubatch (`n_ubatch`, at least 512 and at least one image).
- llama.cpp aborts the process, not the call, on a batch larger than n_batch or a non-causal batch
  larger than n_ubatch: both are checked here before llama_decode.
- Logits come back for the rows flagged, in batch order: one row per sequence in a decode step.
- llama.cpp places a batch's rows in the first free cells from where its last search ended (and from
  cell 0 only once that is far enough along), and attention reads every cell up to the last one used.
  So when every sequence has been freed the cache is cleared, which restarts the search at cell 0.
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from medgemma_triton.runtime.decoder import DecoderInputs
from medgemma_triton.spec import ModelSpec

log = logging.getLogger(__name__)

# What the artifacts depend on: the GGUF files are made by this llama.cpp and read by it.
LLAMA_CPP_PYTHON = "0.3.36"
LLAMA_CPP_PYTHON_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
LLAMA_CPP_COMMIT = "0c1e57098"  # the llama.cpp that LLAMA_CPP_PYTHON vendors (its CHANGELOG)

MIN_UBATCH = 512  # llama-bench's default physical batch
GGML_TYPE_F32, GGML_TYPE_F16 = 0, 1
FLASH_ATTN_DISABLED, FLASH_ATTN_AUTO = 0, -1
GGML_LOG_LEVEL_WARN, GGML_LOG_LEVEL_ERROR = 3, 4  # ggml.h's enum ggml_log_level

_backends_lock = threading.Lock()
_backends: dict | None = None


class LlamaCppMissing(RuntimeError):
    """llama-cpp-python is not installed (the cpu profile's int4/int8 need it: scripts/setup-llamacpp.sh)."""


def _llama():
    try:
        import llama_cpp
    except ImportError as exc:
        raise LlamaCppMissing(
            f"llama-cpp-python {LLAMA_CPP_PYTHON} is not installed: the cpu profile's int4 and int8 decoders run on "
            "llama.cpp; install it with `bash scripts/setup-llamacpp.sh` (builds it once, with every CPU variant)"
        ) from exc
    if llama_cpp.__version__ != LLAMA_CPP_PYTHON:
        raise LlamaCppMissing(
            f"llama-cpp-python {llama_cpp.__version__} is installed; this release needs {LLAMA_CPP_PYTHON} "
            "(re-run `bash scripts/setup-llamacpp.sh`)"
        )
    return llama_cpp


def _on_log(level: int, text: bytes, _user_data) -> None:
    """llama.cpp's log: warnings and errors to Python logging, and the CPU variant ggml loaded. It never
    sees prompts or outputs (token ids and text stay in Python)."""
    message = (text or b"").decode("utf-8", "replace").rstrip()
    if "loaded CPU backend from" in message:
        _loaded_variant.append(message.rsplit("/", 1)[-1])
    if any(marker in message for marker in _QUIET):
        return
    if level in (GGML_LOG_LEVEL_WARN, GGML_LOG_LEVEL_ERROR) and message:
        log.log(logging.WARNING if level == GGML_LOG_LEVEL_WARN else logging.ERROR, "llama.cpp: %s", message)


# Per-tensor or per-token notes that repeat by the dozen: the quantizer's fallback types (its summary line
# stays, and the manifest records bytes per type) and the converter's tokenizer, which is never used.
_QUIET = ("control-looking token", "-> falling back to", "not divisible by")
_log_callback = None  # the C callback: referenced here so it outlives every call
_loaded_variant: list[str] = []  # the libggml-cpu-*.so ggml reported loading


def load_backends() -> dict:
    """Load ggml's CPU variants from the installed package and pick the best one for this CPU (once per
    process). Returns what was loaded: {"variant": "libggml-cpu-haswell.so", "system_info": "..."}.

    llama-cpp-python does not load ggml's dynamic backends itself: ggml searches the executable's
    directory (Python's), so the package's lib/ is named here.
    """
    global _backends, _log_callback
    with _backends_lock:
        if _backends is not None:
            return _backends
        llama_cpp = _llama()
        # llama_cpp._logger installed a callback that prints every INFO line to stderr; ours replaces it
        _log_callback = llama_cpp.llama_log_callback(_on_log)
        llama_cpp.llama_log_set(_log_callback, ctypes.c_void_p(0))
        lib_dir = Path(llama_cpp.__file__).parent / "lib"
        # the instance libllama links (its soname, through its $ORIGIN runpath): the wheel holds copies, not
        # links, of libggml.so and libggml.so.0, and llama_cpp._ggml's libggml.so keeps a registry of its own
        libggml = ctypes.CDLL(str(lib_dir / "libggml.so.0"))
        libggml.ggml_backend_load_all_from_path.argtypes = [ctypes.c_char_p]
        libggml.ggml_backend_load_all_from_path.restype = None
        libggml.ggml_backend_reg_count.restype = ctypes.c_size_t
        libggml.ggml_backend_load_all_from_path(str(lib_dir).encode())
        if libggml.ggml_backend_reg_count() == 0:
            raise LlamaCppMissing(f"no ggml CPU backend could be loaded from {lib_dir}: rebuild with scripts/setup-llamacpp.sh")
        llama_cpp.llama_backend_init()
        _backends = {"variant": _loaded_variant[-1] if _loaded_variant else None,
                     "system_info": llama_cpp.llama_print_system_info().decode().strip(),
                     "library": f"llama-cpp-python {LLAMA_CPP_PYTHON} (llama.cpp {LLAMA_CPP_COMMIT})"}
        log.info("llama.cpp: %s; %s", _backends["variant"], _backends["system_info"])
        return _backends


@dataclass
class LlamaSequence:
    """One request's state: its prompt until prefilled, then its sequence id in the KV cache."""

    prompt_ids: np.ndarray
    image_embeddings: np.ndarray
    seq_id: int | None = None
    position: int = 0  # tokens in the KV cache == the next token's position
    generated: list[int] = field(default_factory=list)

    @property
    def prefilled(self) -> bool:
        return self.position >= self.prompt_ids.size


class _Rows:
    """A llama_batch over numpy arrays: one row per token (or image embedding row), one sequence each."""

    def __init__(self, llama_cpp, capacity: int):
        self._llama = llama_cpp
        self.capacity = capacity
        self.token = np.zeros(capacity, dtype=np.int32)
        self.pos = np.zeros(capacity, dtype=np.int32)
        self.n_seq_id = np.ones(capacity, dtype=np.int32)
        self.seq = np.zeros(capacity, dtype=np.int32)
        self.output = np.zeros(capacity, dtype=np.int8)
        int_p = ctypes.POINTER(ctypes.c_int32)
        base = self.seq.ctypes.data
        self._seq_ptrs = (int_p * (capacity + 1))(*[ctypes.cast(base + 4 * i, int_p) for i in range(capacity)])

    def batch(self, n: int, embeddings: np.ndarray | None = None):
        """The llama_batch of the first n rows: token ids, or (embeddings given) those float32 rows."""
        assert 0 < n <= self.capacity
        c = ctypes
        return self._llama.llama_batch(
            n_tokens=n,
            token=None if embeddings is not None else self.token.ctypes.data_as(c.POINTER(c.c_int32)),
            embd=embeddings.ctypes.data_as(c.POINTER(c.c_float)) if embeddings is not None else None,
            pos=self.pos.ctypes.data_as(c.POINTER(c.c_int32)),
            n_seq_id=self.n_seq_id.ctypes.data_as(c.POINTER(c.c_int32)),
            seq_id=c.cast(self._seq_ptrs, c.POINTER(c.POINTER(c.c_int32))),
            logits=self.output.ctypes.data_as(c.POINTER(c.c_int8)),
        )


class LlamaDecodeError(RuntimeError):
    pass


class LlamaDecoder(DecoderInputs):
    """A GGUF decoder with OnnxDecoder's interface. exact=True keeps the KV cache in fp32 and flash
    attention off (an F32 GGUF then computes what transformers computes, to float rounding); otherwise
    the cache is fp16 and flash attention is llama.cpp's choice, as llama-bench runs it."""

    def __init__(self, gguf_path: str | Path, spec: ModelSpec, threads: int | None = None, max_sequences: int = 16,
                 context_tokens: int = 32768, exact: bool = False):
        super().__init__(spec)
        llama_cpp = _llama()
        self.backends = load_backends()
        self._llama = llama_cpp
        self.max_sequences = int(max_sequences)
        if not 1 <= self.max_sequences <= 256:
            raise ValueError(f"max_sequences {max_sequences} must lie in [1, 256] (llama.cpp's LLAMA_MAX_SEQ)")
        model_params = llama_cpp.llama_model_default_params()
        self._model = llama_cpp.llama_model_load_from_file(str(gguf_path).encode(), model_params)
        if not self._model:
            raise ValueError(f"{gguf_path}: llama.cpp could not load this GGUF (its log says why)")
        self._ctx = None
        try:
            vocab = llama_cpp.llama_model_get_vocab(self._model)
            self.n_vocab = llama_cpp.llama_vocab_n_tokens(vocab)
            self.n_embd = llama_cpp.llama_model_n_embd_inp(self._model)
            # The converter keeps the tokenizer's rows of the embedding: all 262208 for our dev checkpoints, the
            # 262144 text tokens for a checkpoint with tokenizer.model. Logits are padded back with -inf (the
            # rows past it are image placeholders, never generated).
            if self.n_embd != self.text.hidden_size or not 0 < self.n_vocab <= self.text.vocab_size:
                raise ValueError(
                    f"{gguf_path}: vocab {self.n_vocab} and hidden size {self.n_embd} do not match the checkpoint's "
                    f"{self.text.vocab_size} and {self.text.hidden_size}; rebuild it from this checkpoint"
                )
            self.ubatch = max(MIN_UBATCH, spec.mm_tokens_per_image)
            params = llama_cpp.llama_context_default_params()
            params.n_ctx = int(context_tokens)
            params.n_batch = self.ubatch
            params.n_ubatch = self.ubatch
            params.n_seq_max = self.max_sequences
            params.n_outputs_max = self.ubatch
            params.kv_unified = True
            params.swa_full = False  # sliding layers keep their window only; sequences are only ever freed whole
            params.no_perf = True
            params.type_k = params.type_v = GGML_TYPE_F32 if exact else GGML_TYPE_F16
            params.flash_attn_type = FLASH_ATTN_DISABLED if exact else FLASH_ATTN_AUTO
            # llama.cpp's own default is 4 threads whatever the host: use the CPUs this process may run on
            params.n_threads = params.n_threads_batch = int(threads or len(os.sched_getaffinity(0)))
            self._ctx = llama_cpp.llama_init_from_model(self._model, params)
            if not self._ctx:
                raise ValueError(f"{gguf_path}: llama.cpp could not create a context of {context_tokens} tokens")
            self.context_tokens = llama_cpp.llama_n_ctx(self._ctx)
            self.n_batch = llama_cpp.llama_n_batch(self._ctx)
            assert llama_cpp.llama_n_ubatch(self._ctx) >= spec.mm_tokens_per_image, "one image fits one ubatch"
            self._memory = llama_cpp.llama_get_memory(self._ctx)
        except Exception:
            self.close()
            raise
        self._rows = _Rows(llama_cpp, self.n_batch)
        self._free_ids = list(range(self.max_sequences))
        self._to_free: list[int] = []
        self._free_lock = threading.Lock()

    # --- OnnxDecoder's interface ---

    def new_sequence(self, prompt_ids: np.ndarray, image_embeddings: np.ndarray | None = None) -> LlamaSequence:
        prompt_ids = self.check_prompt(prompt_ids)
        rows = self._image_rows([prompt_ids], [image_embeddings])
        return LlamaSequence(prompt_ids=prompt_ids.astype(np.int64), image_embeddings=np.ascontiguousarray(rows))

    def prefill(self, state: LlamaSequence) -> np.ndarray:
        if state.prefilled:
            raise ValueError("this sequence is already prefilled; call step() with the next token")
        return self.prefill_chunk(state, state.prompt_ids.size)

    def prefill_chunk(self, state: LlamaSequence, end: int) -> np.ndarray | None:
        """Prefill the prompt from state.position up to `end`: text in causal calls, each image run in a
        non-causal call of its own; returns the next-token logits [vocab] once the prompt is in, else None."""
        ids, length, start = state.prompt_ids, state.prompt_ids.size, state.position
        if not start < end <= length:
            raise ValueError(f"prefill_chunk: end {end} must lie in ({start}, {length}]")
        self._free_released()
        if state.seq_id is None:
            if not self._free_ids:
                raise LlamaDecodeError(f"all {self.max_sequences} sequences of the llama.cpp context are in use")
            state.seq_id = self._free_ids.pop()
        image = ids == self.spec.tokens.image
        image_row = int(np.count_nonzero(image[:start]))
        logits = None
        for run_start, run_end, is_image in _runs(image, start, end):
            if is_image:
                count = run_end - run_start
                if count > self.ubatch:
                    raise ValueError(f"{count} consecutive image tokens do not fit one llama.cpp ubatch ({self.ubatch})")
                self._decode_image(state, state.image_embeddings[image_row : image_row + count])
                image_row += count
                continue
            if ids[run_start:run_end].max() >= self.n_vocab:
                raise ValueError(f"a text token id is past the GGUF's vocabulary of {self.n_vocab}")
            for piece in range(run_start, run_end, self.n_batch):
                piece_end = min(piece + self.n_batch, run_end)
                last = piece_end == length
                out = self._decode_tokens([state], [ids[piece:piece_end]], outputs=last)
                if last:
                    logits = out[0]
        if state.prefilled:
            state.image_embeddings = self.no_images()  # in the KV cache now: a volume's rows need not outlive the prefill
        return logits

    def step(self, state: LlamaSequence, token_id: int) -> np.ndarray:
        return self.step_batch([state], [token_id])[0]

    def step_batch(self, states: Sequence[LlamaSequence], token_ids: Sequence[int]) -> np.ndarray:
        """Append one token to each prefilled sequence in one llama_decode; returns logits [len(states), vocab]."""
        return self._decode_mixed([], states, token_ids, "step_batch")[1]

    # A scheduler pass can hand prompt chunks and decode steps to one decode_mixed call.
    mixes_prefill_and_decode = True

    def text_only(self, state: LlamaSequence, start: int, end: int) -> bool:
        """Whether prompt[start:end] may join a decode_mixed call: no image tokens (an image needs a
        non-causal call of its own)."""
        return not np.any(state.prompt_ids[start:end] == self.spec.tokens.image)

    def decode_mixed(self, prefills: Sequence[tuple[LlamaSequence, int]], states: Sequence[LlamaSequence],
                     token_ids: Sequence[int]) -> tuple[list[np.ndarray | None], np.ndarray]:
        """Text prompt chunks (state, end) and one decode step of each of `states`, in one llama_decode:
        the weights are read once for all of them, and several prompts fill one ubatch as
        llama-batched-bench's prefill does. Returns (per chunk: the next-token logits if it ends its
        prompt, else None; logits [len(states), vocab] of the steps). Nothing changes when it fails."""
        return self._decode_mixed(prefills, states, token_ids, "decode_mixed")

    def _decode_mixed(self, prefills, states, token_ids, what: str) -> tuple[list[np.ndarray | None], np.ndarray]:
        prompt_states, states = [state for state, _ in prefills], list(states)
        self._distinct(prompt_states + states, what)  # at least one, none twice
        tokens = np.asarray(token_ids, dtype=np.int64).reshape(-1)
        if tokens.size != len(states):
            raise ValueError(f"{what}: {len(states)} sequences but {tokens.size} token ids")
        for state in states:
            if not state.prefilled or state.seq_id is None:
                raise ValueError(f"{what}: prefill() every sequence before stepping it")
        pieces = []
        for state, end in prefills:
            if not state.position < end <= state.prompt_ids.size or not self.text_only(state, state.position, end):
                raise ValueError(f"{what}: chunk end {end} must lie in ({state.position}, "
                                 f"{state.prompt_ids.size}] and hold text only")
            pieces.append(state.prompt_ids[state.position : end])
        pieces += [tokens[i : i + 1] for i in range(len(states))]
        if max(piece.max() for piece in pieces) >= self.n_vocab or min(piece.min() for piece in pieces) < 0:
            raise ValueError(f"{what}: token ids must lie in [0, {self.n_vocab}) (the GGUF's vocabulary)")
        rows = sum(piece.size for piece in pieces)
        if rows > self.n_batch:
            raise ValueError(f"{what}: {rows} rows exceed llama.cpp's batch of {self.n_batch}")
        self._free_released()
        new_ids = [state for state in prompt_states if state.seq_id is None]
        if len(new_ids) > len(self._free_ids):
            raise LlamaDecodeError(f"all {self.max_sequences} sequences of the llama.cpp context are in use")
        for state in new_ids:
            state.seq_id = self._free_ids.pop()
        outputs = [end == state.prompt_ids.size for state, end in prefills] + [True] * len(states)
        try:
            logits = self._decode_tokens([*prompt_states, *states], pieces, outputs)
        except Exception:
            for state in new_ids:  # llama.cpp drops a failed ubatch's cells; nothing of these stays
                self._llama.llama_memory_seq_rm(self._memory, state.seq_id, -1, -1)
                self._free_ids.append(state.seq_id)
                state.seq_id = None
            raise
        if logits is None:
            logits = np.zeros((0, self.text.vocab_size), np.float32)
        prompt_rows = iter(logits)  # the prompts' rows come first, then one per step
        prefill_logits = [next(prompt_rows) if done else None for done in outputs[: len(prefills)]]
        for state in prompt_states:
            if state.prefilled:
                state.image_embeddings = self.no_images()
        for state, token in zip(states, tokens):
            state.generated.append(int(token))
        return prefill_logits, logits[len(logits) - len(states) :]

    def release_batch(self) -> None:
        """Nothing to drop: the KV cache lives in llama.cpp."""

    def release(self, state) -> None:
        """Free the sequence's cells (from any thread: carried out at the decoder's next call)."""
        if isinstance(state, LlamaSequence) and state.seq_id is not None:
            with self._free_lock:
                self._to_free.append(state.seq_id)
            state.seq_id = None

    def generate_greedy(self, prompts, image_embeddings=None, max_new_tokens: int = 32, eos_ids=None) -> list[list[int]]:
        """Greedy tokens per prompt, each ending at its first eos (included), as transformers' generate."""
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        eos = set(self.spec.tokens.eos if eos_ids is None else eos_ids)
        images = image_embeddings if image_embeddings is not None else [None] * len(prompts)
        states = [self.new_sequence(p, e) for p, e in zip(prompts, images)]
        try:
            next_tokens = [int(self.prefill(s).argmax()) for s in states]
            generated = [[t] for t in next_tokens]
            running = [i for i, t in enumerate(next_tokens) if t not in eos]
            for _ in range(max_new_tokens - 1):
                if not running:
                    break
                logits = self.step_batch([states[i] for i in running], [generated[i][-1] for i in running])
                for i, row in zip(running, logits):
                    generated[i].append(int(row.argmax()))  # first index on ties, as torch.argmax
                running = [i for i in running if generated[i][-1] not in eos]
            return generated
        finally:
            for state in states:
                self.release(state)
            self._free_released()

    def close(self) -> None:
        if self._ctx:
            self._llama.llama_free(self._ctx)
            self._ctx = None
        if self._model:
            self._llama.llama_model_free(self._model)
            self._model = None

    # --- internals ---

    def _free_released(self) -> None:
        with self._free_lock:
            freeing, self._to_free = self._to_free, []
        for seq_id in freeing:
            self._llama.llama_memory_seq_rm(self._memory, seq_id, -1, -1)
            self._free_ids.append(seq_id)
        if freeing and len(self._free_ids) == self.max_sequences:
            # Nothing is in use: clearing moves llama.cpp's search for free cells back to cell 0, as
            # llama-bench starts every run. Otherwise the next prompt lands after the freed cells, and
            # attention spans those empty cells too.
            self._llama.llama_memory_clear(self._memory, False)

    def _decode_tokens(self, states: list[LlamaSequence], pieces: list[np.ndarray], outputs) -> np.ndarray | None:
        """One causal llama_decode of each state's piece of token ids (continuing its positions). outputs: a
        bool, or one per piece: return the logits of those pieces' last rows, in order (None if none)."""
        flags = [bool(outputs)] * len(pieces) if isinstance(outputs, bool) else [bool(o) for o in outputs]
        rows, n = self._rows, 0
        for state, piece, flag in zip(states, pieces, flags):
            k = piece.size
            rows.token[n : n + k] = piece
            rows.pos[n : n + k] = np.arange(state.position, state.position + k)
            rows.seq[n : n + k] = state.seq_id
            rows.output[n : n + k] = 0
            rows.output[n + k - 1] = int(flag)
            n += k
        self._decode(rows.batch(n), n, causal=True)
        for state, piece in zip(states, pieces):
            state.position += piece.size
        count = sum(flags)
        if not count:
            return None
        logits = np.ctypeslib.as_array(self._llama.llama_get_logits(self._ctx), shape=(count, self.n_vocab))
        if self.n_vocab == self.text.vocab_size:
            return logits.copy()
        padded = np.full((count, self.text.vocab_size), -np.inf, dtype=np.float32)
        padded[:, : self.n_vocab] = logits
        return padded

    def _decode_image(self, state: LlamaSequence, embeddings: np.ndarray) -> None:
        rows, n = self._rows, embeddings.shape[0]
        rows.pos[:n] = np.arange(state.position, state.position + n)
        rows.seq[:n] = state.seq_id
        rows.output[:n] = 0
        assert embeddings.dtype == np.float32 and embeddings.flags.c_contiguous, "new_sequence's rows"
        self._decode(rows.batch(n, embeddings), n, causal=False)
        state.position += n

    def _decode(self, batch, n: int, causal: bool) -> None:
        # llama.cpp asserts these (aborting the process): refuse here instead
        assert n <= self.n_batch and (causal or n <= self.ubatch), "batch within llama.cpp's n_batch / n_ubatch"
        llama_cpp = self._llama
        if not causal:
            llama_cpp.llama_set_causal_attn(self._ctx, False)
        try:
            code = llama_cpp.llama_decode(self._ctx, batch)
        finally:
            if not causal:
                llama_cpp.llama_set_causal_attn(self._ctx, True)
        if code == 1:
            raise LlamaDecodeError(f"llama.cpp's KV cache ({self.context_tokens} tokens, shared by every request) is full")
        if code != 0:
            raise LlamaDecodeError(f"llama_decode failed with code {code}")


def _runs(image: np.ndarray, start: int, end: int):
    """(run_start, run_end, is_image) over [start, end): maximal runs of image tokens and of text."""
    position = start
    while position < end:
        kind = bool(image[position])
        stop = position + 1
        while stop < end and bool(image[stop]) == kind:
            stop += 1
        yield position, stop, kind
        position = stop
