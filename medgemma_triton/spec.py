"""One typed spec of a Gemma 3 checkpoint: every geometric number the rest of the package uses.

Read from the checkpoint's own files (config.json, tokenizer_config.json, generation_config.json,
preprocessor_config.json / processor_config.json, chat template). Plain JSON parsing on purpose:
the serving path must not import transformers (it imports torch whenever torch is installed).
Defaults are transformers' Gemma 3 defaults; tests check this parser against transformers'
own config classes for every development checkpoint.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

SUPPORTED_ARCHITECTURES = ("Gemma3ForConditionalGeneration", "Gemma3ForCausalLM")
ROPE_TYPES = ("default", "linear")
LAYER_TYPES = ("sliding_attention", "full_attention")
# google/medgemma-4b-it's config.json as published (transformers 4.50 layout: rope_scaling, rope_theta,
# rope_local_base_freq, sliding_window_pattern instead of layer_types), shipped as package data.
MEDGEMMA_4B_CONFIG_FILE = Path(__file__).with_name("data") / "medgemma-4b-it.config.json"


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be served: says what is wrong in one line."""


def unsupported(where: str, found, supported) -> CheckpointError:
    """The one shape of a layout refusal: the file and field, the value found and what is supported, so a
    checkpoint laid out otherwise (a newer MedGemma, a re-save by another transformers) says what to change."""
    return CheckpointError(f"{where} is {found!r}, which is not supported (supported: {supported})")


@dataclass(frozen=True)
class RopeSpec:
    theta: float
    rope_type: str = "default"  # "default" or "linear"
    factor: float = 1.0

    def __post_init__(self):
        if self.rope_type not in ROPE_TYPES:
            raise unsupported("RoPE type", self.rope_type, ", ".join(ROPE_TYPES))


@dataclass(frozen=True)
class TextSpec:
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    query_pre_attn_scalar: float
    vocab_size: int
    rms_norm_eps: float
    layer_types: tuple[str, ...]
    sliding_window: int
    rope_local: RopeSpec
    rope_global: RopeSpec
    max_position_embeddings: int
    hidden_activation: str
    tie_word_embeddings: bool
    final_logit_softcapping: float | None = None
    attn_logit_softcapping: float | None = None

    @property
    def embed_scale(self) -> float:
        """Gemma scales text embeddings by sqrt(hidden_size) (image embeddings are not scaled)."""
        return math.sqrt(self.hidden_size)

    @property
    def attention_scale(self) -> float:
        return self.query_pre_attn_scalar**-0.5

    def is_sliding(self, layer: int) -> bool:
        return self.layer_types[layer] == "sliding_attention"


@dataclass(frozen=True)
class VisionSpec:
    image_size: int
    patch_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    layer_norm_eps: float
    mm_tokens_per_image: int

    @property
    def patches_per_side(self) -> int:
        return self.image_size // self.patch_size

    @property
    def tokens_per_side(self) -> int:
        return math.isqrt(self.mm_tokens_per_image)

    @property
    def pool_kernel(self) -> int:
        return self.patches_per_side // self.tokens_per_side


@dataclass(frozen=True)
class ImageProcessingSpec:
    """What the checkpoint's Gemma3 image processor does (size, resample, rescale, normalize)."""

    height: int
    width: int
    resample: int  # PIL.Image.Resampling value
    do_resize: bool
    do_rescale: bool
    rescale_factor: float
    do_normalize: bool
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]
    do_convert_rgb: bool
    do_pan_and_scan: bool


@dataclass(frozen=True)
class TokenSpec:
    bos: int
    pad: int
    eos: tuple[int, ...]  # generation stops on any of these (eos and end_of_turn for -it models)
    start_of_turn: int
    end_of_turn: int
    boi: int
    eoi: int
    image: int
    boi_text: str
    eoi_text: str
    image_text: str


