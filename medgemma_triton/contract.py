"""The one contract: the `medgemma` model's inputs and outputs, for every profile.

`medgemma` is the top model, a Python (BLS) model that drives the others, not a Triton ensemble
(docs/design.md says why). Its tensor names follow NVIDIA's TensorRT-LLM backend ensemble
(`text_input`, `max_tokens`, `stream`, `text_output`, ...) so existing Triton LLM tooling (genai-perf, perf_analyzer) talks to it
unchanged; `messages` (MedGemma model-card chat JSON) and `images` (encoded bytes) are additions.
The client, the repository builder (config.pbtxt files), the server-side models and the tests all
read these tables; nothing restates them.

Request semantics:
- `messages` (JSON list of {"role", "content"}; content a string or a list of
  {"type": "text", "text"} / {"type": "image"} parts) is the chat. Image parts carry no pixels:
  the n-th image part takes the n-th element of `images`.
- `text_input` without `messages` is one user turn (the chat template is applied to it).
- Exactly one of `messages` / `text_input` must be given.
- `stream=true` (needs a gRPC stream): one response per generated chunk with a text delta;
  the last response carries `finish_reason`. `stream=false`: one response with the whole text.
- `timeout_ms`: the server stops generating this long after it received the request, and answers
  with what it has and `finish_reason: "timeout"`.
- A server at its limit of requests in flight refuses at once with a message that starts with
  SERVER_BUSY_PREFIX.
"""

from __future__ import annotations

from dataclasses import dataclass

TOP_MODEL = "medgemma"  # what clients call
# What each profile can serve (`medgemma-triton build PROFILE --precision P`; the first is the default);
# the built configs record it in the `profile` and `precision` parameters.
PRECISIONS = {"cpu": ("fp32", "int4", "int8"), "gpu": ("fp8", "int4_awq", "bf16")}
PREPROCESSING_MODEL = "preprocessing"
VISION_ENCODER_MODEL = "vision_encoder"
LLM_MODEL = "llm"


@dataclass(frozen=True)
class Tensor:
    name: str
    triton_dtype: str  # config.pbtxt data_type without the TYPE_ prefix, and tritonclient's datatype
    dims: tuple[int, ...]
    optional: bool = False


# tritonclient datatype names for config.pbtxt TYPE_* names
CLIENT_DTYPES = {
    "STRING": "BYTES",
    "BOOL": "BOOL",
    "INT32": "INT32",
    "INT64": "INT64",
    "UINT64": "UINT64",
    "FP32": "FP32",
}

TOP_INPUTS = (
    Tensor("text_input", "STRING", (1,), optional=True),
    Tensor("messages", "STRING", (1,), optional=True),
    Tensor("images", "STRING", (-1,), optional=True),
    Tensor("max_tokens", "INT32", (1,), optional=True),
    Tensor("temperature", "FP32", (1,), optional=True),
    Tensor("top_p", "FP32", (1,), optional=True),
    Tensor("top_k", "INT32", (1,), optional=True),
    Tensor("random_seed", "UINT64", (1,), optional=True),
    Tensor("stop_words", "STRING", (-1,), optional=True),
    Tensor("stream", "BOOL", (1,), optional=True),
    Tensor("timeout_ms", "UINT64", (1,), optional=True),  # server-side deadline, from when medgemma gets the request
)

TOP_OUTPUTS = (
    Tensor("text_output", "STRING", (1,)),  # delta when streaming, whole text otherwise
    Tensor("output_ids", "INT64", (-1,)),  # the token ids this response adds
    Tensor("finish_reason", "STRING", (1,)),  # "" until the last response: stop | length | timeout | cancelled
    Tensor("prompt_tokens", "INT32", (1,)),
    Tensor("completion_tokens", "INT32", (1,)),  # generated so far, including this response
)

# Triton's gRPC stream carries an error's message but not its status code, so refusals of bad input
# start with this prefix; the client maps it back to InvalidArgumentError.
INVALID_ARGUMENT_PREFIX = "invalid argument: "
# A request refused because the server is at its limit of requests in flight: retry later, or elsewhere.
SERVER_BUSY_PREFIX = "server busy: "

# A request refused because the server is stopping (SIGTERM): retry on another replica.
SERVER_STOPPING_PREFIX = "server stopping: "
# How long a stopping server lets requests in flight finish; serve passes it to every model process.
DRAIN_TIMEOUT_ENV = "MEDGEMMA_DRAIN_TIMEOUT_S"
DEFAULT_DRAIN_TIMEOUT_S = 30.0
# The top model's gauge of requests in flight, which serve reads while it drains.
IN_FLIGHT_METRIC = "medgemma_requests_in_flight"


