"""`medgemma-triton chat`: one request from the command line, streamed to stdout.

Exit codes (one line on stderr, "error: ...", for every failure):
  0  the answer was printed
  1  the server failed the request (an internal error, or the answer was cut short by it)
  2  invalid argument: the request was refused, by this client or by the server (bad image, bad value)
  3  the server cannot be reached (connection refused, DNS, TLS)
  4  the server is up but the model is not ready
  5  timed out (--timeout)
  130 interrupted (Ctrl-C); the request is cancelled
"""

from __future__ import annotations

import json
import sys

from medgemma_triton.client.errors import (
    DeadlineExceededError,
    InvalidArgumentError,
    MedGemmaError,
    ModelNotReadyError,
    UnavailableError,
)
from medgemma_triton.client.request import build_request
from medgemma_triton.client.sync import MedGemmaClient

EXIT_OK = 0
EXIT_SERVER_ERROR = 1
EXIT_INVALID_ARGUMENT = 2
EXIT_UNAVAILABLE = 3
EXIT_NOT_READY = 4
EXIT_TIMEOUT = 5


def build_messages(prompt: str, images: list[str], system: str | None) -> list[dict]:
    """MedGemma model-card messages: optional system turn, then the prompt followed by its images."""
    messages = []
    if system:
        messages.append({"role": "system", "content": [{"type": "text", "text": system}]})
    content = [{"type": "text", "text": prompt}]
    content += [{"type": "image", "image": path} for path in images]
    messages.append({"role": "user", "content": content})
    return messages


def chat_messages(args) -> list[dict]:
    """The request's messages: the prompt with its --image files, or a --series volume laid out slice by slice."""
    series_dir = getattr(args, "series", None)
    max_slices = getattr(args, "max_slices", None)
    images = list(args.image or [])
    if series_dir is None:
        if max_slices is not None:
            raise InvalidArgumentError("--max-slices applies only with --series DIR")
        return build_messages(args.prompt, images, args.system)
    if images:
        raise InvalidArgumentError("--series and --image cannot be combined: a volume request carries only its slices")
    from medgemma_triton.client.series import DEFAULT_MAX_SLICES, load_series, series_messages

    series = load_series(series_dir, max_slices=DEFAULT_MAX_SLICES if max_slices is None else max_slices)
    return series_messages(series, args.prompt, system=args.system)


def _fail(streamed: bool, message: str, code: int) -> int:
    if streamed:  # end the partial answer's line so the error line stands alone
        print(flush=True)
    print(f"error: {message}", file=sys.stderr, flush=True)
    return code


def run_chat(args) -> int:
    sampling = {
        "max_tokens": args.max_tokens,
        "temperature": args.temperature,
        "top_p": getattr(args, "top_p", None),
        "top_k": getattr(args, "top_k", None),
        "seed": args.seed,
        "stop": getattr(args, "stop", None),
    }
    timeout = getattr(args, "timeout", None)
    streaming = not (args.no_stream or args.json)
    streamed = False
    try:
        # Local checks first (no server needed). The server always streams: a streamed request stops
        # generating when cancelled (Ctrl-C, --timeout); --no-stream only changes what is printed when.
        request = build_request(chat_messages(args), stream=True, **sampling)
        with MedGemmaClient(args.url.split(","), timeout=timeout) as client:
            client.check_ready()
            with client.send(request) as stream:
                for delta in stream:
                    if streaming:
                        streamed = True
                        sys.stdout.write(delta)
                        sys.stdout.flush()
                result = stream.final_result()
    except InvalidArgumentError as exc:
        return _fail(streamed, f"invalid argument: {exc}", EXIT_INVALID_ARGUMENT)
    except ModelNotReadyError as exc:
        return _fail(streamed, str(exc), EXIT_NOT_READY)
    except UnavailableError as exc:
        return _fail(streamed, str(exc), EXIT_UNAVAILABLE)
    except DeadlineExceededError:
        return _fail(streamed, f"timed out after {timeout:g} s", EXIT_TIMEOUT)
    except MedGemmaError as exc:
        return _fail(streamed, f"server error: {exc}", EXIT_SERVER_ERROR)
    except OSError as exc:  # an image file that cannot be read
        return _fail(streamed, f"cannot read image {exc.filename}: {exc.strerror}", EXIT_INVALID_ARGUMENT)

    if args.json:
        print(
            json.dumps(
                {
                    "text": result.text,
                    "finish_reason": result.finish_reason,
                    "prompt_tokens": result.prompt_tokens,
                    "completion_tokens": result.completion_tokens,
                },
                ensure_ascii=False,
            )
        )
    elif streamed:
        print()
    else:
        print(result.text)
    return EXIT_OK