@dataclass(frozen=True)
class ModelSpec:
    architecture: str
    dtype: str
    text: TextSpec
    vision: VisionSpec | None
    image_processing: ImageProcessingSpec | None
    tokens: TokenSpec
    chat_template: str = field(repr=False)
    default_max_new_tokens: int | None = None

    @property
    def multimodal(self) -> bool:
        return self.vision is not None

    @property
    def mm_tokens_per_image(self) -> int:
        return self.vision.mm_tokens_per_image if self.vision else 0

    def image_sequence_text(self) -> str:
        """The text one image expands to, exactly as Gemma3Processor writes it."""
        image_tokens = self.tokens.image_text * self.mm_tokens_per_image
        return f"\n\n{self.tokens.boi_text}{image_tokens}{self.tokens.eoi_text}\n\n"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_checkpoint(cls, checkpoint: str | Path) -> "ModelSpec":
        return _read_spec(Path(checkpoint))

    @classmethod
    def for_serving(cls, checkpoint: str | Path) -> "ModelSpec":
        """The spec from a checkpoint's serving files alone (a built repository keeps no weights)."""
        return _read_spec(Path(checkpoint), require_weights=False)


def medgemma_4b_config() -> dict:
    """The 4B geometry: google/medgemma-4b-it's config.json (MEDGEMMA_4B_CONFIG_FILE), a fresh dict per
    call. Tests and benchmarks read the 4B's numbers here rather than restating them."""
    return json.loads(MEDGEMMA_4B_CONFIG_FILE.read_text(encoding="utf-8"))


def _load_json(path: Path, required: bool = True) -> dict:
    if not path.is_file():
        if required:
            raise CheckpointError(f"{path.parent}: missing {path.name}")
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc})") from None


def _rope_type(where: str, rope: dict) -> str:
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise unsupported(f"{where}.rope_type", rope_type, ", ".join(ROPE_TYPES))
    return rope_type


def _rope_specs(text_cfg: dict, where: str) -> tuple[RopeSpec, RopeSpec]:
    params = text_cfg.get("rope_parameters")
    if params and "full_attention" in params:  # transformers 5.x layout
        full, local = params["full_attention"], params.get("sliding_attention", {})
        global_rope = RopeSpec(
            theta=float(full.get("rope_theta", 1_000_000.0)),
            rope_type=_rope_type(f"{where} rope_parameters.full_attention", full),
            factor=float(full.get("factor", 1.0)),
        )
        local_rope = RopeSpec(
            theta=float(local.get("rope_theta", 10_000.0)),
            rope_type=_rope_type(f"{where} rope_parameters.sliding_attention", local),
            factor=float(local.get("factor", 1.0)),
        )
        return local_rope, global_rope
    # transformers 4.x layout (google/medgemma-4b-it's config.json): scaling applies to global layers
    scaling = text_cfg.get("rope_scaling") or {}
    global_rope = RopeSpec(
        theta=float(text_cfg.get("rope_theta", 1_000_000.0)),
        rope_type=_rope_type(f"{where} rope_scaling", scaling),
        factor=float(scaling.get("factor", 1.0)),
    )
    local_rope = RopeSpec(theta=float(text_cfg.get("rope_local_base_freq", 10_000.0)))
    return local_rope, global_rope


def _text_spec(text_cfg: dict, where: str = "config.json text_config") -> TextSpec:
    """`where` names the text config in refusals: config.json's text_config, or config.json itself for
    Gemma3ForCausalLM."""
    num_layers = int(text_cfg.get("num_hidden_layers", 26))
    layer_types = text_cfg.get("layer_types")
    if layer_types is None:
        pattern = int(text_cfg.get("sliding_window_pattern", 6))
        layer_types = [
            "sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(num_layers)
        ]
    if len(layer_types) != num_layers:
        raise CheckpointError(
            f"{where}: layer_types has {len(layer_types)} entries for {num_layers} layers"
        )
    unknown = sorted(set(layer_types) - set(LAYER_TYPES))
    if unknown:
        raise unsupported(f"{where} layer_types", unknown[0], ", ".join(LAYER_TYPES))
    if text_cfg.get("use_bidirectional_attention"):  # EmbeddingGemma: an encoder, not a chat model
        raise unsupported(f"{where} use_bidirectional_attention", True, "false or absent")
    local_rope, global_rope = _rope_specs(text_cfg, where)
    return TextSpec(
        hidden_size=int(text_cfg.get("hidden_size", 2304)),
        intermediate_size=int(text_cfg.get("intermediate_size", 9216)),
        num_layers=num_layers,
        num_heads=int(text_cfg.get("num_attention_heads", 8)),
        num_kv_heads=int(text_cfg.get("num_key_value_heads", 4)),
        head_dim=int(text_cfg.get("head_dim", 256)),
        query_pre_attn_scalar=float(text_cfg.get("query_pre_attn_scalar", 256)),
        vocab_size=int(text_cfg.get("vocab_size", 262_208)),
        rms_norm_eps=float(text_cfg.get("rms_norm_eps", 1e-6)),
        layer_types=tuple(layer_types),
        sliding_window=int(text_cfg.get("sliding_window", 4096)),
        rope_local=local_rope,
        rope_global=global_rope,
        max_position_embeddings=int(text_cfg.get("max_position_embeddings", 131_072)),
        hidden_activation=text_cfg.get("hidden_activation", "gelu_pytorch_tanh"),
        tie_word_embeddings=bool(text_cfg.get("tie_word_embeddings", True)),
        final_logit_softcapping=text_cfg.get("final_logit_softcapping"),
        attn_logit_softcapping=text_cfg.get("attn_logit_softcapping"),
    )


