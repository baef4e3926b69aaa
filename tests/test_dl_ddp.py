"""train_dl_camal.py under torchrun: DistributedDataParallel on the CPU with gloo, 2 processes."""

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT, read_events


@pytest.mark.slow
def test_torchrun_two_processes(tmp_path):
    args = [
        "--shapes-classes",
        "3",
        "--shapes-per-class",
        "6",
        "--folds",
        "3",
        "--batch-size",
        "6",
        "--epochs",
        "2",
        "--fold",
        "0",
        "--no-cuda",
    ]
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_port",
            "29517",
            str(ROOT / "train_dl_camal.py"),
            *args,
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "distributed: 2 processes (gloo), 3 samples each per batch" in proc.stdout
    (run_dir,) = (tmp_path / "runs").iterdir()  # one run, written by rank 0 alone
    m = json.loads((run_dir / "metrics.json").read_text())
    assert m["processes"] == 2 and m["train_size"] == 12
    assert (run_dir / "model.pt").is_file() and (run_dir / "faithfulness_samples.pt").is_file()
    assert [e.step for e in read_events(run_dir).Scalars("train/accuracy")] == [1, 2]
    # rank 0 logs every process's samples: accuracies are multiples of 1/12, not of 1/6
    for e in read_events(run_dir).Scalars("train/accuracy"):
        assert abs(e.value * 12 - round(e.value * 12)) < 1e-6
