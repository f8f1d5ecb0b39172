"""Gemma 3 decoder with KV cache -> ONNX (`decoder.onnx` + `decoder.onnx.data`).

Our own small torch module over the checkpoint's language-model weights (shared with the loaded HF
model, never copied), written to match transformers 5.23's Gemma 3 forward exactly. The graph splices
the image embeddings into the text embeddings and builds every attention mask itself, so the runtime
only passes token ids, the 2D padding mask, positions and the KV cache. Graph names and layout:
medgemma_triton.runtime.decoder (the numpy/ONNX Runtime side, which must not import torch).

Reference semantics (transformers 5.23 modeling_gemma3.py + masking_utils.py), in cache coordinates
(query q = past_length + t, key k = column of `attention_mask`):
- global layers: padding[k] & (k <= q | same_image(q, k))
- sliding layers: padding[k] & (k <= q | same_image(q, k)) & (k > q - sliding_window)
  i.e. the window AND is applied after the image OR (create_masks_for_vision_model); 4.57 composed
  them the other way, which differs only when one image is longer than the window.
- same_image: q and k are both image soft tokens of one contiguous run in this call's input_ids.
  Past keys never need it (they are causal already), so a prefill chunk must not split an image.
- attn_logit_softcapping is not applied by transformers 5.23's Gemma 3 attention (it never passes
  `softcap`); final_logit_softcapping only by Gemma3ForCausalLM, not by
  Gemma3ForConditionalGeneration. We follow the reference on both.

Sliding-window KV cache: a sliding layer's present keeps only its last `sliding_cache_length(text)`
= sliding_window - 1 keys (the most any later query can see: k > q - window), so its cache stops
growing with the context. Its past may be that trimmed cache or the full one: the graph reads the
sliding layers' past length from their own past tensors and the global past length from
attention_mask, and builds the sliding mask in the sliding cache's coordinates (the rule is invariant
to shifting key and query columns together), with the padding taken from attention_mask's last columns.
Assumption (not checkable in-graph): a sliding past holds the last keys of the global past, i.e.
both caches end at the same token. It holds because the runtime only feeds back the graph's own
presents, right-aligned (runtime/decoder.py).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from medgemma_triton.runtime.decoder import (
    ATTENTION_MASK,
    IMAGE_EMBEDDINGS,
    INPUT_IDS,
    LOGITS,
    POSITION_IDS,
    past_names,
    present_names,
    sliding_cache_length,
)
from medgemma_triton.spec import CheckpointError, ModelSpec, RopeSpec

DECODER_FILE = "decoder.onnx"
OPSET = 20
GELU_TANH = ("gelu_pytorch_tanh", "gelu_tanh")


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Gemma RMSNorm: normalise in fp32, scale by (1 + w)."""
    normed = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)
    return (normed * (1.0 + weight.float())).type_as(x)