def _vision_spec(config: dict) -> VisionSpec:
    vision_cfg = config.get("vision_config")
    if not vision_cfg:
        raise CheckpointError("config.json: Gemma3ForConditionalGeneration without vision_config")
    spec = VisionSpec(
        image_size=int(vision_cfg.get("image_size", 224)),
        patch_size=int(vision_cfg.get("patch_size", 16)),
        hidden_size=int(vision_cfg.get("hidden_size", 768)),
        intermediate_size=int(vision_cfg.get("intermediate_size", 3072)),
        num_layers=int(vision_cfg.get("num_hidden_layers", 12)),
        num_heads=int(vision_cfg.get("num_attention_heads", 12)),
        layer_norm_eps=float(vision_cfg.get("layer_norm_eps", 1e-6)),
        mm_tokens_per_image=int(config.get("mm_tokens_per_image", 256)),
    )
    if spec.tokens_per_side**2 != spec.mm_tokens_per_image:
        raise CheckpointError(f"config.json: mm_tokens_per_image={spec.mm_tokens_per_image} is not a square")
    if spec.patches_per_side % spec.tokens_per_side:
        raise CheckpointError(
            f"config.json: {spec.patches_per_side} patches per side do not pool evenly "
            f"to {spec.tokens_per_side} tokens per side"
        )
    return spec


def _image_processor_settings(checkpoint: Path, processor: dict) -> tuple[dict, str]:
    """(settings, where they came from) as transformers 5.23 reads them: the `image_processor` entry of
    processor_config.json when it has one, else preprocessor_config.json (ImageProcessingMixin.
    get_image_processor_dict in transformers/image_processing_base.py, "Priority goes as (nested config
    if found -> image processor config)"). AutoProcessor and AutoImageProcessor both go through it."""
    if isinstance(processor.get("image_processor"), dict):  # processor: processor_config.json, parsed
        return processor["image_processor"], "processor_config.json (image_processor)"
    cfg = _load_json(checkpoint / "preprocessor_config.json", required=False)
    if not cfg:
        raise CheckpointError(
            f"{checkpoint}: no image processor settings (neither processor_config.json's image_processor "
            "nor preprocessor_config.json)"
        )
    return cfg, "preprocessor_config.json"


def _check_processor_matches_model(checkpoint: Path, vision: VisionSpec, image: ImageProcessingSpec,
                                   settings: dict, source: str, processor: dict) -> None:
    """The processor must make the images and the image-token count the model was built for: a stale
    processor file otherwise fails every image request at the vision encoder, or misplaces image rows."""
    pairs = [
        (f"{source} size", f"{image.height}x{image.width}",
         "config.json vision_config.image_size", f"{vision.image_size}x{vision.image_size}"),
    ]
    if "patch_size" in settings:
        pairs.append((f"{source} patch_size", settings["patch_size"], "config.json vision_config.patch_size",
                      vision.patch_size))
    if "image_seq_length" in processor:
        pairs.append(("processor_config.json image_seq_length", processor["image_seq_length"],
                      "config.json mm_tokens_per_image", vision.mm_tokens_per_image))
    wrong = [f"{a} is {x} but {b} is {y}" for a, x, b, y in pairs if str(x) != str(y)]
    if wrong:
        raise CheckpointError(
            f"{checkpoint}: the image processor disagrees with the model: {'; '.join(wrong)}. "
            "Make the processor files match the model (transformers reads processor_config.json's "
            "image_processor before preprocessor_config.json)"
        )


