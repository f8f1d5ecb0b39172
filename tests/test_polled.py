"""serving/polled.py: the llm answers each request once; a stream's tokens reach the polls in order."""

from __future__ import annotations

import random
import threading

from medgemma_triton.serving.engine import Chunk
from medgemma_triton.serving.polled import Mailboxes


class Sender:
    """A response sender that records the one answer it gets."""

    def __init__(self):
        self.answers: list[tuple] = []
        self.answered = threading.Event()

    def take(self, chunk, error):
        self.answers.append((chunk, error))
        self.answered.set()


def deliver(sender, chunk, error):
    sender.take(chunk, error)


def chunk(ids, reason=""):
    return Chunk(list(ids), reason, 5, 0)


def test_a_request_that_does_not_stream_gets_one_answer_and_is_forgotten():
    boxes = Mailboxes(deliver)
    first = Sender()
    stream = boxes.open("r1", first)
    stream.send(chunk([1, 2, 3], "length"), final=True)
    assert first.answers == [(chunk([1, 2, 3], "length"), None)]
    assert len(boxes) == 0
    late = Sender()
    boxes.poll("r1", late)
    assert late.answers[0][0] is None and "no generation with this request id" in late.answers[0][1][0]
    assert late.answers[0][1][1] is True  # refused as invalid


def test_a_stream_s_tokens_are_merged_between_polls_and_a_poll_waits_for_the_next():
    boxes = Mailboxes(deliver)
    first, second, third = Sender(), Sender(), Sender()
    stream = boxes.open("r1", first)
    stream.send(chunk([1]), final=False)
    assert first.answers == [(chunk([1]), None)]
    stream.send(chunk([2]), final=False)
    stream.send(chunk([3, 4]), final=False)
    boxes.poll("r1", second)
    assert second.answers == [(chunk([2, 3, 4]), None)]
    boxes.poll("r1", third)
    assert third.answers == []  # nothing new yet: the poll waits
    stream.send(chunk([5], "stop"), final=True)
    assert third.answers == [(chunk([5], "stop"), None)]
    assert len(boxes) == 0


def test_a_stopped_stream_ends_with_an_empty_answer_after_its_last_tokens():
    boxes = Mailboxes(deliver)
    stream = boxes.open("r1", Sender())
    stream.send(chunk([1]), final=False)
    stream.send(chunk([2]), final=False)
    stream.close()  # stopped by id: no finish reason
    tokens, end = Sender(), Sender()
    boxes.poll("r1", tokens)
    assert tokens.answers == [(chunk([2]), None)]
    boxes.poll("r1", end)
    assert end.answers == [(None, None)]
    assert len(boxes) == 0


def test_an_error_replaces_undelivered_tokens_and_a_second_waiting_poll_is_refused():
    boxes = Mailboxes(deliver)
    stream = boxes.open("r1", Sender())
    stream.send(chunk([1]), final=False)
    waiting, twice = Sender(), Sender()
    boxes.poll("r1", waiting)
    boxes.poll("r1", twice)
    assert "already has a poll waiting" in twice.answers[0][1][0]
    stream.send(chunk([2]), final=False)  # answers the waiting poll
    stream.fail("llm: out of memory", invalid_request=False)
    last = Sender()
    boxes.poll("r1", last)
    assert waiting.answers == [(chunk([2]), None)]
    assert last.answers == [(None, ("llm: out of memory", False))]
    assert len(boxes) == 0


def test_a_stream_nobody_polls_is_cancelled_and_then_forgotten():
    now = [0.0]
    boxes = Mailboxes(deliver, abandoned_s=60.0, clock=lambda: now[0])
    stream = boxes.open("r1", Sender())
    assert not stream.is_cancelled()  # its first answer is awaited
    stream.send(chunk([1]), final=False)
    now[0] = 59.0
    assert not stream.is_cancelled()
    now[0] = 61.0
    assert stream.is_cancelled()  # the engine stops it
    stream.close()
    assert len(boxes) == 1
    now[0] = 122.0
    boxes.open("r2", Sender())  # opening sweeps the mailboxes nobody came back for
    assert len(boxes) == 1


def test_requests_without_an_id_never_share_a_mailbox():
    boxes = Mailboxes(deliver)
    a, b = Sender(), Sender()
    boxes.open("", a).send(chunk([1], "length"), final=True)
    boxes.open("", b).send(chunk([2], "length"), final=True)
    assert a.answers == [(chunk([1], "length"), None)] and b.answers == [(chunk([2], "length"), None)]


def test_concurrent_streams_and_polls_deliver_every_token_once_in_order():
    boxes = Mailboxes(deliver)
    streams = 8
    tokens_each = 400
    received: dict[str, list[int]] = {}

    def generate(rid: str, stream) -> None:
        rng = random.Random(rid)
        for token in range(tokens_each):
            last = token == tokens_each - 1
            stream.send(chunk([token], "length" if last else ""), final=last)
            if rng.random() < 0.1:
                threading.Event().wait(0.0005)

    def consume(rid: str, first: Sender) -> None:
        got: list[int] = []
        sender = first
        while True:
            assert sender.answered.wait(10), f"{rid}: no answer"
            answer, error = sender.answers[0]
            assert error is None
            got += answer.output_ids
            if answer.finish_reason:
                break
            sender = Sender()
            boxes.poll(rid, sender)
        received[rid] = got

    threads = []
    for i in range(streams):
        rid, first = f"r{i}", Sender()
        stream = boxes.open(rid, first)
        threads += [threading.Thread(target=generate, args=(rid, stream)),
                    threading.Thread(target=consume, args=(rid, first))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert received == {f"r{i}": list(range(tokens_each)) for i in range(streams)}
    assert len(boxes) == 0
