"""benchmarks/gpu_check.py in its reduced CPU mode: every part runs the project's real code and reports it."""

import importlib.util
import json
import subprocess
import sys

import pytest

from conftest import ROOT, load_script

SCRIPT = ROOT / "benchmarks" / "gpu_check.py"


@pytest.mark.slow
def test_reduced_mode_runs_every_part(tmp_path):
    out = tmp_path / "g.json"
    p = subprocess.run(
        [sys.executable, str(SCRIPT), "--out", str(out), "--reduced"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert p.stdout.splitlines()[0].startswith("gpu_check: REDUCED MODE")
    r = json.loads(out.read_text())
    assert r["system"]["mode"] == "cpu-reduced" and r["failed"] == [] and r["skipped"] == [] and r["verdict"] is None
    assert [row["num_envs"] for row in r["ppo_env"]] == [2] and all(row["sps"] > 0 for row in r["ppo_env"])
    train = r["ppo_train"]
    assert [(row["num_envs"], row["method"], row["flags"]) for row in train] == [(2, "camal", "")]
    for row in train:
        assert row["rc"] == 0 and row["sps"] > 0
        assert abs(row["env_share"] + row["policy_share"] + row["update_share"] - 1) < 1e-6
        assert 0 < row["env_share"] < 1 and row["policy_share"] > 0 and row["update_seconds"] > 0
    assert {(row["model"], row["precision"]) for row in r["dl_step"]} == {("resnet18", "fp32")}
    (cause,) = r["dl_causes"]  # a profile of both steps; no CUDA graphs on a CPU
    assert (
        cause["model"] == "resnet18"
        and cause["camal_kernels"] > cause["ce_kernels"] > 0
        and cause["camal_kernel_ms"] > 0
    )
    assert "graphed_overhead_pct" not in cause and cause["top_extra_ms"]
    assert [row["batch"] for row in r["extraction"]] == [1, 4]
    assert r["exactness_max_abs_diff"]["resnet18"] < 1e-4
    runs = {row["what"]: row for row in r["dl_run"]}
    assert all(row["rc"] == 0 for row in runs.values()), runs
    assert 0 <= runs["train_dl_camal.py --amp"]["test_accuracy"] <= 1
    assert 0 <= runs["eval_faithfulness.py"]["removal_auc"] <= 1
    assert runs["torchrun --nproc_per_node 1"]["backend"] == "gloo"  # a process group even for one process
    # the grid's cost: a generated Pets cell, its second epoch timed, for both methods of the one reduced model
    cost = {(row["model"], row["method"]): row for row in r["dl_cost"]}
    assert set(cost) == {("resnet18", "camal"), ("resnet18", "vanilla")}
    assert all(row["rc"] == 0 and row["images"] == 20 and 0 < row["epoch_s"] < row["wall_s"] for row in cost.values())
    assert r["dl_grid_gpu_hours"] == {"dl": None, "dl-suppress": None}  # five models were not measured


def test_grid_hours_from_seconds_per_image(tmp_path, monkeypatch):
    """The grid's GPU-hours: every model x dataset x method cell, 10 folds x 500 epochs, at its dataset's image
    count."""
    gpu_check = load(monkeypatch)
    rows = [
        {"model": m, "method": k, "rc": 0, "s_per_image": (1e-3 if k == "camal" else 5e-4)}
        for m in gpu_check.gradcam_overhead.dl.MODELS
        for k in ("camal", "vanilla")
    ]
    images = 7349 + 8189 + 780
    hours = gpu_check.grid_hours(rows)
    assert hours["dl"] == pytest.approx(
        6 * images * 5000 * (2e-3 + 5e-4) / 3600
    )  # camal and prior at CAMAL's cost, vanilla at its own
    assert hours["dl-suppress"] == pytest.approx(6 * images * 5000 * 2e-3 / 3600)
    assert gpu_check.grid_hours(rows[1:])["dl"] is None  # a model's figure missing
    gpu_check.make_pets(tmp_path, 3, (30, 40))
    pet = tmp_path / "oxford-iiit-pet"
    records, classes = load_script("train_dl_camal").pets_records(str(tmp_path))  # the layout the trainer reads
    assert (
        len(records) == 3
        and classes[:3] == ["breed00", "breed01", "breed02"]
        and (pet / "annotations" / "test.txt").is_file()
    )


@pytest.mark.slow
def test_budget_skips_parts_and_keeps_the_json(tmp_path):
    out = tmp_path / "g.json"
    p = subprocess.run(
        [sys.executable, str(SCRIPT), "--out", str(out), "--budget-s", "1e-9"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 0, p.stderr[-2000:]
    assert json.loads(out.read_text())["skipped"] == [
        "ppo env",
        "ppo train",
        "dl step",
        "extraction",
        "dl run",
        "dl cost",
        "dl causes",
    ]


def load(monkeypatch):
    monkeypatch.syspath_prepend(str(SCRIPT.parent))  # as when it runs as a script: its sibling benchmarks import
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    return gpu_check


def test_bad_input(tmp_path, monkeypatch, capsys):
    """In-process through main() (a start costs 4 s of imports); the command line turns the same exit into code 2."""
    gpu_check = load(monkeypatch)
    for args, message in (
        (["--pets-dir", str(tmp_path)], "has no oxford-iiit-pet/images/"),
        (["--budget-s", "0"], "--budget-s must be positive"),
        (["--repeats", "0"], "--repeats must be at least 1"),
        (["--out", str(tmp_path / "missing" / "g.json")], "does not exist"),
    ):
        monkeypatch.setattr(sys, "argv", ["gpu_check.py", *args])
        with pytest.raises(SystemExit) as e:
            gpu_check.main()
        err = capsys.readouterr().err
        assert e.value.code == 2 and message in err and "Traceback" not in err, err
