"""`medgemma-triton chat` (client/cli.py): output, one-line errors and exit codes."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from pydicom.data import get_testdata_file

from medgemma_triton.cli import main
from medgemma_triton.client import cli as chat_cli


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main(["chat", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_connection_refused_is_one_line_and_exit_3(capsys):
    code, out, err = run(capsys, "--url", "127.0.0.1:1", "hello")
    assert (code, out, err) == (chat_cli.EXIT_UNAVAILABLE, "", "error: connection refused at 127.0.0.1:1\n")


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--temperature", "-1", "hi"], "error: invalid argument: temperature is -1.0; it must be between 0 and 2 (0 means greedy)\n"),
        (["--image", "/nonexistent/x.png", "hi"], "error: cannot read image /nonexistent/x.png: No such file or directory\n"),
        (["--image", __file__, "hi"], "error: invalid argument: messages[0].content[1]: "),
    ],
)
def test_local_refusals_need_no_server_and_exit_2(capsys, argv, message):
    code, out, err = run(capsys, "--url", "127.0.0.1:1", *argv)
    assert code == chat_cli.EXIT_INVALID_ARGUMENT and out == ""
    assert err.startswith(message) and err.count("\n") == 1


def test_module_entry_point_reports_the_same():
    done = subprocess.run(
        [sys.executable, "-m", "medgemma_triton.cli", "chat", "--url", "127.0.0.1:1", "hi"], capture_output=True, text=True
    )
    assert (done.returncode, done.stdout, done.stderr) == (3, "", "error: connection refused at 127.0.0.1:1\n")


# --- against the tiny repository's server --------------------------------------------------------


def reference(url, messages, images=(), **sampling):
    from serving_fixtures import MedgemmaStream

    stream = MedgemmaStream(url)
    try:
        outcome = stream.request(messages=messages, images=list(images), **sampling)
    finally:
        stream.close()
    assert outcome.error is None, outcome.error
    return outcome


def test_streamed_no_stream_and_json_answers_equal_the_servers(tiny_server, capsys):
    from medgemma_triton.client.dicom import dicom_to_png

    xray = get_testdata_file("6154")  # a MONOCHROME1 CR
    messages = [
        {"role": "system", "content": [{"type": "text", "text": "You are an expert radiologist."}]},
        {"role": "user", "content": [{"type": "text", "text": "Describe this X-ray"}, {"type": "image"}]},
    ]
    outcome = reference(tiny_server.url, messages, [dicom_to_png(xray)], max_tokens=12)
    argv = ["--url", tiny_server.url, "--system", "You are an expert radiologist.", "--image", xray, "--max-tokens", "12"]

    assert run(capsys, *argv, "Describe this X-ray") == (0, outcome.text + "\n", "")
    assert run(capsys, *argv, "--no-stream", "Describe this X-ray") == (0, outcome.text + "\n", "")
    code, out, err = run(capsys, *argv, "--json", "Describe this X-ray")
    assert (code, err) == (0, "")
    assert json.loads(out) == {
        "text": outcome.text,
        "finish_reason": outcome.finish_reason,
        "prompt_tokens": outcome.prompt_tokens,
        "completion_tokens": outcome.completion_tokens,
    }


# Stream errors carry no gRPC status: the server prefixes refusals with contract.INVALID_ARGUMENT_PREFIX.
def test_server_refusal_is_invalid_argument_exit_2(tiny_server, capsys):
    code, out, err = run(capsys, "--url", tiny_server.url, "--max-tokens", "100000", "hi")
    assert code == chat_cli.EXIT_INVALID_ARGUMENT and out == ""
    assert err.startswith("error: invalid argument: max_tokens is 100000") and err.count("\n") == 1


def test_timeout_exit_5(tiny_server, capsys):
    code, out, err = run(capsys, "--url", tiny_server.url, "--max-tokens", "4000", "--timeout", "0.5", "--no-stream", "Write a long report.")
    assert (code, out, err) == (chat_cli.EXIT_TIMEOUT, "", "error: timed out after 0.5 s\n")
