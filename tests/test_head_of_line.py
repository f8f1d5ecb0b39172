"""Head-of-line blocking and deadlines at every wait.

Large image requests (4 PNGs of 8192x8192, small on the wire, seconds to decode) must not hold up
text-only requests, must decode within the preprocessing model's pixel budget, and a request's
timeout_ms must end it while it waits - for the decode budget, or for a decode slot in the llm.
Served tests run a real Triton server on loopback with real gRPC clients; the engine test's
decoder is a stand-in (named FakeDecoder) whose prefill the test holds.
"""

from __future__ import annotations

import io
import threading
import time

import numpy as np
import pytest
from PIL import Image

from medgemma_triton.contract import FINISH_LENGTH, FINISH_STOP, FINISH_TIMEOUT
from medgemma_triton.runtime.sampling import SamplingParams
from medgemma_triton.serving.engine import Engine, GenerationRequest
from medgemma_triton.serving.options import GenerationOptions
from medgemma_triton.serving.preprocess import DeadlineExpired
from medgemma_triton.serving.preprocess_lanes import DecodeBudget
from test_engine_batching import ListStream

pytestmark = pytest.mark.served  # starts tritonserver or the gateway: the full tier only

LARGE_SIDE = 8192  # the largest image every default limit allows (MEDGEMMA_MAX_IMAGE_PIXELS)
IMAGES_PER_REQUEST = 4  # MEDGEMMA_MAX_IMAGES
IMAGE_CLIENTS = 4
WAIT_S = 60.0  # how long a test waits for something that should take well under a second


def large_png() -> bytes:
    """An 8192x8192 RGB PNG, mostly one colour: about 200 KB to send, about a second to decode."""
    image = Image.new("RGB", (LARGE_SIDE, LARGE_SIDE), (200, 30, 40))
    image.paste((10, 120, 250), (0, 0, 512, 512))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def user_turn(text: str, images: int = 0) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image"}] * images + [{"type": "text", "text": text}]}]


# --- the decode budget, on its own ---


def test_budget_grants_in_arrival_order_and_a_wait_ends_at_its_deadline():
    """Holders beyond the budget wait; they get it in the order they asked, a large one is not
    overtaken by a later small one, a request above the whole budget gets all of it, and a waiter
    whose deadline passes leaves the line with DeadlineExpired (the next one moves up)."""
    budget = DecodeBudget(100)
    order: list[str] = []
    release = threading.Event()

    def hold(name: str, pixels: int, deadline=None, started=None):
        try:
            with budget.held(pixels, deadline):
                order.append(name)
                if started is not None:
                    started.set()
                release.wait(WAIT_S)
        except DeadlineExpired:
            order.append(f"{name} expired")

    first_in = threading.Event()
    threads = [threading.Thread(target=hold, args=("first", 60, None, first_in))]
    threads[0].start()
    assert first_in.wait(WAIT_S)
    deadline = time.monotonic() + WAIT_S
    for waiters, (name, pixels, expires_in) in enumerate((("large", 1000, None), ("late", 10, 0.2), ("small", 10, None)), 1):
        threads.append(threading.Thread(
            target=hold, args=(name, pixels, None if expires_in is None else time.monotonic() + expires_in)))
        threads[-1].start()
        while budget.waiters < waiters and "late expired" not in order:  # in this arrival order
            assert time.monotonic() < deadline
            time.sleep(0.005)
    while "late expired" not in order:  # "late" would fit beside "first", but waits in line behind "large"
        assert time.monotonic() < deadline, order
        time.sleep(0.01)
    assert order == ["first", "late expired"] and budget.in_use == 60
    release.set()
    for thread in threads:
        thread.join(WAIT_S)
    assert order == ["first", "late expired", "large", "small"]
    assert budget.in_use == 0


# --- the preprocessing model's lanes, in process (what its model.py runs) ---


def _inputs(messages: list[dict], images=(), **extra) -> dict[str, np.ndarray]:
    import json

    inputs = {"messages": np.array([json.dumps(messages).encode()], dtype=np.object_), **extra}
    if images:
        inputs["images"] = np.array(list(images), dtype=np.object_)
    return inputs


