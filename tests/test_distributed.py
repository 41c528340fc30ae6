"""DistributedDataParallel through torchrun: two processes on the gloo backend."""

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT, override_args


@pytest.mark.slow
def test_torchrun_two_processes_train_and_write_one_result(tmp_path):
    out = tmp_path / "ddp"
    overrides = [
        "teacher.arch=resnet18",
        "teacher.width=0.5",
        "student.width=0.25",
        "teacher.train.epochs=1",
        "student.train.epochs=4",
        "evaluation.seeds=[0]",
        "ensemble.variants=[]",
        "ensemble.multihead.heads=0",
        "compression.enabled=false",
        "cascade.enabled=false",
        "distill.feature.enabled=true",
    ]
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            "-m",
            "training",
            "all",
            "--out",
            str(out),
            "--threads",
            "1",
            *override_args(overrides),
            *("--only", "student_kd"),  # and the teacher it learns from; the plain student proves nothing more here
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["world_size"] == 2
    # Each rank trains on half of the 1,257 training images per epoch; rank 0 logs once per epoch.
    history = [json.loads(x) for x in (out / "student_kd" / "metrics.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in history] == [1, 2, 3, 4]
    assert results["models"]["student_kd"]["top1"] > 0.3  # learning happened across both ranks
