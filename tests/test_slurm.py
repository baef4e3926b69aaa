"""benchmark.py --backend slurm against a real single-node SLURM cluster (tests/slurm/start.sh): real sbatch, squeue and
scontrol; a pre-emption, a time limit and a node failure, each resumed from its checkpoint with nothing lost."""

import json
import os
import shutil
import socket
import subprocess
import threading
import time

import pytest
from test_benchmark_grid import CELL, TINY_DL, TINY_DRL, bench, long_cell

from conftest import ROOT, read_events

pytestmark = [
    pytest.mark.skipif(
        not all(shutil.which(c) for c in ("sbatch", "slurmctld", "slurmd", "munged")) or os.geteuid() != 0,
        reason="needs a SLURM controller: apt-get install slurm-wlm munge, as root (.ci/run does); "
        "tests/slurm/start.sh starts it",
    ),
    pytest.mark.slow,
]
SLURM = ["--backend", "slurm", "--slurm-gpus-per-task", "0", "--slurm-cpus-per-task", "1", "--poll", "2"]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A controller and a node on this machine, on free ports, for this module; the environment that reaches it."""
    folder = tmp_path_factory.mktemp("slurm")
    ports = {"SLURMCTLD_PORT": str(free_port()), "SLURMD_PORT": str(free_port())}
    start = subprocess.run(
        [str(ROOT / "tests" / "slurm" / "start.sh"), str(folder)],
        env=dict(os.environ, **ports),
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert start.returncode == 0, start.stdout + start.stderr
    env = dict(os.environ, SLURM_CONF=str(folder / "slurm.conf"), PYTHONUNBUFFERED="1")
    yield env
    subprocess.run([str(ROOT / "tests" / "slurm" / "stop.sh"), str(folder)], timeout=60)


def tasks(env):
    """[(task id, state, reason)] of every job SLURM knows, finished ones included."""
    out = subprocess.run(
        ["squeue", "-h", "-r", "-t", "all", "-o", "%i %T %r"], capture_output=True, text=True, env=env, check=True
    ).stdout
    return [tuple(line.split()) for line in out.splitlines()]


def scontrol(env, *words):
    subprocess.run(["scontrol", *words], check=True, env=env, capture_output=True, text=True)


class Watcher(threading.Thread):
    """Beside a running grid: calls act(task id, seconds running) once a second until it returns True, and starts a
    requeued task 20 s after its requeue instead of after SLURM's two-minute hold (its begin time; what an admin's
    `scontrol update jobid=... starttime=now` does)."""

    def __init__(self, env, act=None):
        super().__init__(daemon=True)
        self.env, self.act, self.stop, self.requeues = env, act, threading.Event(), 0
        self.running_since, self.pending_since = {}, {}

    def run(self):
        while not self.stop.wait(1):
            for task, state, reason in tasks(self.env):
                # after 20 s: the previous run of the task must have ended, or its exit status is taken for the new
                # one's
                if (
                    state == "PENDING"
                    and reason == "BeginTime"
                    and time.time() - self.pending_since.setdefault(task, time.time()) > 20
                ):
                    scontrol(self.env, "update", f"jobid={task}", "starttime=now")
                    self.pending_since.pop(task)
                    self.requeues += 1
                if state == "RUNNING":
                    since = self.running_since.setdefault(task, time.time())
                    if self.act and self.act(task, time.time() - since):
                        self.act = None
                else:
                    self.running_since.pop(task, None)

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.join()


def quiet(stderr):
    """No warning noise: submitit's sacct polling is not used (sacct has no accounting database here)."""
    assert "sacct" not in stderr and "Bypassing" not in stderr and "Traceback" not in stderr, stderr[-3000:]


def one_value_per_iteration(cell, iterations, per_iter=64):
    (run,) = (cell / "runs").iterdir()
    assert (run / "eval.json").is_file()
    assert [e.step for e in read_events(run).Scalars("charts/SPS")] == [per_iter * i for i in range(1, iterations + 1)]


EARLY_SIGNAL = """import os, signal
if os.environ.get("SLURM_ARRAY_TASK_ID") == "1":  # the array's second task, once: killed before any code of ours runs
    try:
        os.close(os.open(os.path.join(os.path.dirname(__file__), "struck"), os.O_CREAT | os.O_EXCL))
        os.kill(os.getpid(), signal.SIGUSR2)
    except FileExistsError:
        pass
"""


