"""Shared test plumbing: load the single-file scripts as modules, run them as a user would, read TensorBoard."""

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# Under pytest-xdist (pytest.ini) two workers share the cores. Each worker, and every script it starts, gets one CPU
# thread, and OpenMP's threads sleep while they wait instead of spinning: a script with two threads (benchmark.py gives
# its cells cores / workers) beside the other worker spun its threads against each other (a grid cell 10 s alone,
# 106 s beside the other worker; 12 s with the passive policy).
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def load_script(name):
    """Import a top-level script (its __main__ block does not run)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def ppo():
    return load_script("ppo_camal_vizdoom")


def run_script(name, args, cwd, timeout=300, env_extra=None, **kwargs):
    """Run `python name.py args` in cwd (with env_extra in its environment); returns the CompletedProcess (stdout and
    stderr as text)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", **(env_extra or {}))
    return subprocess.run(
        [sys.executable, str(ROOT / f"{name}.py"), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        **kwargs,
    )


def read_events(run_dir):
    """All TensorBoard data of a run folder, read with TensorBoard's own loader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    acc.Reload()
    return acc


@pytest.fixture(scope="session")
def dl():
    return load_script("train_dl_camal")


PPO_TINY = [
    "--num-envs",
    "2",
    "--num-steps",
    "32",
    "--total-timesteps",
    "128",
    "--frame-height",
    "60",
    "--frame-width",
    "80",
]


def made_once(tmp_path_factory, name, make):
    """(folder, make(folder)'s JSON-able result), made once per test session even on several pytest-xdist workers (each
    its own process): the first to ask makes it under a file lock, the others wait and read what it wrote."""
    import json

    from filelock import FileLock

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the session's folder, above each worker's own
    folder, done = root / name, root / f"{name}.json"
    with FileLock(str(root / f"{name}.lock")):
        if not done.is_file():
            shutil.rmtree(folder, ignore_errors=True)  # a try that failed
            folder.mkdir(parents=True)
            done.write_text(json.dumps(make(folder)))
    return folder, json.loads(done.read_text())


def proc_read(pid, what="cmdline"):
    """/proc/<pid>/<what>, or "" when the process ended meanwhile (a listing of /proc is stale when read)."""
    try:
        return open(f"/proc/{pid}/{what}").read()
    except OSError:
        return ""


def process_record(proc):
    return {"args": proc.args, "returncode": proc.returncode, "stdout": proc.stdout, "stderr": proc.stderr}


def completed(record):
    return subprocess.CompletedProcess(record["args"], record["returncode"], record["stdout"], record["stderr"])


@pytest.fixture(scope="session")
def ppo_smoke_run(tmp_path_factory):
    """Tiny real PPO runs, each made on first use and shared: test_ppo_smoke checks each one, test_stats analyses them
    all. Returns run(env, method, more=()) -> (CompletedProcess, the folder it ran in); `more`: flags added to that
    run's."""

    def run(env, method, more=()):
        # one run also covers worker-process envs (the default on machines with more than 2 cores)
        extra = (
            ["--capture-video", "--save-model", "--vector-env", "async"] if (env, method) == ("Basic", "camal") else []
        )
        # for drl_attention_figure.py; and the paper's ReLU CAM, whose critic map is empty from the start at seed 2 (the
        # collapse warning)
        extra += ["--save-model", "--cam", "paper"] if (env, method) == ("Basic", "vanilla") else []
        args = [
            "--env",
            env,
            "--method",
            method,
            "--seed",
            "2",
            "--eval-episodes",
            "2",
            "--image-every",
            "1",
            "--collapse-patience",
            "1",
        ]
        args += [*PPO_TINY, *extra, *more]
        cwd, record = made_once(
            tmp_path_factory,
            "ppo_smoke-" + "-".join((env, method, *more)),
            lambda cwd: process_record(run_script("ppo_camal_vizdoom", args, cwd=cwd)),
        )
        return completed(record), cwd

    return run


DL_TINY = [
    "--shapes-classes",
    "3",
    "--shapes-per-class",
    "6",
    "--folds",
    "3",
    "--batch-size",
    "6",
    "--epochs",
    "1",
    "--image-size",
    "96",
]


@pytest.fixture(scope="session")
def shapes_runs(tmp_path_factory):
    """camal and vanilla on tiny shapes data, every fold, then eval_faithfulness.py over the six runs; shared by
    test_dl_train, test_eval_faithfulness and test_stats. Returns (folder, run folders, eval_faithfulness's process)."""

    def make(root):
        for method in ("camal", "vanilla"):
            proc = run_script("train_dl_camal", ["--method", method, "--fold", "all", *DL_TINY], cwd=root)
            assert proc.returncode == 0, proc.stderr[-3000:]
        runs = sorted(str(p) for p in (root / "runs").iterdir())
        flags = [
            "--steps",
            "5",
            "--baseline",
            "random",
            "--plot",
            "curves.png",
            "--figures",
            "figs",
            "--figure-samples",
            "4",
        ]
        return {"runs": runs, "proc": process_record(run_script("eval_faithfulness", [*runs, *flags], cwd=root))}

    root, made = made_once(tmp_path_factory, "shapes_runs", make)
    return root, made["runs"], completed(made["proc"])


class _RunsCode:
    """Unpickling this creates `path`: the proof that loading a file ran code from it."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def write_code_running_file(path, marker, **entries):
    """A torch.save file that runs code (creates `marker`) when loaded without weights_only; `entries` beside it."""
    import torch

    torch.save({**entries, "payload": _RunsCode(marker)}, path)


LONG_FIRST = (
    "test_slurm.py",
    "test_stats.py",
    "test_spurious_benchmark.py",  # two seeds trained and scored with two fills: about 2.5 min
    "test_drl_learning.py",
    "test_gpu_check.py",
    "test_resume.py",
    "test_benchmark_grid.py",
    "test_dl_train.py",
)


def pytest_collection_modifyitems(items):
    """The longest files are handed out first (pytest.ini's --no-loadscope-reorder): test_slurm.py holds one worker for
    about 5 minutes of a cluster's waits, and begun last it ended the suite minutes after the other workers ran dry."""
    rank = {name: i for i, name in enumerate(LONG_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(LONG_FIRST)))
