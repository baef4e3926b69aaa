"""Shared test plumbing: load the single-file scripts as modules, run them as a user would, read TensorBoard."""
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def load_script(name):
    """Import a top-level script (its __main__ block does not run)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def ppo():
    return load_script("ppo_camal_vizdoom")


def run_script(name, args, cwd, timeout=300, **kwargs):
    """Run `python name.py args` in cwd; returns the CompletedProcess (stdout and stderr as text)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run(
        [sys.executable, str(ROOT / f"{name}.py"), *args],
        cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env, **kwargs,
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
