"""A bounded Atheris run over the gateway's image decoding, seeded with real pictures of every format."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

HARNESS = Path(__file__).parent / "fuzz" / "fuzz_decode.py"
RUNS = 10000  # seeded with every format, coverage-guided (~20 s on 2 cores); `make fuzz` runs for minutes


@pytest.mark.slow
def test_decoding_fuzzed_bytes_never_escapes_the_gateways_errors(tmp_path):
    corpus = tmp_path / "corpus"
    seeded = subprocess.run([sys.executable, str(HARNESS), "--seed", str(corpus)], capture_output=True, text=True)
    assert seeded.returncode == 0 and len(list(corpus.iterdir())) == 9, seeded.stderr
    proc = subprocess.run(
        [sys.executable, str(HARNESS), str(corpus), f"-runs={RUNS}", "-timeout=10", "-rss_limit_mb=3072",
         f"-artifact_prefix={tmp_path}/", "-print_final_stats=1"],
        capture_output=True,
        text=True,
        timeout=600,
    )  # fmt: skip
    findings = [p.name for p in tmp_path.iterdir() if p.name.startswith(("crash-", "oom-", "timeout-"))]
    assert proc.returncode == 0 and not findings, proc.stderr[-4000:]
    assert f"Done {RUNS} runs" in proc.stderr, proc.stderr[-2000:]
