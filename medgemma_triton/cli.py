"""`medgemma-triton`: dev-checkpoint, export, build, serve, chat, openai."""

from __future__ import annotations

import argparse
import sys

from medgemma_triton.contract import DEFAULT_DRAIN_TIMEOUT_S, PRECISIONS
from medgemma_triton.serving.parameters import LlmParameters


def _dev_checkpoint(args) -> int:
    from medgemma_triton.export.checkpoints import build_dev_checkpoint

    build_dev_checkpoint(args.kind, args.output, seed=args.seed)
    print(args.output)
    return 0


def _export(args) -> int:
    from medgemma_triton.export.onnx_export import export_onnx

    if args.int4_block_size is not None and args.precision != "int4":
        print("error: --int4-block-size sets an int4 export (--precision int4)", file=sys.stderr)
        return 2
    export_onnx(args.checkpoint, args.output, precision=args.precision, force=args.force,
                int8_weights=args.int8_weights, int4_block_size=args.int4_block_size)
    return 0


BUILD_PROFILES = ("cpu", "gpu", "synthetic")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def _int8_weights_argument(parser, default) -> None:
    parser.add_argument(
        "--int8-weights", choices=("unsigned", "signed"), default=default,
        help="int8/int4 exports: how int8 weights are stored. unsigned (default): right on every CPU. signed: "
             "faster on CPUs with VNNI or AMX; refused at load on x86 CPUs without VNNI (their kernels saturate)",
    )


def _int4_block_size_argument(parser) -> None:
    parser.add_argument(
        "--int4-block-size", type=int, choices=(16, 32, 64, 128), default=None,
        help="int4: weights per scale in the projections (default 16, the size CI's quality gate passes on the "
             "dev checkpoint). 32 and 64 read fewer bytes per token, so decode faster at the 4B size, and cost "
             "quality on dev: measure quality on your weights first (docs/performance.md)",
    )


def _build_synthetic(args) -> int:
    from medgemma_triton.repository import build_synthetic_repository
    from medgemma_triton.serving.synthetic import SyntheticSettings

    chosen = {name: value for name, value in (("tokens_per_second", args.tokens_per_second),
                                              ("tokens_per_response", args.tokens_per_response),
                                              ("seconds_per_image", args.seconds_per_image)) if value is not None}
    try:
        settings = SyntheticSettings(**chosen)
    except ValueError as exc:
        print(f"error: build synthetic: {exc}", file=sys.stderr)
        return 2
    build_synthetic_repository(args.output, settings)
    return 0


def _build(args) -> int:
    from medgemma_triton.repository import build_repository
    from medgemma_triton.repository.cpu import CpuSettings

    settings = None
    if args.profile == "cpu":
        if args.int4_block_size is not None and args.precision != "int4":
            print("error: --int4-block-size sets an int4 build (--precision int4)", file=sys.stderr)
            return 2
        options = {name: value for name, value in (("stream_interval", args.stream_interval),
                                                   ("decoder_engine", args.decoder_engine),
                                                   ("int8_weights", args.int8_weights),
                                                   ("int4_block_size", args.int4_block_size)) if value is not None}
        if (args.int8_weights or args.int4_block_size) and "decoder_engine" not in options:
            options["decoder_engine"] = "onnxruntime"  # they set the ONNX int4/int8 exports
        try:
            settings = CpuSettings(**options)
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    build_repository(args.checkpoint, args.output, profile=args.profile, precision=args.precision,
                     cache_dir=args.cache_dir, settings=settings)
    return 0


def _model_profile(profiles, name: str, help: str) -> argparse.ArgumentParser:
    """`build NAME`: a profile that builds from a checkpoint, with its precisions (contract.PRECISIONS)."""
    parser = profiles.add_parser(name, help=help)
    parser.add_argument("--checkpoint", required=True, help="the HF checkpoint")
    parser.add_argument("--output", required=True)
    parser.add_argument("--precision", choices=PRECISIONS[name], default=PRECISIONS[name][0])
    parser.add_argument("--cache-dir", default=None, help="where exported artifacts are cached")
    return parser