def _inverse_frequencies(rope: RopeSpec, head_dim: int) -> torch.Tensor:
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    inv_freq = 1.0 / (rope.theta**exponents)
    if rope.rope_type == "linear":  # dividing the frequencies == dividing the positions
        inv_freq = inv_freq / rope.factor
    return inv_freq


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class Gemma3Decoder(nn.Module):
    """One Gemma 3 decoder step over a full KV cache: prefill (P=0), decode (T=1) or chunked prefill.

    Holds references to the HF language model's parameters (no copies). `bidirectional_images=False`
    gives the causal-only variant, used only by tests to prove the image mask matters.
    """

    def __init__(
        self,
        language_model: nn.Module,
        lm_head_weight: torch.Tensor,
        spec: ModelSpec,
        bidirectional_images: bool = True,
    ):
        super().__init__()
        text = spec.text
        if text.hidden_activation not in GELU_TANH:
            raise CheckpointError(
                f"hidden_activation {text.hidden_activation!r} is not Gemma 3's gelu_pytorch_tanh"
            )
        if len(language_model.layers) != text.num_layers:
            raise CheckpointError(
                f"checkpoint has {len(language_model.layers)} decoder layers, config says {text.num_layers}"
            )
        self.text = text
        self.image_token = spec.tokens.image
        self.bidirectional_images = bidirectional_images
        # Gemma3ForConditionalGeneration never applies final softcapping; Gemma3ForCausalLM does.
        self.final_logit_softcapping = (
            text.final_logit_softcapping if spec.architecture == "Gemma3ForCausalLM" else None
        )
        self.layers = language_model.layers
        self.embed_weight = language_model.embed_tokens.weight
        self.final_norm_weight = language_model.norm.weight
        # A tied head is the embedding itself: register it once, or the export stores it twice.
        self.tied_head = lm_head_weight is self.embed_weight
        if not self.tied_head:
            self.lm_head_weight = lm_head_weight
        self.register_buffer(
            "inv_freq_local", _inverse_frequencies(text.rope_local, text.head_dim), persistent=False
        )
        self.register_buffer(
            "inv_freq_global", _inverse_frequencies(text.rope_global, text.head_dim), persistent=False
        )

    def embed(self, input_ids: torch.Tensor, image_embeddings: torch.Tensor) -> torch.Tensor:
        """Text embeddings scaled by sqrt(hidden); image-token rows replaced by the (unscaled) image rows."""
        batch, seq = input_ids.shape
        is_image = input_ids == self.image_token
        token_ids = input_ids
        if self.image_token >= self.text.vocab_size:  # as Gemma3Model: an out-of-vocab id looks up pad
            token_ids = torch.where(is_image, torch.zeros_like(input_ids), input_ids)
        hidden = F.embedding(token_ids, self.embed_weight) * torch.tensor(
            self.text.embed_scale, dtype=self.embed_weight.dtype
        )
        # Row-major order, as masked_scatter. Image tokens beyond the given rows (none given in a decode
        # step that produced an image token) keep their text embedding, as transformers does.
        num_rows = image_embeddings.shape[0]
        flat_is_image = is_image.reshape(-1)
        row = torch.cumsum(flat_is_image.to(torch.int64), dim=0) - 1
        use_row = flat_is_image & (row < num_rows)
        rows = torch.cat([image_embeddings, image_embeddings.new_zeros(1, self.text.hidden_size)], dim=0)
        spliced = rows[torch.where(use_row, row, torch.full_like(row, num_rows))]
        return torch.where(
            use_row.reshape(batch, seq, 1), spliced.reshape(batch, seq, -1).to(hidden.dtype), hidden
        )

    def attention_masks(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, past_length, sliding_past_length=None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(global [B,1,T,P+T], sliding [B,1,T,S+T]) boolean masks; True = may attend.

        P = past_length (attention_mask covers P+T columns); S = sliding_past_length <= P, the sliding
        layers' cache, which holds the last S of the P past keys (default S = P, an untrimmed cache).
        """
        seq = input_ids.shape[1]
        if sliding_past_length is None:
            sliding_past_length = past_length
        query_image = self._image_runs(input_ids) if self.bidirectional_images else None
        global_mask = self._mask(query_image, attention_mask, past_length, seq, window=None)
        # The sliding keys are attention_mask's last S+T columns (index_select: no shape guard on P - S).
        kept = torch.arange(sliding_past_length + seq, device=input_ids.device) + (
            attention_mask.shape[1] - sliding_past_length - seq
        )
        sliding_padding = attention_mask.index_select(1, kept)
        sliding_mask = self._mask(
            query_image, sliding_padding, sliding_past_length, seq, window=self.text.sliding_window
        )
        return global_mask, sliding_mask

    def _image_runs(self, input_ids: torch.Tensor) -> torch.Tensor:
        """[B,T] index of the contiguous image-token run each token belongs to in this call; -1 for text."""
        is_image = input_ids == self.image_token
        previous_is_image = torch.cat([torch.zeros_like(is_image[:, :1]), is_image[:, :-1]], dim=1)
        image_index = torch.cumsum((is_image & ~previous_is_image).to(torch.int64), dim=1) - 1
        return torch.where(is_image, image_index, torch.full_like(image_index, -1))

    def _mask(self, query_image, key_padding, past_length, seq, window):
        """[B,1,T,K] for keys = K - T past columns then this call's T tokens (K = key_padding's length)."""
        device = key_padding.device
        query_index = torch.arange(seq, device=device) + past_length
        key_index = torch.arange(key_padding.shape[1], device=device)
        allowed = (key_index[None, :] <= query_index[:, None])[None]
        if query_image is not None:
            key_image = torch.cat([torch.full_like(key_padding[:, :past_length], -1), query_image], dim=1)
            same_image = (query_image[:, :, None] == key_image[:, None, :]) & (query_image[:, :, None] >= 0)
            allowed = allowed | same_image
        allowed = allowed & (key_padding[:, None, :] != 0)
        if window is not None:  # applied after the image OR, as transformers 5.x
            allowed = allowed & (key_index[None, :] > query_index[:, None] - window)[None]
        return allowed[:, None]

    def _rope(self, position_ids: torch.Tensor, inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = position_ids[..., None].float() * inv_freq
        angles = torch.cat((freqs, freqs), dim=-1)
        return angles.cos()[:, None], angles.sin()[:, None]

    def _attention(self, attn, hidden, mask, cos, sin, past_key, past_value, keep=None):
        text = self.text
        batch, seq, _ = hidden.shape
        query = attn.q_proj(hidden).view(batch, seq, text.num_heads, text.head_dim).transpose(1, 2)
        key = attn.k_proj(hidden).view(batch, seq, text.num_kv_heads, text.head_dim).transpose(1, 2)
        value = attn.v_proj(hidden).view(batch, seq, text.num_kv_heads, text.head_dim).transpose(1, 2)
        query = _rms_norm(query, attn.q_norm.weight, text.rms_norm_eps)
        key = _rms_norm(key, attn.k_norm.weight, text.rms_norm_eps)
        query = query * cos + _rotate_half(query) * sin
        key = key * cos + _rotate_half(key) * sin
        key = torch.cat([past_key, key], dim=2)
        value = torch.cat([past_value, value], dim=2)
        # Grouped-query attention without repeating the cache per query head (repeat_interleave copied
        # every key and value `groups` times per layer and step): query head h reads kv head h // groups,
        # so the query heads of one kv head are stacked along the sequence axis and share its keys.
        groups = text.num_heads // text.num_kv_heads
        query = query.reshape(batch, text.num_kv_heads, groups * seq, text.head_dim)
        scores = torch.matmul(query, key.transpose(2, 3)) * text.attention_scale
        scores = scores.reshape(batch, text.num_kv_heads, groups, seq, -1)
        # The dtype minimum, not -inf, as transformers: a fully masked (padding) row stays finite.
        scores = torch.where(mask[:, :, None], scores, torch.finfo(scores.dtype).min)
        probs = torch.softmax(scores.float(), dim=-1).to(query.dtype)
        probs = probs.reshape(batch, text.num_kv_heads, groups * seq, -1)
        out = torch.matmul(probs, value).reshape(batch, text.num_heads, seq, text.head_dim)
        out = out.transpose(1, 2).reshape(batch, seq, -1)
        if keep is not None:  # a sliding layer's present: only its last `keep` keys can be seen again
            length = key.shape[2]
            kept = torch.sym_min(length, keep)
            index = torch.arange(kept, device=key.device) + (length - kept)
            key, value = key.index_select(2, index), value.index_select(2, index)
        return attn.o_proj(out), key, value

    def forward(self, input_ids, attention_mask, position_ids, image_embeddings, *past_key_values):
        text = self.text
        if len(past_key_values) != 2 * text.num_layers:
            raise ValueError(f"expected {2 * text.num_layers} past tensors, got {len(past_key_values)}")
        past_length = attention_mask.shape[1] - input_ids.shape[1]
        sliding_layers = [i for i in range(text.num_layers) if text.is_sliding(i)]
        sliding_past_length = past_key_values[2 * sliding_layers[0]].shape[2] if sliding_layers else past_length
        keep = sliding_cache_length(text)
        hidden = self.embed(input_ids, image_embeddings)
        global_mask, sliding_mask = self.attention_masks(
            input_ids, attention_mask, past_length, sliding_past_length
        )
        local_rope = self._rope(position_ids, self.inv_freq_local)
        global_rope = self._rope(position_ids, self.inv_freq_global)
        presents = []
        for i, layer in enumerate(self.layers):
            sliding = text.is_sliding(i)
            residual = hidden
            hidden = _rms_norm(hidden, layer.input_layernorm.weight, text.rms_norm_eps)
            hidden, key, value = self._attention(
                layer.self_attn,
                hidden,
                sliding_mask if sliding else global_mask,
                *(local_rope if sliding else global_rope),
                past_key_values[2 * i],
                past_key_values[2 * i + 1],
                keep if sliding else None,
            )
            presents += [key, value]
            hidden = residual + _rms_norm(hidden, layer.post_attention_layernorm.weight, text.rms_norm_eps)
            residual = hidden
            hidden = _rms_norm(hidden, layer.pre_feedforward_layernorm.weight, text.rms_norm_eps)
            mlp = layer.mlp
            hidden = mlp.down_proj(F.gelu(mlp.gate_proj(hidden), approximate="tanh") * mlp.up_proj(hidden))
            hidden = residual + _rms_norm(hidden, layer.post_feedforward_layernorm.weight, text.rms_norm_eps)
        last = _rms_norm(hidden[:, -1, :], self.final_norm_weight, text.rms_norm_eps)
        head = self.embed_weight if self.tied_head else self.lm_head_weight
        logits = F.linear(last, head)
        if self.final_logit_softcapping is not None:
            cap = self.final_logit_softcapping
            logits = torch.tanh(logits / cap) * cap
        return (logits, *presents)


def load_language_model(checkpoint: Path, spec: ModelSpec) -> tuple[nn.Module, torch.Tensor]:
    """The checkpoint's Gemma3TextModel and LM-head weight in fp32; the vision tower is dropped."""
    from transformers import Gemma3ForCausalLM, Gemma3ForConditionalGeneration

    if spec.architecture == "Gemma3ForConditionalGeneration":
        model = Gemma3ForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.float32)
        language_model = model.model.language_model
        model.model.vision_tower = None  # exported separately; free it before tracing
        model.model.multi_modal_projector = None
    else:
        model = Gemma3ForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
        language_model = model.model
    lm_head_weight = model.lm_head.weight
    del model  # the language model and head weight keep their own references
    language_model.eval().requires_grad_(False)
    return language_model, lm_head_weight


