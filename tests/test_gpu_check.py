"""benchmarks/gpu_check.py in its reduced CPU mode: every part runs the project's real code and reports it."""

import importlib.util
import json
import subprocess
import sys

import pytest

from conftest import ROOT

SCRIPT = ROOT / "benchmarks" / "gpu_check.py"


def test_reduced_mode_runs_every_part(tmp_path):
    out = tmp_path / "g.json"
    p = subprocess.run([sys.executable, str(SCRIPT), "--out", str(out), "--reduced"], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert p.stdout.splitlines()[0].startswith("gpu_check: REDUCED MODE")
    r = json.loads(out.read_text())
    assert r["system"]["mode"] == "cpu-reduced" and r["failed"] == [] and r["skipped"] == [] and r["verdict"] is None
    assert [row["num_envs"] for row in r["ppo_env"]] == [2] and all(row["sps"] > 0 for row in r["ppo_env"])
    train = r["ppo_train"]
    assert [(row["num_envs"], row["method"], row["flags"]) for row in train] == [(2, "camal", "--frame-stack-on env")]
    for row in train:
        assert row["rc"] == 0 and row["sps"] > 0
        assert abs(row["env_share"] + row["policy_share"] + row["update_share"] - 1) < 1e-6
        assert 0 < row["env_share"] < 1 and row["policy_share"] > 0 and row["update_seconds"] > 0
    assert {(row["model"], row["precision"]) for row in r["dl_step"]} == {("resnet18", "fp32")}
    (cause,) = r["dl_causes"]  # a profile of both steps; no CUDA graphs on a CPU
    assert cause["model"] == "resnet18" and cause["camal_kernels"] > cause["ce_kernels"] > 0 and cause["camal_kernel_ms"] > 0
    assert "graphed_overhead_pct" not in cause and cause["top_extra_ms"]
    assert [row["batch"] for row in r["extraction"]] == [1, 4]
    assert r["exactness_max_abs_diff"]["resnet18"] < 1e-4
    runs = {row["what"]: row for row in r["dl_run"]}
    assert all(row["rc"] == 0 for row in runs.values()), runs
    assert 0 <= runs["train_dl_camal.py --amp"]["test_accuracy"] <= 1
    assert 0 <= runs["eval_faithfulness.py"]["removal_auc"] <= 1
    assert runs["torchrun --nproc_per_node 1"]["backend"] == "gloo"  # a process group even for one process


def test_budget_skips_parts_and_keeps_the_json(tmp_path):
    out = tmp_path / "g.json"
    p = subprocess.run(
        [sys.executable, str(SCRIPT), "--out", str(out), "--budget-s", "1e-9"], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert p.returncode == 0, p.stderr[-2000:]
    assert json.loads(out.read_text())["skipped"] == ["ppo env", "ppo train", "dl step", "extraction", "dl run", "dl causes"]


def test_bad_input(tmp_path, monkeypatch, capsys):
    """In-process through main() (a start costs 4 s of imports); the command line turns the same exit into code 2."""
    monkeypatch.syspath_prepend(str(SCRIPT.parent))  # as when it runs as a script: its sibling benchmarks import
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    for args, message in (
        (["--budget-s", "0"], "--budget-s must be positive"),
        (["--repeats", "0"], "--repeats must be at least 1"),
        (["--out", str(tmp_path / "missing" / "g.json")], "does not exist"),
    ):
        monkeypatch.setattr(sys, "argv", ["gpu_check.py", *args])
        with pytest.raises(SystemExit) as e:
            gpu_check.main()
        err = capsys.readouterr().err
        assert e.value.code == 2 and message in err and "Traceback" not in err, err