def _image_processing_spec(cfg: dict) -> ImageProcessingSpec:
    size = cfg.get("size", {"height": 224, "width": 224})
    mean = cfg.get("image_mean", [0.5, 0.5, 0.5])
    std = cfg.get("image_std", [0.5, 0.5, 0.5])
    mean = [mean] * 3 if isinstance(mean, (int, float)) else mean
    std = [std] * 3 if isinstance(std, (int, float)) else std
    return ImageProcessingSpec(
        height=int(size["height"]),
        width=int(size["width"]),
        resample=int(cfg.get("resample", 2)),
        do_resize=bool(cfg.get("do_resize", True)),
        do_rescale=bool(cfg.get("do_rescale", True)),
        rescale_factor=float(cfg.get("rescale_factor", 1 / 255)),
        do_normalize=bool(cfg.get("do_normalize", True)),
        image_mean=tuple(float(v) for v in mean),
        image_std=tuple(float(v) for v in std),
        do_convert_rgb=bool(cfg.get("do_convert_rgb", True)),
        do_pan_and_scan=bool(cfg.get("do_pan_and_scan") or False),
    )


def _token_ids_in(tokenizer: dict) -> dict[str, int]:
    """Every token of a parsed tokenizer.json; added tokens win over the model's vocabulary."""
    ids = {entry["content"]: entry["id"] for entry in tokenizer.get("added_tokens", [])}
    model_vocab = tokenizer.get("model", {}).get("vocab")
    if isinstance(model_vocab, dict):
        ids = {**model_vocab, **ids}
    elif isinstance(model_vocab, list):
        ids = {**{piece[0]: i for i, piece in enumerate(model_vocab)}, **ids}
    return ids


def _added_token_ids(tokenizer_file: Path) -> dict[str, int]:
    """tokenizer.json's `added_tokens` alone, where it is one of the file's first keys (as the
    tokenizers library writes it, ahead of the model's vocabulary): Gemma 3's special tokens are all
    there. Parsing the whole file (33 MB for Gemma 3) took seconds in every process that reads a spec;
    this reads the first megabytes. {} when the key is not near the start."""
    with open(tokenizer_file, "rb") as f:
        data = f.read(1 << 21)
        key = data.find(b'"added_tokens"', 0, 4096)
        if key < 0:
            return {}
        start = data.index(b"[", key)
        while True:  # read on until the array parses whole (Gemma 3's is 1.2 MB)
            try:
                added, _ = json.JSONDecoder().raw_decode(data[start:].decode("utf-8", "ignore"))
                return _token_ids_in({"added_tokens": added})
            except json.JSONDecodeError:
                more = f.read(len(data))
                if not more:
                    return {}
                data += more