def _legacy_build(argv: list[str]) -> list[str]:
    """`build --profile P ...` (and `build ...`, the cpu profile) as `build P ...`, said once on stderr; the
    synthetic profile's --synthetic-* options lose their prefix."""
    if len(argv) < 2 or argv[0] != "build" or argv[1] in (*BUILD_PROFILES, "-h", "--help"):
        return argv
    rest, profile = list(argv[1:]), "cpu"
    for i, arg in enumerate(rest):
        if arg == "--profile" and i + 1 < len(rest):
            profile = rest.pop(i + 1)
            rest.pop(i)
            break
        if arg.startswith("--profile="):
            profile = rest.pop(i).split("=", 1)[1]
            break
    rest = [arg.replace("--synthetic-", "--", 1) if arg.startswith("--synthetic-") else arg for arg in rest]
    print(f"note: `medgemma-triton build --profile {profile}` is now `medgemma-triton build {profile}`",
          file=sys.stderr)
    return ["build", profile, *rest]


def _gateway_config(args, triton_url: str, prefix: str = ""):
    from medgemma_triton.gateway.config import GatewayConfig

    def option(name):
        return getattr(args, prefix + name)

    return GatewayConfig(
        triton_url=triton_url,
        host=args.host,
        port=option("port"),
        api_key=GatewayConfig.api_key_from(getattr(args, "api_key", None)),
        ssl_certfile=option("ssl_certfile"),
        ssl_keyfile=option("ssl_keyfile"),
        allowed_local_media=option("allowed_local_media"),
        model_name=option("model_name"),
    )


def _openai(args) -> int:
    from medgemma_triton.gateway.server import run_gateway

    try:
        config = _gateway_config(args, args.triton_url)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return run_gateway(config)


def _serve(args) -> int:
    from medgemma_triton.server.supervisor import serve_forever

    gateway = None
    if args.openai_port is not None:
        try:
            gateway = _gateway_config(args, "", prefix="openai_")
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    return serve_forever(
        args.repository,
        host=args.host,
        grpc_port=args.grpc_port,
        http_port=args.http_port,
        metrics_port=args.metrics_port,
        ready_timeout_s=args.ready_timeout,
        log_verbose=args.log_verbose,
        gateway=gateway,
        drain_timeout_s=args.drain_timeout,
        log_file=args.log_file,
    )


def _chat(args) -> int:
    from medgemma_triton.client.cli import run_chat

    return run_chat(args)


def _output_error():
    """export.atomic.OutputError, which needs no heavy imports (unwritable output paths)."""
    from medgemma_triton.export.atomic import OutputError

    return OutputError