def test_text_and_bad_requests_pass_image_requests_that_wait_for_the_decode_budget(tiny_checkpoint):
    """With the whole decode budget held, an image request waits; a text request and a bad image
    request are answered meanwhile, and the waiting image request ends at its deadline with
    finish_reason `timeout`, its prompt ids and no pixel values. Released, images decode."""
    from medgemma_triton.runtime.limits import InvalidRequest
    from medgemma_triton.serving.preprocess import Preprocessor
    from medgemma_triton.serving.preprocess_lanes import PreprocessingLanes

    preprocessor = Preprocessor(tiny_checkpoint)
    lanes = PreprocessingLanes(preprocessor)
    small = io.BytesIO()
    Image.new("RGB", (32, 32), (1, 2, 3)).save(small, format="PNG")
    images = [small.getvalue()] * 2
    release = threading.Event()
    holding = threading.Event()

    def hold_budget():
        with lanes.budget.held(lanes.budget.pixels):
            holding.set()
            release.wait(WAIT_S)

    holder = threading.Thread(target=hold_budget)
    holder.start()
    try:
        assert holding.wait(WAIT_S)
        waiting = lanes.submit(_inputs(user_turn("Describe", 2), images).get)
        expiring = lanes.submit(_inputs(user_turn("Describe", 2), images).get, deadline=time.monotonic() + 0.3)
        text = lanes.submit(_inputs(user_turn("Hello")).get).result(WAIT_S)
        assert text.finish_reason == "" and text.pixel_values.shape[0] == 0 and text.input_ids.size > 0
        bad = lanes.submit(_inputs(user_turn("Describe", 1), images).get)  # two images for one image part
        with pytest.raises(InvalidRequest):
            bad.result(WAIT_S)
        timed_out = expiring.result(WAIT_S)
        assert not waiting.done()
        assert timed_out.finish_reason == FINISH_TIMEOUT and timed_out.pixel_values.shape[0] == 0
        assert timed_out.input_ids.size > 0
    finally:
        release.set()
        holder.join(WAIT_S)
        lanes.shutdown()  # what is running (the waiting request) still finishes
    prepared = waiting.result(WAIT_S)
    assert prepared.finish_reason == "" and prepared.pixel_values.shape == (2, *preprocessor.image_shape)
    alone = preprocessor(_inputs(user_turn("Describe", 2), images).get)
    np.testing.assert_array_equal(prepared.pixel_values, alone.pixel_values)
    assert lanes.budget.in_use == 0


# --- the llm engine's queue, with a stand-in decoder ---

FAKE_VOCAB = 8
FAKE_TOKEN = 3  # what FakeDecoder always predicts (not an eos id)


class FakeDecoder:
    """Stands in for OnnxDecoder (the engine's only dependency here): always predicts FAKE_TOKEN;
    its first prefill waits until the test sets `unblock`."""

    def __init__(self):
        self.unblock = threading.Event()
        self.in_first_prefill = threading.Event()
        self._held = False

    def new_sequence(self, prompt_ids, image_embeddings=None):
        return {"length": len(prompt_ids)}

    def _logits(self, rows: int) -> np.ndarray:
        logits = np.zeros((rows, FAKE_VOCAB), dtype=np.float32)
        logits[:, FAKE_TOKEN] = 1.0
        return logits

    def chunk_ends(self, prompt_ids, chunk_tokens):
        return [len(prompt_ids)]

    def prefill_chunk(self, state, end):
        if not self._held:
            self._held = True
            self.in_first_prefill.set()
            assert self.unblock.wait(WAIT_S), "the test never released the first prefill"
        return self._logits(1)[0]

    def step(self, state, token_id):
        return self._logits(1)[0]

    def step_batch(self, states, token_ids):
        return self._logits(len(states))

    def release_batch(self):
        pass

    def release(self, state):
        pass


def _generation(stream, deadline=None, max_tokens=3) -> GenerationRequest:
    options = GenerationOptions(SamplingParams(max_tokens=max_tokens, temperature=0.0), stream=False)
    return GenerationRequest(np.arange(5, dtype=np.int64), None, options, stream, deadline=deadline)


def test_a_request_waiting_for_a_decode_slot_times_out_at_its_deadline():
    """One decode slot, held by a request stuck in its prefill: a queued request whose deadline
    passes ends with finish_reason `timeout` and no tokens while the scheduler is still stuck
    (not at its next step), and frees its queue place at once."""
    decoder = FakeDecoder()
    engine = Engine(decoder, eos_ids=(1,), max_positions=64, multimodal=False,
                    max_active_requests=1, max_queued=1)
    try:
        first, queued = ListStream(), ListStream()
        engine.submit(_generation(first))
        assert decoder.in_first_prefill.wait(WAIT_S)
        engine.submit(_generation(queued, deadline=time.monotonic() + 0.2))
        assert queued.done.wait(WAIT_S), "the queued request did not time out while the scheduler was busy"
        assert not decoder.unblock.is_set() and not first.done.is_set()
        assert queued.error is None
        assert [(c.output_ids, c.finish_reason, c.prompt_tokens, c.completion_tokens) for c in queued.chunks] == [
            ([], FINISH_TIMEOUT, 5, 0)
        ]
        after = ListStream()  # the queue place is free again: admitted, not refused as busy
        engine.submit(_generation(after))
        assert not after.done.is_set()
        decoder.unblock.set()
        for stream in (first, after):
            assert stream.done.wait(WAIT_S) and stream.error is None
            assert [t for c in stream.chunks for t in c.output_ids] == [FAKE_TOKEN] * 3
            assert stream.chunks[-1].finish_reason == FINISH_LENGTH
        assert len(queued.chunks) == 1  # nothing more for the request that timed out
    finally:
        decoder.unblock.set()
        engine.shutdown()


