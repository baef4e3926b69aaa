"""Golden runs: tiny runs of both trainers give, bit for bit, the weights, results and curves recorded in tests/golden/.

A change that moves code without changing what it computes passes; one that changes a single bit of training fails.
The figures were recorded on one CPU thread with the torch and CPU kind named in each file; floating-point results
differ in the last bits between CPU kinds (AVX2 and AVX512 kernels), so another kind skips with the reason.

    python tests/test_golden.py --record   # record again, after a change that is meant to change the results
"""

import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
GOLDEN = Path(__file__).resolve().parent / "golden"
PPO = ["--env", "Basic", "--num-envs", "2", "--num-steps", "32", "--total-timesteps", "256", "--frame-height", "60"]
PPO += ["--frame-width", "80", "--eval-episodes", "2", "--vector-env", "sync", "--image-every", "2", "--save-model"]
DL = [
    "--shapes-per-class",
    "8",
    "--folds",
    "4",
    "--fold",
    "0",
    "--image-size",
    "64",
    "--epochs",
    "2",
    "--batch-size",
    "8",
]
RUNS = {
    "ppo_camal": ("ppo_camal_vizdoom", [*PPO, "--method", "camal", "--seed", "3"]),
    "ppo_vanilla": ("ppo_camal_vizdoom", [*PPO, "--method", "vanilla", "--seed", "3"]),
    "dl_camal": ("train_dl_camal", [*DL, "--method", "camal", "--seed", "2"]),
    "dl_vanilla": ("train_dl_camal", [*DL, "--method", "vanilla", "--seed", "2"]),
}
# what depends on the clock, the machine or the run's name, not on what was computed
TIMING_TAGS = ("charts/SPS", "charts/epoch_seconds", "perf/")
TIMING_KEYS = ("wall_time", "run_name", "args")


def platform():
    import torch

    return {"torch": torch.__version__, "cpu": torch.backends.cpu.get_cpu_capability(), "threads": 1}


def tensors_hash(state):
    digest = hashlib.sha256()
    for name in sorted(state):
        digest.update(name.encode() + state[name].detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def run(name):
    """One golden run in a fresh folder: its weights' hash, its result file and its scalars, as recorded."""
    import torch
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    script, args = RUNS[name]
    with tempfile.TemporaryDirectory() as cwd:
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        done = subprocess.run(
            [sys.executable, str(ROOT / f"{script}.py"), *args, "--no-cuda"],
            cwd=cwd,
            env=env,
            capture_output=True,
            text=True,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        (run_dir,) = (Path(cwd) / "runs").iterdir()
        if script == "ppo_camal_vizdoom":
            weights = torch.load(run_dir / "ppo_camal_vizdoom.cleanrl_model", weights_only=True)
            result = json.loads((run_dir / "eval.json").read_text())
        else:
            weights = torch.load(run_dir / "model.pt", weights_only=True)["state_dict"]
            result = json.loads((run_dir / "metrics.json").read_text())
        acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "images": 0})
        acc.Reload()
        scalars = {
            tag: [[e.step, e.value] for e in acc.Scalars(tag)]
            for tag in sorted(acc.Tags()["scalars"])
            if not tag.startswith(TIMING_TAGS)
        }
        images = {
            tag: [hashlib.sha256(e.encoded_image_string).hexdigest() for e in acc.Images(tag)]
            for tag in acc.Tags()["images"]
        }
    return {
        "weights_sha256": tensors_hash(weights),
        "result": {k: v for k, v in result.items() if k not in TIMING_KEYS},
        "scalars": scalars,
        "images": images,
    }


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(RUNS))
def test_golden_run(name):
    golden = json.loads((GOLDEN / f"{name}.json").read_text())
    if golden["platform"] != platform():
        pytest.skip(f"golden figures recorded on {golden['platform']}, this machine is {platform()}")
    got = run(name)
    assert got["result"] == golden["result"]
    assert got["scalars"].keys() == golden["scalars"].keys()
    for tag, values in golden["scalars"].items():
        assert got["scalars"][tag] == values, tag
    assert got["images"] == golden["images"]
    assert got["weights_sha256"] == golden["weights_sha256"]


if __name__ == "__main__":
    if sys.argv[1:] != ["--record"]:
        sys.exit(__doc__)
    GOLDEN.mkdir(exist_ok=True)
    for name in sorted(RUNS):
        record = {"command": [RUNS[name][0] + ".py", *RUNS[name][1]], "platform": platform(), **run(name)}
        (GOLDEN / f"{name}.json").write_text(json.dumps(record, indent=1) + "\n")
        print(f"recorded {name}: weights {record['weights_sha256'][:12]}")