def _toolchain_missing():
    from medgemma_triton.repository.gpu import ToolchainMissing

    return ToolchainMissing


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="medgemma-triton", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    p = commands.add_parser("dev-checkpoint", help="build an offline development checkpoint")
    p.add_argument("--kind", choices=("tiny", "dev"), required=True)
    p.add_argument("--output", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_dev_checkpoint)

    p = commands.add_parser("export", help="export a checkpoint's vision encoder and decoder to ONNX")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--output", required=True)
    p.add_argument("--precision", choices=("fp32", "int4", "int8"), default="fp32")
    p.add_argument("--force", action="store_true", help="re-export even if the output is up to date")
    _int8_weights_argument(p, default="unsigned")
    _int4_block_size_argument(p)
    p.set_defaults(func=_export)

    p = commands.add_parser("build", help="export (cached) and assemble a Triton model repository: build cpu|gpu|synthetic")
    profiles = p.add_subparsers(dest="profile", required=True, metavar="{cpu,gpu,synthetic}")
    cpu = _model_profile(profiles, "cpu", "ONNX Runtime (fp32) or llama.cpp (int4/int8) on CPU")
    cpu.add_argument(
        "--stream-interval", type=_positive_int, default=None,
        help=f"streamed tokens per response once the text shows (default {LlmParameters.stream_interval}; "
             "1: every token)",
    )
    cpu.add_argument(
        "--decoder-engine", choices=("llama.cpp", "onnxruntime"), default=None,
        help="int4/int8: llama.cpp (default: a Q4_K_M / Q8_0 GGUF on llama.cpp's kernels; needs "
             "scripts/setup-llamacpp.sh) or onnxruntime (the ONNX int4/int8 exports, with --int8-weights and "
             "--int4-block-size)",
    )
    _int8_weights_argument(cpu, default=None)
    _int4_block_size_argument(cpu)
    cpu.set_defaults(func=_build)
    gpu = _model_profile(profiles, "gpu", "TensorRT vision engine and TensorRT-LLM, inside NVIDIA's Triton "
                                          "TensorRT-LLM container")
    gpu.set_defaults(func=_build)
    synthetic = profiles.add_parser("synthetic", help="the contract with no model: deterministic tokens at a fixed "
                                                      "rate, to calibrate load generators")
    synthetic.add_argument("--output", required=True)
    synthetic.add_argument("--tokens-per-second", type=float, default=None,
                           help="tokens per second per request (default 1000)")
    synthetic.add_argument("--tokens-per-response", type=_positive_int, default=None,
                           help="tokens per streamed response (default 1)")
    synthetic.add_argument("--seconds-per-image", type=float, default=None,
                           help="modelled vision time per image of a request, before its first token "
                                "(default 0; set it to a per-image time measured on the real deployment)")
    synthetic.set_defaults(func=_build_synthetic)

    p = commands.add_parser("serve", help="run Triton Inference Server on a model repository")
    p.add_argument("repository")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--grpc-port", type=int, default=8001)
    p.add_argument("--http-port", type=int, default=8000)
    p.add_argument("--metrics-port", type=int, default=8002)
    p.add_argument("--ready-timeout", type=float, default=300.0)
    p.add_argument("--log-verbose", type=int, default=0)
    p.add_argument("--log-file", default=None,
                   help="Triton's log (default: a temporary file, removed on a clean stop, kept after a failure)")
    p.add_argument("--drain-timeout", type=_non_negative_float, default=DEFAULT_DRAIN_TIMEOUT_S,
                   help="on SIGTERM, seconds that requests in flight get to finish (default %(default)g); "
                        "keep it below Kubernetes' terminationGracePeriodSeconds (docs/kubernetes.md)")
    p.add_argument("--openai-port", type=int, default=None,
                   help="also run the OpenAI-compatible gateway on this port (docs/openai.md); "
                        "its API key comes from $MEDGEMMA_API_KEY")
    _gateway_arguments(p, prefix="openai-")
    p.set_defaults(func=_serve)

    p = commands.add_parser("chat", help="send a chat request to a running deployment")
    p.add_argument("prompt")
    p.add_argument("--url", default="127.0.0.1:8001", help="HOST:PORT, or several separated by commas (failover)")
    p.add_argument("--image", action="append", default=[])
    p.add_argument("--series", default=None, metavar="DIR",
                   help="a folder of one CT or MR series' DICOM files, sent as MedGemma 1.5's volume recipe (docs/client.md)")
    p.add_argument("--max-slices", type=_positive_int, default=None, metavar="N",
                   help="with --series: sample at most N slices (default: the recipe's)")
    p.add_argument("--system", default=None)
    p.add_argument("--max-tokens", type=int, default=None)
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=None)
    p.add_argument("--timeout", type=float, default=None, help="seconds for the whole request")
    p.add_argument("--no-stream", action="store_true")
    p.add_argument("--json", action="store_true", help="print one JSON object with text and counts")
    p.set_defaults(func=_chat)

    p = commands.add_parser("openai", help="run the OpenAI-compatible chat completions gateway (docs/openai.md)")
    p.add_argument("--triton-url", default="127.0.0.1:8001", help="the Triton server's gRPC address")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=9000)
    p.add_argument("--api-key", default=None,
                   help="require Authorization: Bearer <key> (default: $MEDGEMMA_API_KEY; none: no key)")
    _gateway_arguments(p)
    p.set_defaults(func=_openai)
    return parser


def _gateway_arguments(parser, prefix: str = "") -> None:
    """The gateway's options, shared by `openai` and `serve` (there prefixed with openai-)."""
    parser.add_argument(f"--{prefix}ssl-certfile", default=None, help="TLS certificate (PEM); needs the key file")
    parser.add_argument(f"--{prefix}ssl-keyfile", default=None, help="TLS private key (PEM)")
    parser.add_argument(f"--{prefix}allowed-local-media", default=None, metavar="DIR",
                        help="let image_url name files (paths or file:// URLs) inside DIR; off by default")
    parser.add_argument(f"--{prefix}model-name", default=None,
                        help="the model id clients send (default: the served checkpoint's name)")


def main(argv=None) -> int:
    from medgemma_triton.spec import CheckpointError

    args = build_parser().parse_args(_legacy_build(list(sys.argv[1:] if argv is None else argv)))
    try:
        return args.func(args)
    except (CheckpointError, _output_error(), _toolchain_missing()) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