def example_inputs(spec: ModelSpec) -> tuple:
    """Inputs for tracing: every dynamic size distinct and >= 2 (torch.export specialises 0 and 1)."""
    text = spec.text
    batch, past, sliding_past, seq, image_rows = 2, 6, 4, 7, 5
    input_ids = torch.full((batch, seq), spec.tokens.bos, dtype=torch.int64)
    if spec.tokens.image >= 0:
        input_ids[0, 2:5] = spec.tokens.image
        input_ids[1, 3:5] = spec.tokens.image
    attention_mask = torch.ones(batch, past + seq, dtype=torch.int64)
    attention_mask[1, 0] = 0
    position_ids = torch.arange(past, past + seq, dtype=torch.int64).expand(batch, seq).contiguous()
    image_embeddings = torch.randn(image_rows, text.hidden_size)
    past_kv = [
        torch.randn(batch, text.num_kv_heads, sliding_past if text.is_sliding(i // 2) else past, text.head_dim)
        for i in range(2 * text.num_layers)
    ]
    return (input_ids, attention_mask, position_ids, image_embeddings, *past_kv)


def _dynamic_shapes(spec: ModelSpec) -> tuple:
    from torch.export import Dim

    batch, seq, image_rows = Dim("batch"), Dim("sequence"), Dim("image_rows")
    past, sliding_past = Dim("past_sequence"), Dim("sliding_past_sequence")
    # attention_mask's length is past + sequence: let torch.export derive it.
    total = Dim.AUTO
    text = spec.text
    return (
        {0: batch, 1: seq},
        {0: batch, 1: total},
        {0: batch, 1: seq},
        {0: image_rows},
        tuple({0: batch, 2: sliding_past if text.is_sliding(i // 2) else past} for i in range(2 * text.num_layers)),
    )


def export_decoder(checkpoint: Path, spec: ModelSpec, out_dir: Path, progress=print) -> Path:
    """Write out_dir/decoder.onnx (+ decoder.onnx.data); returns the .onnx path."""
    checkpoint, out_dir = Path(checkpoint), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / DECODER_FILE
    started = time.monotonic()
    progress(f"loading the language model of {checkpoint}")
    language_model, lm_head_weight = load_language_model(checkpoint, spec)
    module = Gemma3Decoder(language_model, lm_head_weight, spec).eval()
    text = spec.text
    progress(
        f"exporting the decoder ({text.num_layers} layers, hidden {text.hidden_size}, "
        f"vocab {text.vocab_size}) to {path}"
    )
    with torch.no_grad():
        torch.onnx.export(
            module,
            example_inputs(spec),
            path,
            dynamo=True,
            opset_version=OPSET,
            external_data=True,
            input_names=[INPUT_IDS, ATTENTION_MASK, POSITION_IDS, IMAGE_EMBEDDINGS, *past_names(text.num_layers)],
            output_names=[LOGITS, *present_names(text.num_layers)],
            dynamic_shapes=_dynamic_shapes(spec),
            verbose=False,
        )
    _name_total_length(path, spec)
    progress(f"decoder exported in {time.monotonic() - started:.0f} s")
    return path


def _name_total_length(path: Path, spec: ModelSpec) -> None:
    """Give attention_mask's length the readable name the global layers' presents carry (torch.export derives it)."""
    import onnx

    global_layers = [i for i in range(spec.text.num_layers) if not spec.text.is_sliding(i)]
    if not global_layers:
        return
    model = onnx.load(str(path), load_external_data=False)
    present = present_names(spec.text.num_layers)[2 * global_layers[0]]
    total = next(o for o in model.graph.output if o.name == present).type.tensor_type.shape.dim[2].dim_param
    mask = next(i for i in model.graph.input if i.name == ATTENTION_MASK)
    length = mask.type.tensor_type.shape.dim[1]
    if total and length.dim_param and length.dim_param != total:
        length.dim_param = total
        onnx.save(model, str(path))  # the weights stay in decoder.onnx.data, untouched
