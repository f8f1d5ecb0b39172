"""How the `preprocessing` model schedules requests: text never waits behind an image decode.

One model instance serves every request on threads of its own, off Triton's execute() thread:
- text-only requests on the text lane (a chat template and a tokenizer call: milliseconds);
- requests with images on the image lane, each on its own thread, where it must hold its share of
  a DecodeBudget (the pixels of its largest image) while it decodes its images one by one.
Pillow and numpy release the GIL while they decode, convert and resize, so a text request runs
while images decode; the budget bounds the memory that concurrent decodes take.

A request's deadline (time.monotonic(), from its timeout_ms) is checked before any image is
decoded, between images, and while it waits for the budget: an expired request ends with
finish_reason "timeout" and no pixel values, at its deadline, not when an image decode is done.
"""

from __future__ import annotations

import ctypes
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager

import numpy as np

from medgemma_triton.contract import PIXELS_INPUT
from medgemma_triton.serving.options import GetInput, first_value
from medgemma_triton.serving.preprocess import DeadlineExpired, Prepared, Preprocessor, check_deadline

DECODE_BUDGET_PARAMETER = "image_decode_budget_pixels"  # preprocessing's config.pbtxt parameter
TEXT_LANE_THREADS = 2  # one text request with a long chat (up to MEDGEMMA_MAX_MESSAGES_BYTES) never holds up the next
# Image requests each wait for the budget on a thread of their own, so that each wait ends at its
# deadline; beyond this many at once a request waits for a thread, and its deadline is checked then.
IMAGE_LANE_THREADS = 64
MMAP_THRESHOLD_BYTES = 1 << 20  # glibc's initial default is 128 KiB; Pillow allocates images in blocks of 16 MiB
_M_MMAP_THRESHOLD = -3  # glibc malloc.h


def map_large_allocations() -> bool:
    """Have glibc mmap every allocation of MMAP_THRESHOLD_BYTES or more in this process, so that a decoded
    image's memory goes back to the OS when it is freed. By default glibc raises the threshold after
    the first large free, and later images' memory stays in its per-thread heaps (one per image lane
    thread that decoded). False where the C library has no mallopt (not glibc)."""
    try:
        return bool(ctypes.CDLL(None).mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))
    except (AttributeError, OSError):
        return False


class DecodeBudget:
    """Pixels of images being decoded at once in this process, granted in arrival order.

    Pillow keeps a decoded RGB image in 4 bytes per pixel and the RGB conversion copies it, so a
    decode holds about 8 bytes per pixel of its image at its peak. A request asking for more than
    the whole budget gets the whole budget (it decodes alone). Strict arrival order: a large
    image is never overtaken forever by small ones.
    """

    def __init__(self, pixels: int):
        if pixels < 1:
            raise ValueError(f"the image decode budget must be >= 1 pixel ({DECODE_BUDGET_PARAMETER}), got {pixels}")
        self.pixels = int(pixels)
        self._free = self.pixels
        self._waiting: deque[object] = deque()
        self._changed = threading.Condition()

    @property
    def in_use(self) -> int:
        with self._changed:
            return self.pixels - self._free

    @property
    def waiters(self) -> int:
        with self._changed:
            return len(self._waiting)

    @contextmanager
    def held(self, pixels: int, deadline: float | None = None):
        """Hold `pixels` (at most the whole budget) for the block; DeadlineExpired if `deadline`
        (time.monotonic()) passes while waiting for them."""
        need = min(int(pixels), self.pixels)
        ticket = object()
        with self._changed:
            self._waiting.append(ticket)
            try:
                while self._waiting[0] is not ticket or self._free < need:
                    left = None if deadline is None else deadline - time.monotonic()
                    if left is not None and left <= 0:
                        raise DeadlineExpired
                    self._changed.wait(left)
            finally:
                self._waiting.remove(ticket)
                self._changed.notify_all()  # the next in line may fit now, or be first
            self._free -= need
        try:
            yield
        finally:
            with self._changed:
                self._free += need
                self._changed.notify_all()


class PreprocessingLanes:
    """Prepares requests on the text lane or the image lane; each submit() returns a Future of Prepared
    (or of InvalidRequest / another exception for a request that failed)."""

    def __init__(self, preprocessor: Preprocessor, decode_budget_pixels: int = 0):
        """decode_budget_pixels: 0 means one image of the largest size allowed (MEDGEMMA_MAX_IMAGE_PIXELS)."""
        self.preprocessor = preprocessor
        self.budget = DecodeBudget(decode_budget_pixels or preprocessor.limits.max_image_pixels)
        self._text = ThreadPoolExecutor(TEXT_LANE_THREADS, thread_name_prefix="preprocessing-text")
        self._images = ThreadPoolExecutor(IMAGE_LANE_THREADS, thread_name_prefix="preprocessing-images")

    def submit(self, get: GetInput, deadline: float | None = None) -> Future:
        """`get`: the request's inputs (copied out of Triton's request); `deadline`: time.monotonic()."""
        images = get("images")
        decodes = images is not None and np.asarray(images).size > 0 and wants_pixels(get)
        return (self._images if decodes else self._text).submit(self._prepare, get, deadline)

    def _prepare(self, get: GetInput, deadline: float | None) -> Prepared:
        # a bad request fails whether or not its time is up
        plan = self.preprocessor.pixels_only(get) or self.preprocessor.plan(get)
        try:
            check_deadline(deadline)
            if not plan.images or not wants_pixels(get):
                return Prepared(plan.input_ids, self.preprocessor.no_pixel_values())
            with self.budget.held(plan.decode_pixels, deadline):
                pixel_values = self.preprocessor.pixel_values(plan.images, deadline, plan.first_image)
        except DeadlineExpired:
            return self.preprocessor.timed_out(plan)
        return Prepared(plan.input_ids, pixel_values)

    def shutdown(self) -> None:
        self._text.shutdown(wait=False, cancel_futures=True)
        self._images.shutdown(wait=False, cancel_futures=True)


def wants_pixels(get: GetInput) -> bool:
    """False for a request sent with `pixels: false` (its prompt only; medgemma asks for the pixel
    values of its images a few at a time, with `image_offset`)."""
    pixels = get(PIXELS_INPUT)
    return pixels is None or bool(first_value(pixels, PIXELS_INPUT))
