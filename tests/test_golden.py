"""Golden runs: tiny runs of both trainers give, bit for bit, the weights, results and curves recorded in tests/golden/.

A change that moves code without changing what it computes passes; one that changes a single bit of training fails.
The figures were recorded on one CPU thread with the torch, CPU kind and instruction sets named in each file;
floating-point results differ in the last bits between CPU kinds (AVX2 and AVX512 kernels), and between AVX512 CPUs
with other extensions (2026-12-05: every golden run differed on a CPU with AMX and AVX512-FP16), so each such platform
has its own files (<name>.<isa digest>.json) and a platform with none skips with the reason. The files without an
instruction-set list were recorded before it was kept: they serve an AVX512 machine that has no file of its own.

    python tests/test_golden.py --record         # record again, after a change that is meant to change the results
    python tests/test_golden.py --add-platform   # this platform's figures beside the others' (code that passes there)
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

    isa = set()
    if os.path.exists("/proc/cpuinfo"):  # the vector extensions the math libraries choose their kernels by
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                isa = {f for f in line.split(":", 1)[1].split() if f.startswith(("avx", "amx", "fma", "f16c"))}
                break
    return {
        "torch": torch.__version__,
        "cpu": torch.backends.cpu.get_cpu_capability(),
        "threads": 1,
        "isa": sorted(isa),
    }


def isa_digest(plat):
    return hashlib.sha256(" ".join(plat["isa"]).encode()).hexdigest()[:8]


def golden_for(name, plat):
    """This platform's record of a run: its own file, else one recorded before instruction sets were kept (the same
    torch and CPU kind); None when there is neither, with the platforms that have one."""
    records = [json.loads(f.read_text()) for f in sorted(GOLDEN.glob(f"{name}.*json"))]
    same = [r for r in records if r["platform"] == plat]
    older = [r for r in records if "isa" not in r["platform"] and dict(r["platform"], isa=plat["isa"]) == plat]
    return (same or older or [None])[0], [r["platform"] for r in records]


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
    golden, platforms = golden_for(name, platform())
    if golden is None:
        pytest.skip(f"golden figures recorded on {platforms}, this machine is {platform()}")
    got = run(name)
    assert got["result"] == golden["result"]
    assert got["scalars"].keys() == golden["scalars"].keys()
    for tag, values in golden["scalars"].items():
        assert got["scalars"][tag] == values, tag
    assert got["images"] == golden["images"]
    assert got["weights_sha256"] == golden["weights_sha256"]


def test_each_platform_finds_its_own_figures(tmp_path, monkeypatch):
    """A platform's own file first; a file recorded before instruction sets were kept serves the same torch and CPU
    kind; another CPU kind has none."""
    old = {"torch": "2.0", "cpu": "AVX512", "threads": 1}
    amx = dict(old, isa=["amx_tile", "avx512f"])
    (tmp_path / "run.json").write_text(json.dumps({"platform": old, "weights_sha256": "old"}))
    (tmp_path / f"run.{isa_digest(amx)}.json").write_text(json.dumps({"platform": amx, "weights_sha256": "amx"}))
    (tmp_path / "other_run.json").write_text(json.dumps({"platform": old, "weights_sha256": "another run's"}))
    monkeypatch.setattr(sys.modules[__name__], "GOLDEN", tmp_path)
    assert golden_for("run", amx)[0]["weights_sha256"] == "amx"
    assert golden_for("run", dict(old, isa=["avx512f"]))[0]["weights_sha256"] == "old"
    found, platforms = golden_for("run", dict(old, cpu="AVX2", isa=["avx2"]))
    assert found is None and sorted(map(str, platforms)) == sorted(map(str, [old, amx]))


if __name__ == "__main__":
    if sys.argv[1:] not in (["--record"], ["--add-platform"]):
        sys.exit(__doc__)
    GOLDEN.mkdir(exist_ok=True)
    for name in sorted(RUNS):
        record = {"command": [RUNS[name][0] + ".py", *RUNS[name][1]], "platform": platform(), **run(name)}
        for old in GOLDEN.glob(f"{name}.*json") if sys.argv[1] == "--record" else []:
            old.unlink()  # other platforms' figures were of the code before this change
        (GOLDEN / f"{name}.{isa_digest(record['platform'])}.json").write_text(json.dumps(record, indent=1) + "\n")
        print(f"recorded {name}: weights {record['weights_sha256'][:12]}")
