"""benchmarks/drl_learning.py and benchmarks/sb3_ppo_vizdoom.py: a tiny learning check end to end, and their bad
input; benchmarks/ppo_sps.py's timing of the reference beside our PPO."""

import importlib.util
import json
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT


def load(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def check(args, cwd):
    return subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "drl_learning.py"), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.mark.slow
def test_tiny_learning_check_with_the_reference(tmp_path):
    """Cells through benchmark.py, SB3's PPO on the same frames, stats.py per CAMAL configuration, the table, the steps
    to the threshold, the figure and the verdicts; a rerun finds every run finished and trains nothing again. On
    TakeCover: the users' scenario, with SB3's curve in docs/results.md (Basic's grids are in test_benchmark_grid)."""
    train = "--num-envs 2 --num-steps 32 --eval-episodes 1 --image-every 0 --reward-scale 0.01"
    args = ["--out", "out", "--env", "TakeCover", "--seeds", "1", "--total-timesteps", "1024", "--curve-points", "2"]
    args += ["--threshold", "-1000"]
    args += ["--reference", "--reference-episodes", "2", "--reference-margin", "1e6", "--random-margin=-1e6"]
    args += ["--train-args", train]
    proc = check(args + ["--records", "records"], tmp_path)
    # one seed: no probability of improvement can be significant, so the IoU verdict fails and the exit code says so
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert "PASS: vanilla: evaluation return >= -1000 in every seed" in out
    assert "PASS: CAMAL lambda 1, --cam abs: evaluation return >= -1000 in every seed" in out
    assert "FAIL: CAMAL lambda 1, --cam abs: evaluation IoU above vanilla's (under --cam abs)" in out
    assert "PASS: our vanilla PPO's mean evaluation return" in out
    # a random policy on the same games, per seed, and each method against it (a margin of -1e6: the verdict's wiring)
    assert "PASS: vanilla: above the random policy by -1e+06 in every seed" in out
    assert "PASS: CAMAL lambda 1, --cam abs: above the random policy by -1e+06 in every seed" in out
    rows = [line for line in out.splitlines() if line.startswith("| ")]
    evals = {
        name: json.loads(
            next((tmp_path / "out" / "cells").glob(f"drl__TakeCover__{name}__abs__1__*/runs/*/eval.json")).read_text()
        )
        for name in ("vanilla", "camal")
    }
    assert rows[2].split(" | ")[3] == f"{evals['vanilla']['random_mean_return']:.1f}"  # the random policy's column
    assert [r.split(" | ")[0] for r in rows[1:]] == [
        "| vanilla",
        "| CAMAL lambda 1, --cam abs",
        "| SB3 PPO (reference)",
    ]
    assert "- SB3 PPO (reference): seed 1: 512" in out  # the first bin of the grid already reaches -1000
    folder = tmp_path / "out"
    assert (folder / "drl_learning.png").is_file() and (folder / "stats" / "camal_1_abs" / "stats.json").is_file()
    curves = json.loads((folder / "curves.json").read_text())
    assert curves["steps"] == [512.0, 1024.0] and set(curves["groups"]) == {
        "vanilla (IoU curve: --cam abs)",
        "CAMAL lambda 1, --cam abs",
        "SB3 PPO (reference)",
    }
    ref = json.loads((folder / "reference" / "seed_1" / "reference_eval.json").read_text())
    assert ref["total_timesteps"] == 1024 and len(ref["episodic_returns"]) == 2
    (cell,) = (folder / "cells").glob("drl__TakeCover__camal__abs__1__*")
    (run,) = (cell / "runs").iterdir()
    assert json.loads((run / "args.json").read_text())["reward_scale"] == 0.01  # --train-args reach every run
    assert json.loads((run / "eval.json").read_text())["reward_scale"] == 0.01
    # the records alone (no checkpoints, no events) are enough for stats.py, and carry each run's curves
    records = sorted((tmp_path / "records").glob("drl__*"))
    assert [r.name for r in records] == sorted(c.name for c in (folder / "cells").iterdir())
    (sb3,) = (tmp_path / "records").glob("reference__*")  # SB3's agent and curve, which stats.py passes by
    assert sb3.name == "reference__TakeCover__60x80__1024__seed_1"
    assert json.loads((sb3 / "reference_eval.json").read_text()) == ref
    assert (
        json.loads((sb3 / "curves.json").read_text())["return"] == curves["groups"]["SB3 PPO (reference)"]["return"][0]
    )
    for record in records:
        assert sorted(f.name for f in record.iterdir()) == ["args.json", "curves.json", "environment.json", "eval.json"]
    kept = json.loads((records[0] / "curves.json").read_text())
    assert (
        kept["steps"] == [512.0, 1024.0]
        and kept["return"] == curves["groups"]["CAMAL lambda 1, --cam abs"]["return"][0]
    )
    again = subprocess.run(
        [sys.executable, str(ROOT / "stats.py"), "records", "--out", "records_stats"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert again.returncode == 0, again.stderr[-3000:]
    st = json.loads((tmp_path / "records_stats" / "stats.json").read_text())
    assert st["drl"]["metrics"]["return"]["raw"]["camal"] == [[evals["camal"]["mean_return"]]]
    # the records alone also give this script's whole analysis: the same table, steps, curves and verdicts
    redo = check(args + ["--from-records", "records", "--out", "redo"], tmp_path)
    assert redo.returncode == 1 and "[benchmark]" not in redo.stderr, redo.stderr[-3000:]
    assert [line for line in redo.stdout.splitlines() if line.startswith(("| ", "- ", "PASS", "FAIL"))] == [
        line for line in out.splitlines() if line.startswith(("| ", "- ", "PASS", "FAIL"))
    ]
    assert json.loads((tmp_path / "redo" / "curves.json").read_text()) == curves
    assert not (tmp_path / "redo" / "cells").exists() and (tmp_path / "redo" / "drl_learning.png").is_file()
    # a configuration added later trains alone: the cells kept in --records stand in for their runs, untouched
    before = {f: f.read_bytes() for f in (tmp_path / "records").rglob("*.json")}
    more = check(args + ["--records", "records", "--cams", "abs", "paper", "--out", "more"], tmp_path)
    assert more.returncode == 1 and "2 cells" not in more.stderr, more.stderr[-3000:]
    assert [c.name.split("__1__")[0] for c in (tmp_path / "more" / "cells").iterdir()] == [
        "drl__TakeCover__camal__paper"
    ]
    assert "vanilla: seeds [1] from their records in records" in more.stdout
    assert "CAMAL lambda 1, --cam abs: seeds [1] from their records in records" in more.stdout
    table = [line for line in more.stdout.splitlines() if line.startswith("| ")]
    assert table[:3] + table[4:] == rows and table[3].startswith("| CAMAL lambda 1, --cam paper |")
    assert "SB3 PPO seed" not in more.stdout and not (tmp_path / "more" / "reference" / "seed_1").exists()
    assert {f: f.read_bytes() for f in before} == before  # the kept records are not rewritten
    assert len(list((tmp_path / "records").glob("drl__TakeCover__camal__paper__1__*/curves.json"))) == 1
    shutil.copytree(tmp_path / "records", tmp_path / "damaged")
    (next((tmp_path / "damaged").glob("drl__TakeCover__vanilla__*")) / "curves.json").write_text('{"steps": [512.0, 10')
    for more, messages in (
        (
            ["--seeds", "1", "2"],  # every missing record is named at once
            ["has no record of drl__TakeCover__vanilla__abs__2__", "drl__TakeCover__camal__abs__2__", "1024__seed_2"],
        ),
        (["--curve-points", "4"], ["binned on another step grid"]),
        (["--from-records", "damaged"], ["curves.json cannot be read"]),
    ):
        wrong = check(args + ["--from-records", "records", "--out", "wrong"] + more, tmp_path)
        assert wrong.returncode == 2 and "Traceback" not in wrong.stderr, wrong.stderr
        assert all(m in wrong.stderr for m in messages), wrong.stderr
    again = check(args, tmp_path)
    assert again.returncode == 1 and "2 done, 0 failed" in again.stderr and "SB3 PPO seed" not in again.stdout
    assert [line for line in again.stdout.splitlines() if line.startswith("| ")] == rows
    # runs that stats.py cannot pair (vanilla of another gamma) are a message, not a traceback
    (cell,) = (folder / "cells").glob("drl__TakeCover__vanilla__abs__1__*")
    (run,) = (cell / "runs").iterdir()
    (run / "args.json").write_text(json.dumps(dict(json.loads((run / "args.json").read_text()), gamma=0.5)))
    unpaired = check(args, tmp_path)
    assert unpaired.returncode == 1 and "Traceback" not in unpaired.stderr, unpaired.stderr[-3000:]
    assert (
        "error: stats.py compared no CAMAL lambda 1, --cam abs runs with vanilla's" in unpaired.stderr
        and "has no vanilla run" in unpaired.stderr
    )


@pytest.mark.slow
def test_more_evaluation_episodes_of_saved_agents(ppo_smoke_run, tmp_path):
    """drl_eval.py: each saved run plays --episodes episodes beside a random policy, into an eval.json of the trainer's
    format that stats.py scores; the same call plays the same episodes; a run without a saved model is refused."""
    runs = [next((ppo_smoke_run("Basic", m)[1] / "runs").iterdir()) for m in ("camal", "vanilla")]
    script = [sys.executable, str(ROOT / "benchmarks" / "drl_eval.py")]

    def call(*argv):
        return subprocess.run([*script, *argv], cwd=tmp_path, capture_output=True, text=True, timeout=600)

    for out in ("a", "b"):
        proc = call(*map(str, runs), "--episodes", "3", "--out", out)
        assert proc.returncode == 0, proc.stderr[-3000:]
    for run in runs:
        got = json.loads((tmp_path / "a" / run.name / "eval.json").read_text())
        assert len(got["episodic_returns"]) == len(got["random_returns"]) == 3 and got["method"] in ("camal", "vanilla")
        assert got == json.loads((tmp_path / "b" / run.name / "eval.json").read_text())
        assert json.loads((tmp_path / "a" / run.name / "reevaluation.json").read_text())["run"] == str(run)
        assert (tmp_path / "a" / run.name / "args.json").read_text() == (run / "args.json").read_text()
    st = subprocess.run(
        [sys.executable, str(ROOT / "stats.py"), "a", "--out", "a_stats"], cwd=tmp_path, capture_output=True, text=True
    )
    assert st.returncode == 0, st.stderr[-3000:]
    drl = json.loads((tmp_path / "a_stats" / "stats.json").read_text())["drl"]
    assert sorted(r["method"] for r in drl["runs"]) == ["camal", "vanilla"]
    unsaved = next((ppo_smoke_run("DefendLine", "camal")[1] / "runs").iterdir())
    for argv, message in (
        ((str(unsaved), "--out", "c"), "--save-model"),
        ((str(runs[0]), "--episodes", "0", "--out", "c"), "--episodes must be at least 1"),
        ((str(runs[0]), str(runs[0]), "--out", "c"), "share a folder name"),
    ):
        bad = call(*argv)
        assert bad.returncode == 2 and message in bad.stderr and "Traceback" not in bad.stderr, bad.stderr[-2000:]
    assert not (tmp_path / "c").exists()


@pytest.mark.slow
def test_speed_of_both_ppos_in_one_run(tmp_path):
    """ppo_sps.py --reference times SB3's PPO on the same games after ours, and prints our vanilla's SPS over SB3's per
    round; a rollout length SB3 is not run with is refused."""
    cmd = [sys.executable, str(ROOT / "benchmarks" / "ppo_sps.py"), "--env", "Basic", "--vector", "sync", "--reference"]
    cmd += ["--iterations", "2", "--rounds", "1", "--env-seconds", "0.5", "--num-envs", "2"]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    sync = next(line.split() for line in lines if line.startswith("sync "))
    sb3 = next(line for line in lines if line.startswith("sb3 (in-process games): "))
    ratio = next(line for line in lines if line.startswith("vanilla (sync) / sb3: "))
    sb3_sps = float(sb3.split(": ")[1].split()[0])
    assert sb3_sps > 0 and float(ratio.split()[4]) == pytest.approx(float(sync[2]) / sb3_sps, rel=0.02)
    bad = subprocess.run(cmd + ["--num-steps", "64"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "128-step rollouts" in bad.stderr and "Traceback" not in bad.stderr


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--seeds", "1", "1"], "--seeds must be distinct"),
        (["--camal-coefs", "0"], "--camal-coefs must be positive"),
        (["--train-args", "--camal-coef 3"], "--train-args may not set"),
        (["--train-args=--cam=paper"], "--train-args may not set"),
        (["--cams", "relu"], "invalid choice"),
        (["--threshold", "nan"], "must be numbers"),
        (["--reference-episodes", "0"], "--reference-episodes must be at least 1"),
        (["--from-records", "no_such_folder"], "--from-records no_such_folder is not a folder"),
        (["--from-records", ".", "--records", "r"], "--from-records analyses records already kept"),
    ],
)
def test_learning_check_bad_input(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        load("drl_learning").parse(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize(
    "env, threshold", [("Basic", 50), ("DefendCenter", 10), ("DefendLine", 15), ("TakeCover", 500)]
)
def test_every_scenario_has_a_threshold(env, threshold):
    """Each scenario's default threshold, chosen on its budget seed (docs/results.md); --threshold overrides it."""
    check = load("drl_learning")
    assert check.parse(["--env", env]).threshold == threshold
    assert check.parse(["--env", env, "--threshold", "3"]).threshold == 3


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--total-timesteps", "100"], "less than one rollout"),
        (["--reward-scale", "nan"], "--reward-scale"),
        (["--seed", "-1"], "--seed"),
    ],
)
def test_reference_bad_input(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        load("sb3_ppo_vizdoom").parse(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err