# --- served: a real Triton server and real gRPC clients ---


@pytest.fixture(scope="module")
def png() -> bytes:
    return large_png()


@pytest.fixture(scope="module")
def hol_server(tiny_repository):
    """A server of its own: the image load here must not slow the session's other served tests."""
    from serving_fixtures import _start

    server = _start(tiny_repository, OMP_NUM_THREADS="1")
    try:
        yield server
    finally:
        server.stop()


class ImageLoad:
    """IMAGE_CLIENTS clients, each sending 4-image requests back to back until stop()."""

    def __init__(self, url: str, png: bytes, **request):
        from serving_fixtures import MedgemmaStream

        self.streams = [MedgemmaStream(url) for _ in range(IMAGE_CLIENTS)]
        self.request = dict(messages=user_turn("Describe the images.", IMAGES_PER_REQUEST),
                            images=[png] * IMAGES_PER_REQUEST, max_tokens=4, stream=False, **request)
        self.outcomes: list = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._loop, args=(s,), daemon=True) for s in self.streams]

    def _loop(self, stream) -> None:
        while not self._stop.is_set():
            self.outcomes.append(stream.request(timeout_s=300, **self.request))

    def __enter__(self) -> "ImageLoad":
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(300)
        for stream in self.streams:
            stream.close()


def _preprocessing_rss_mib(server) -> float:
    from medgemma_triton.bench.soak import rss_mib

    pids = [pid for pid, name in server.model_processes().items() if name.startswith("preprocessing")]
    return sum(rss_mib(pid) or 0.0 for pid in pids)


def test_text_is_not_held_up_by_image_decodes_and_images_decode_within_the_budget(hol_server, png):
    """Four clients send 4 x 8192x8192 PNGs back to back (each request is seconds of decoding; one
    preprocessing instance before took each in turn, and a text request waited 13 s behind them).
    Text requests now finish in well under 2 s; every image request succeeds; and preprocessing's
    memory stays near one image decode above idle (the default budget: one image of the largest
    size at a time), not four."""
    from serving_fixtures import MedgemmaStream

    text = MedgemmaStream(hol_server.url)
    try:
        text.request(messages=user_turn("Hello"), max_tokens=2)  # warm
        idle_mib = _preprocessing_rss_mib(hol_server)
        peak_mib = idle_mib
        latencies = []
        with ImageLoad(hol_server.url, png) as load:
            time.sleep(3.0)  # every image client has a request in preprocessing
            for _ in range(5):
                started = time.monotonic()
                outcome = text.request(timeout_s=120, messages=user_turn("Is this normal?"), max_tokens=4)
                latencies.append(time.monotonic() - started)
                assert outcome.error is None and outcome.finish_reason in (FINISH_STOP, FINISH_LENGTH), outcome
                peak_mib = max(peak_mib, _preprocessing_rss_mib(hol_server))
                time.sleep(0.5)
            while len(load.outcomes) < IMAGE_CLIENTS:
                peak_mib = max(peak_mib, _preprocessing_rss_mib(hol_server))
                time.sleep(0.1)
    finally:
        text.close()
    print(f"\ntext latencies {[round(t, 2) for t in latencies]} s; {len(load.outcomes)} image requests; "
          f"preprocessing RSS {idle_mib:.0f} -> peak {peak_mib:.0f} MiB")
    assert max(latencies) < 2.0, latencies
    assert load.outcomes and all(o.error is None and o.finish_reason in (FINISH_STOP, FINISH_LENGTH)
                                 for o in load.outcomes), [o.error for o in load.outcomes]
    # One decode of an 8192x8192 RGB PNG holds about 8 bytes per pixel (512 MiB); four at once, 2 GiB.
    assert peak_mib - idle_mib < 1.5 * 8 * LARGE_SIDE * LARGE_SIDE / 2**20, (idle_mib, peak_mib)