def _token_ids(checkpoint: Path, config: dict, multimodal: bool) -> TokenSpec:
    tokenizer_file = checkpoint / "tokenizer.json"
    if not tokenizer_file.is_file():
        raise CheckpointError(f"{checkpoint}: missing tokenizer.json (a fast tokenizer is required)")
    tok_cfg = _load_json(checkpoint / "tokenizer_config.json")
    ids = _added_token_ids(tokenizer_file)
    whole_vocabulary = False

    def token_id(text: str, what: str) -> int:
        nonlocal ids, whole_vocabulary
        if text not in ids and not whole_vocabulary:
            ids, whole_vocabulary = _token_ids_in(json.loads(tokenizer_file.read_bytes())), True
        if text not in ids:
            raise CheckpointError(f"{checkpoint}: tokenizer has no {what} token {text!r}")
        return int(ids[text])

    # google/medgemma-4b-it names them in extra_special_tokens; transformers 5 saves them as
    # model_specific_special_tokens and top-level keys.
    extra = {
        name: tok_cfg[name] for name in ("boi_token", "eoi_token", "image_token") if name in tok_cfg
    }
    for key in ("model_specific_special_tokens", "extra_special_tokens"):
        if isinstance(tok_cfg.get(key), dict):
            extra.update(tok_cfg[key])
    boi_text = extra.get("boi_token", "<start_of_image>")
    eoi_text = extra.get("eoi_token", "<end_of_image>")
    image_text = extra.get("image_token", "<image_soft_token>")
    text_cfg = config.get("text_config", config)
    bos = config.get("bos_token_id", text_cfg.get("bos_token_id", 2))
    pad = config.get("pad_token_id", text_cfg.get("pad_token_id", 0))
    generation = _load_json(checkpoint / "generation_config.json", required=False)
    eos = generation.get("eos_token_id", config.get("eos_token_id", text_cfg.get("eos_token_id", 1)))
    eos = tuple(eos) if isinstance(eos, list) else (int(eos),)
    end_of_turn = token_id("<end_of_turn>", "end-of-turn")
    if end_of_turn not in eos:  # -it models end a reply with <end_of_turn>
        eos = eos + (end_of_turn,)
    image = token_id(image_text, "image soft") if multimodal else -1
    if multimodal:
        config_image = int(config.get("image_token_index", config.get("image_token_id", 262_144)))
        if config_image != image:
            raise CheckpointError(
                f"{checkpoint}: config.json image_token_index={config_image} but the tokenizer maps "
                f"{image_text!r} to {image}"
            )
    return TokenSpec(
        bos=int(bos),
        pad=int(pad if pad is not None else 0),
        eos=eos,
        start_of_turn=token_id("<start_of_turn>", "start-of-turn"),
        end_of_turn=end_of_turn,
        boi=token_id(boi_text, "begin-of-image") if multimodal else -1,
        eoi=token_id(eoi_text, "end-of-image") if multimodal else -1,
        image=image,
        boi_text=boi_text,
        eoi_text=eoi_text,
        image_text=image_text,
    )


def _chat_template(checkpoint: Path) -> str:
    jinja = checkpoint / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    for name in ("chat_template.json", "processor_config.json", "tokenizer_config.json"):
        template = _load_json(checkpoint / name, required=False).get("chat_template")
        if isinstance(template, str) and template:
            return template
    raise CheckpointError(f"{checkpoint}: no chat template (chat_template.jinja or tokenizer_config.json)")


def _read_spec(checkpoint: Path, require_weights: bool = True) -> ModelSpec:
    if not checkpoint.is_dir():
        raise CheckpointError(f"{checkpoint}: not a directory")
    config = _load_json(checkpoint / "config.json")
    architectures = config.get("architectures") or []
    architecture = next((a for a in architectures if a in SUPPORTED_ARCHITECTURES), None)
    if architecture is None:
        raise unsupported(f"{checkpoint}: config.json architectures", architectures or config.get("model_type"),
                          ", ".join(SUPPORTED_ARCHITECTURES))
    multimodal = architecture == "Gemma3ForConditionalGeneration"
    text_cfg = config.get("text_config", {}) if multimodal else config
    if require_weights and not list(checkpoint.glob("*.safetensors")):
        raise CheckpointError(f"{checkpoint}: no *.safetensors weights (pickled .bin weights are never loaded)")
    dtype = str(config.get("dtype") or config.get("torch_dtype") or text_cfg.get("dtype") or "bfloat16")
    generation = _load_json(checkpoint / "generation_config.json", required=False)
    vision = image_processing = None
    if multimodal:
        processor = _load_json(checkpoint / "processor_config.json", required=False)
        settings, source = _image_processor_settings(checkpoint, processor)
        vision, image_processing = _vision_spec(config), _image_processing_spec(settings)
        _check_processor_matches_model(checkpoint, vision, image_processing, settings, source, processor)
    return ModelSpec(
        architecture=architecture,
        dtype=dtype,
        text=_text_spec(text_cfg, "config.json text_config" if multimodal else "config.json"),
        vision=vision,
        image_processing=image_processing,
        tokens=_token_ids(checkpoint, config, multimodal),
        chat_template=_chat_template(checkpoint),
        default_max_new_tokens=generation.get("max_new_tokens"),
    )