def drain_timeout_s(environ=None) -> float:
    """The drain time a model process was started with (DRAIN_TIMEOUT_ENV), or the default."""
    import os

    raw = (os.environ if environ is None else environ).get(DRAIN_TIMEOUT_ENV)
    try:
        return max(0.0, float(raw)) if raw else DEFAULT_DRAIN_TIMEOUT_S
    except ValueError:
        return DEFAULT_DRAIN_TIMEOUT_S


FINISH_STOP = "stop"  # end-of-turn / eos token or a stop word
FINISH_LENGTH = "length"  # max_tokens reached
FINISH_TIMEOUT = "timeout"  # the request's timeout_ms passed: generation stopped there
FINISH_CANCELLED = "cancelled"


@dataclass(frozen=True)
class SamplingDefaults:
    max_tokens: int = 200  # MedGemma model card: max_new_tokens=200
    temperature: float = 0.0  # 0 means greedy (do_sample=False), the model card's setting
    top_p: float = 1.0
    top_k: int = 0  # 0 means no top-k filter
    seed: int = 0


SAMPLING_DEFAULTS = SamplingDefaults()


# --- The internal contract: what the models say to each other (config.pbtxt templates declare these
# tensors; serving/pipeline.py sends them; repository.config.validate_configs checks the templates and
# the gpu llm against them). "medgemma" below is the top model (serving/pipeline.py).
INPUT_IDS = "input_ids"  # preprocessing's output, the llm's input: the prompt's token ids
PREPROCESSING_INPUTS = (
    "text_input", "messages", "images", "max_tokens", "temperature", "top_p", "top_k", "random_seed", "stop_words",
)
PREPROCESSING_FINISH_OUTPUT = "finish_reason"  # "" or FINISH_TIMEOUT (no image was encoded)
VISION_INPUT = "pixel_values"  # preprocessing's output, vision_encoder's input
VISION_OUTPUT = "image_embeddings"  # vision_encoder's output, the llm's input
PREPROCESSING_OUTPUTS = (INPUT_IDS, VISION_INPUT, PREPROCESSING_FINISH_OUTPUT)
PIXELS_INPUT = "pixels"  # BOOL [1], set by medgemma: false asks preprocessing for the prompt only
IMAGE_OFFSET_INPUT = "image_offset"  # INT32 [1], set by medgemma: pixel values of these images, the request's from this index
TIMEOUT_INPUT = "timeout_ms"  # set by medgemma for preprocessing and the llm: what is left of the request's timeout_ms
PREPROCESSING_SET_HERE = (TIMEOUT_INPUT, PIXELS_INPUT, IMAGE_OFFSET_INPUT)
LLM_REQUEST_INPUTS = ("max_tokens", "temperature", "top_p", "top_k", "random_seed")  # forwarded as sent
READ_HERE = ("stream", "stop_words", "timeout_ms")  # top-level inputs medgemma reads itself
LLM_STREAM_INPUT = "stream"  # set by medgemma: the client's stream flag, or true when there are stop words
LLM_INPUTS = (INPUT_IDS, VISION_OUTPUT) + LLM_REQUEST_INPUTS + (LLM_STREAM_INPUT, TIMEOUT_INPUT)
LLM_OUTPUTS = ("output_ids", "finish_reason", "prompt_tokens", "completion_tokens")
LLM_STOP_INPUT = "stop"  # BOOL [1]: stop the llm request with this request id
LLM_STOP_REASON_INPUT = "stop_reason"  # STRING [1]: FINISH_CANCELLED (default) or FINISH_STOP
LLM_POLL_INPUT = "poll"  # BOOL [1]: the llm request with this request id's tokens since its last answer
LLM_CONTROL_INPUTS = (LLM_STOP_INPUT, LLM_STOP_REASON_INPUT, LLM_POLL_INPUT)  # requests that name one by id
TO_CLIENT = ("text_output",) + LLM_OUTPUTS  # what medgemma answers: TOP_OUTPUTS' names
# The gpu llm (TensorRT-LLM, gpu/llm_engine.py) takes the same tensors; the control requests' and the
# image embeddings' must be declared in its config even when a request leaves them out.
GPU_LLM_REQUIRED_INPUTS = (INPUT_IDS, VISION_OUTPUT) + LLM_CONTROL_INPUTS