def test_dl_and_drl_grids_with_their_analysis(cluster, tmp_path):
    """Both presets' grids through the cluster, analysed. The DL grid's second task dies of a signal before it has made
    its cell's folder (SLURM sent a time limit's SIGUSR2 0.15 s into a task on a loaded node): it is submitted again."""
    (tmp_path / "dl").mkdir()
    (tmp_path / "early").mkdir()
    (tmp_path / "early" / "sitecustomize.py").write_text(EARLY_SIGNAL)
    dl = bench(
        [
            "--preset",
            "dl",
            "--datasets",
            "shapes",
            "--models",
            "resnet18",
            "--methods",
            "camal",
            "vanilla",
            "--folds",
            "0",
            *SLURM,
            *TINY_DL,
        ],
        tmp_path / "dl",
        env=dict(cluster, PYTHONPATH=str(tmp_path / "early")),
    )
    assert dl.returncode == 0, dl.stderr[-3000:]
    assert "2 cells submitted as a SLURM array" in dl.stderr and "2 done, 0 failed" in dl.stderr
    assert (tmp_path / "early" / "struck").exists() and "submitted again" in dl.stderr, dl.stderr[-3000:]
    quiet(dl.stderr)
    stats = json.loads((tmp_path / "dl" / "benchmark_runs" / "analysis" / "stats.json").read_text())
    (comp,) = stats["dl"]["comparisons"]
    assert comp["baseline"] == "vanilla" and len(comp["pairs"]) == 1  # one fold: "too few pairs to test", no traceback
    (tmp_path / "drl").mkdir()
    drl = bench(
        ["--preset", "drl", "--envs", "Basic", "--seeds", "1", "--methods", "camal", "vanilla", *SLURM, *TINY_DRL],
        tmp_path / "drl",
        env=cluster,
    )
    assert drl.returncode == 0, drl.stderr[-3000:]
    assert "2 done, 0 failed" in drl.stderr
    quiet(drl.stderr)
    stats = json.loads((tmp_path / "drl" / "benchmark_runs" / "analysis" / "stats.json").read_text())
    assert stats["drl"]["methods"] == ["camal", "vanilla"]


def test_preemption_and_time_limit_resume_their_cells(cluster, tmp_path):
    """Two cells with a one-minute limit (SIGUSR2 45 s before it): each checkpoints and is requeued by submitit when the
    signal comes; the vanilla cell is also pre-empted with `scontrol requeue` (SIGTERM to every process of the task)
    early in its first run. benchmark.py waits through the requeues and analyses both cells."""
    iters = (
        80  # about 30 s of training on 2 idle cores: the time limit (its signal 15 s after a start) comes at least once
    )
    preempted = []

    def preempt(task, seconds):
        vanilla = list((tmp_path / "benchmark_runs" / "cells").glob("*vanilla*"))
        if seconds > 8 and vanilla and "iter 3/" in (vanilla[0] / "log.txt").read_text() and not preempted:
            for other, state, _ in tasks(cluster):  # the vanilla cell's task: the array's second
                if other == task and task.endswith("_1") and state == "RUNNING":
                    scontrol(cluster, "requeue", task)
                    preempted.append(task)
                    return True
        return False

    with Watcher(cluster, preempt) as watcher:
        proc = bench(
            [
                *CELL[:-3],
                "--methods",
                "camal",
                "vanilla",
                *SLURM,
                "--slurm-time",
                "1",
                "--slurm-signal-delay-s",
                "45",
                *long_cell(iters),
            ],
            tmp_path,
            timeout=1200,
            env=cluster,
        )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 done, 0 failed, 0 interrupted" in proc.stderr
    quiet(proc.stderr)
    assert preempted and watcher.requeues >= 2
    cells = {c.name.split("__")[2]: c for c in (tmp_path / "benchmark_runs" / "cells").iterdir()}
    camal, vanilla = ((cells[m] / "log.txt").read_text() for m in ("camal", "vanilla"))
    # the time limit's SIGUSR2 reaches the training from SLURM itself, or as submitit's SIGUSR1, whichever comes first
    assert (
        "SIGUSR1: saving a checkpoint" in camal or "SIGUSR2: saving a checkpoint" in camal
    ) and "resuming" in camal, camal[-3000:]
    assert "SIGTERM: saving a checkpoint" in vanilla and "resuming" in vanilla and "Traceback" not in vanilla, vanilla[
        -3000:
    ]
    for cell in cells.values():
        one_value_per_iteration(cell, iters)
    assert (tmp_path / "benchmark_runs" / "analysis" / "stats.json").is_file()


def test_a_node_failure_loses_nothing(cluster, tmp_path):
    """The node goes down under a running task (SLURM kills it and requeues it, or ends it NODE_FAIL and benchmark.py
    submits it again) and comes back: the cell resumes from its checkpoint and finishes."""
    iters, node = 60, socket.gethostname()
    downed = []

    def down(task, seconds):
        cells = list((tmp_path / "benchmark_runs" / "cells").glob("*"))
        if seconds > 5 and cells and "iter 12/" in (cells[0] / "log.txt").read_text():
            scontrol(cluster, "update", f"nodename={node}", "state=down", "reason=test")
            time.sleep(3)
            scontrol(cluster, "update", f"nodename={node}", "state=resume")
            downed.append(task)
            return True
        return False

    with Watcher(cluster, down):
        proc = bench([*CELL, *SLURM, "--checkpoint-every", "5", *long_cell(iters)], tmp_path, env=cluster)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert downed and "1 done, 0 failed" in proc.stderr
    quiet(proc.stderr)
    (cell,) = (tmp_path / "benchmark_runs" / "cells").iterdir()
    log = (cell / "log.txt").read_text()
    assert "resuming" in log, log[-3000:]
    one_value_per_iteration(cell, iters)
