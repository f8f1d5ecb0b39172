"""The bounded soak (benchmarks/soak.py) against a real server: nothing lost, memory reported.

MEDGEMMA_SOAK_S sets its length (default 120 s, the CI version); docs/performance.md has a longer run.
"""

from __future__ import annotations

import os

import pytest

pytestmark = pytest.mark.served  # starts tritonserver or the gateway: the full tier only

SOAK_S = float(os.environ.get("MEDGEMMA_SOAK_S", "120"))


def test_a_soak_loses_nothing_and_reports_memory(tiny_server):
    from medgemma_triton.bench.soak import KINDS, run_soak

    report = run_soak(tiny_server.url, SOAK_S, concurrency=16, server_pid=tiny_server.process.pid, sample_s=2.0)
    print("\n" + "\n".join(report.lines()))
    assert report.lost == 0, report.lost_examples
    for kind in KINDS:  # every kind ran, and ended the expected way at least once
        assert report.requests.get(kind, 0) > 0
    assert report.outcomes.get("bad: invalid", 0) > 0 and report.outcomes.get("cancel: cancelled", 0) > 0
    assert report.outcomes.get("image: answered", 0) > 0 and report.outcomes.get("text: answered", 0) > 0
    names = set(report.rss_mib)
    assert {"tritonserver", "llm_0_0", "medgemma_0_0", "vision_encoder_0_0", "preprocessing_0_0"} <= names
    assert all(len(samples) >= 2 for samples in report.rss_mib.values())