def test_timeout_counts_while_a_request_waits_for_image_decoding(hol_server, png):
    """An image request with timeout_ms=1000 queued behind the image load comes back with
    finish_reason `timeout` (no text, not an error) within a few seconds, not after the decodes
    ahead of it (about 10 s before)."""
    from serving_fixtures import MedgemmaStream

    late = MedgemmaStream(hol_server.url)
    try:
        with ImageLoad(hol_server.url, png):
            time.sleep(3.0)
            started = time.monotonic()
            outcome = late.request(timeout_s=120, messages=user_turn("Describe the images.", IMAGES_PER_REQUEST),
                                   images=[png] * IMAGES_PER_REQUEST, max_tokens=4, stream=False, timeout_ms=1000)
            took = time.monotonic() - started
    finally:
        late.close()
    print(f"\ntimed out after {took:.2f} s")
    assert outcome.error is None, outcome.error
    assert outcome.finish_reason == FINISH_TIMEOUT and outcome.text == "" and outcome.completion_tokens == 0
    assert outcome.prompt_tokens > 0
    assert took < 3.0


VISION_HOLD_S = 4.0
SLOW_VISION_MODEL = f'''"""The repository's vision_encoder model, held VISION_HOLD_S per call: a stand-in for a real-size
encoder on a CPU (seconds per image), so that a second request queues behind the first."""

import importlib.util
import pathlib
import time

_spec = importlib.util.spec_from_file_location("real_vision_model", pathlib.Path(__file__).with_name("real_model.py"))
_real = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_real)


class TritonPythonModel(_real.TritonPythonModel):
    def execute(self, requests):
        time.sleep({VISION_HOLD_S})
        return super().execute(requests)
'''


def test_a_deadline_ends_a_request_waiting_in_the_vision_encoders_queue(tiny_repository, tmp_path):
    """Triton 2.51 rejects a BLS request from vision_encoder's queue when its timeout (what is left of
    the client's timeout_ms) passes, under the queue policy in vision_encoder's config: the request
    comes back `timeout` while the encoder is still busy with the request ahead of it, and the
    encoder never runs it (its statistics count one inference and one failure)."""
    import shutil

    import tritonclient.grpc as grpcclient
    from serving_fixtures import MedgemmaStream, _start

    repository = tmp_path / "repo"
    shutil.copytree(tiny_repository, repository)
    version = repository / "vision_encoder" / "1"
    (version / "model.py").rename(version / "real_model.py")
    (version / "model.py").write_text(SLOW_VISION_MODEL)
    small = io.BytesIO()
    Image.new("RGB", (32, 32), (1, 2, 3)).save(small, format="PNG")
    request = dict(messages=user_turn("Describe", 1), images=[small.getvalue()], max_tokens=2, stream=False)

    server = _start(repository, OMP_NUM_THREADS="1")
    ahead, late = MedgemmaStream(server.url), MedgemmaStream(server.url)
    try:
        ahead.send(**request)
        time.sleep(0.5)  # the first request is in the encoder
        started = time.monotonic()
        outcome = late.request(timeout_s=120, timeout_ms=1500, **request)
        took = time.monotonic() - started
        first = ahead.receive(timeout_s=120)
        client = grpcclient.InferenceServerClient(server.url)
        stats = client.get_inference_statistics("vision_encoder", as_json=True)["model_stats"][0]
        client.close()
    finally:
        ahead.close()
        late.close()
        server.stop()
    print(f"\ntimed out after {took:.2f} s")
    assert outcome.error is None and outcome.finish_reason == FINISH_TIMEOUT and outcome.text == ""
    assert first.error is None and first.finish_reason in (FINISH_STOP, FINISH_LENGTH)
    assert int(stats["inference_count"]) == 1
    assert int(stats["inference_stats"].get("fail", {}).get("count", 0)) == 1
    assert took < VISION_HOLD_S


def test_the_benchmark_measures_a_served_model(hol_server):
    """benchmarks/studies/head_of_line.py against the served model (small images, a short run): every request
    answered, text latencies and the preprocessing process's RSS reported, the report printable."""
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "studies" / "head_of_line.py"
    module_spec = importlib.util.spec_from_file_location("head_of_line", path)
    benchmark = importlib.util.module_from_spec(module_spec)
    sys.modules[module_spec.name] = benchmark  # its dataclasses resolve their annotations through it
    module_spec.loader.exec_module(benchmark)

    report = benchmark.run(hol_server.url, hol_server.process.pid, duration_s=2.0, image_side=256, text_interval_s=0.1)
    print("\n" + "\n".join(benchmark.lines(report)))
    assert report["text_requests"] > 0 and report["text_errors"] == []
    assert report["image_requests"] > 0 and report["image_errors"] == []
    assert report["text_latency_s"]["count"] == report["text_requests"]
    assert all(p["error"] is None and p["finish_reason"] for p in report["deadline_probes"].values())
    rss = report["preprocessing_rss_mib"]
    assert 0 < rss["idle"] <= rss["peak"]
