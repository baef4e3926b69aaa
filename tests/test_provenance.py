"""Every run folder says which code and packages made it (environment.json), and stats.py says when a table mixes
versions."""

import json
import os
import shutil
import subprocess
import sys
from importlib import metadata

import pytest
import torch
from test_stats import args_for, write_dl, write_drl

from conftest import DL_TINY, ROOT, run_script

PACKAGES = ("torch", "torchvision", "vizdoom", "gymnasium", "numpy", "scipy", "rliable")


def installed(name):
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def check_entry(entry, script):
    assert entry["script"] == script
    assert entry["python"] == sys.version.split()[0]
    assert entry["packages"] == {p: installed(p) for p in PACKAGES}
    assert entry["packages"]["torch"] == torch.__version__.split("+")[0] and entry["cuda"] == torch.version.cuda
    assert entry["device"].startswith("CPU")


@pytest.mark.slow
def test_real_runs_record_their_environment(ppo_smoke_run, shapes_runs):
    _, cwd = ppo_smoke_run("Basic", "camal")
    (ppo_run,) = (cwd / "runs").iterdir()
    (entry,) = json.loads((ppo_run / "environment.json").read_text())
    check_entry(entry, "ppo_camal_vizdoom.py")
    _, dl_runs, _ = shapes_runs
    for run in dl_runs:
        (entry,) = json.loads((ROOT / run / "environment.json").read_text())
        check_entry(entry, "train_dl_camal.py")


def git(cwd, *cmd):
    return subprocess.run(["git", "-C", str(cwd), *cmd], capture_output=True, text=True, check=True).stdout.strip()


@pytest.mark.slow
def test_commit_and_changed_code_are_recorded(tmp_path):
    """The script's own checkout: its commit, and whether a tracked file differs from it (run folders do not count)."""
    repo = tmp_path / "code"
    repo.mkdir()
    for script in ("train_dl_camal.py", "download.py"):  # the trainer loads download.py from beside it
        shutil.copy(ROOT / script, repo)
    git(repo, "init", "-q")
    git(repo, "add", "train_dl_camal.py", "download.py")
    git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "code")
    commit = git(repo, "rev-parse", "HEAD")

    def run():
        proc = subprocess.run(
            [sys.executable, str(repo / "train_dl_camal.py"), "--method", "vanilla", "--fold", "0", *DL_TINY],
            cwd=repo,
            capture_output=True,
            text=True,
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
        newest = max((repo / "runs").iterdir(), key=lambda p: p.stat().st_mtime)
        return json.loads((newest / "environment.json").read_text())[-1]["git"]

    assert run() == {"commit": commit, "dirty": False}  # runs/ is untracked: a run does not make its own tree dirty
    with open(repo / "train_dl_camal.py", "a") as f:
        f.write("# a local change\n")
    assert run() == {"commit": commit, "dirty": True}


@pytest.mark.slow
def test_a_resumed_run_appends_and_outside_git_is_null(ppo, tmp_path, capsys):
    """One entry per start or resume; a copy of the script outside any checkout records git as null; a damaged record
    is kept aside with a warning, and the new one says that the run's earlier record was lost."""
    outside = tmp_path / "copy"
    outside.mkdir()
    shutil.copy(ROOT / "ppo_camal_vizdoom.py", outside)
    code = (
        "import sys, torch; sys.argv = ['x']; import importlib.util as u; "
        f"s = u.spec_from_file_location('p', {str(outside / 'ppo_camal_vizdoom.py')!r}); m = u.module_from_spec(s); "
        "s.loader.exec_module(m); "
        f"m.record_environment({str(tmp_path)!r}, torch.device('cpu')); m.record_environment({str(tmp_path)!r}, "
        "torch.device('cpu'))"
    )
    subprocess.run(
        [sys.executable, "-c", code],
        check=True,
        cwd=tmp_path,
        env=dict(os.environ, GIT_CEILING_DIRECTORIES=str(tmp_path)),
    )
    entries = json.loads((tmp_path / "environment.json").read_text())
    assert len(entries) == 2 and all(e["git"] is None for e in entries)
    (tmp_path / "environment.json").write_text("{not json")
    ppo.record_environment(str(tmp_path), torch.device("cpu"))
    (entry,) = json.loads((tmp_path / "environment.json").read_text())
    assert entry["earlier_record_lost"] is True and (tmp_path / "environment.json.damaged").read_text() == "{not json"
    err = capsys.readouterr().err
    assert "is not whole JSON" in err and "which code and packages made this run before now is unknown" in err, err


def with_environment(run, commits=(None,), dirty=False, lost=False, **versions):
    """An environment.json of one entry per commit (a run resumed under other code has two)."""
    packages = {p: installed(p) for p in PACKAGES} | versions
    entries = [
        {"packages": packages, "git": c and {"commit": c, "dirty": dirty}, "device": "CPU", "earlier_record_lost": lost}
        for c in commits
    ]
    (run / "environment.json").write_text(json.dumps(entries))


@pytest.mark.slow
def test_stats_warns_when_a_table_mixes_versions(tmp_path):
    st = __import__("conftest").load_script("stats")
    for fold in range(3):
        with_environment(write_dl(tmp_path, "shapes", "resnet18", "camal", fold, 0.9, 0.6, folds=3), torch="2.14.1")
        with_environment(
            write_dl(tmp_path, "shapes", "resnet18", "vanilla", fold, 0.5, 0.3, folds=3),
            torch="2.13.0" if fold == 0 else "2.14.1",
        )
    # the same versions: no warning for Basic; one run records nothing (older than the record): not compared
    for seed in (1, 2):
        with_environment(write_drl(tmp_path, "Basic", "camal", seed, 80.0, 0.1))
        write_drl(tmp_path, "Basic", "vanilla", seed, 79.0, 0.02)
    (write_drl(tmp_path, "TakeCover", "camal", 1, 500.0, 0.1) / "environment.json").write_text("[{}]")
    stats, tables, _, _ = st.analyse(args_for(st, tmp_path))
    mixed = [w for w in stats["warnings"] if "different" in w["reason"]]
    assert [(w["run"], w["reason"].split(":")[0]) for w in mixed] == [
        ("shapes", "its runs were trained with different torch versions")
    ]
    assert "2.13.0 (1 runs), 2.14.1 (5 runs)" in mixed[0]["reason"]
    assert any("TakeCover" in w["run"] and "environment.json cannot be used" in w["reason"] for w in stats["warnings"])
    assert stats["computed_with"]["scipy"] == installed("scipy")
    proc = run_script("stats", [str(tmp_path), "--reps", "200"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert f"Computed with scipy {installed('scipy')} (the Wilcoxon p-values)" in proc.stdout
    assert "different torch versions" in proc.stdout


def canonical(name):
    return name.lower().replace("_", "-").replace(".", "-")


def test_the_lock_pins_every_requirement_once():
    """requirements-lock.txt (what .ci/run installs) holds every package the requirements files name, each at one exact
    version."""
    pinned = {}
    for line in (ROOT / "requirements-lock.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, sep, version = line.partition("==")
            assert sep and version and canonical(name) not in pinned, line
            pinned[canonical(name)] = version
    named = set()
    for path in ROOT.glob("requirements*.txt"):
        for line in path.read_text().splitlines():
            line = line.split("#")[0].strip()
            if line and not line.startswith("-r") and path.name != "requirements-lock.txt":
                named.add(canonical(line.split("<")[0].split(">")[0].split("=")[0].strip()))
    assert named - set(pinned) == set(), "remake the lock (requirements-lock.txt says how)"
    assert {"torch", "torchvision", "vizdoom", "scipy", "rliable", "ruff"} <= set(pinned)


@pytest.mark.slow
def test_stats_warns_when_a_table_mixes_commits_or_has_no_record_of_its_code(tmp_path):
    """Runs of one table from different commits (one resumed under another commit), from a checkout with uncommitted
    changes, or whose earlier record was damaged: each said once per table; a table from one clean commit: nothing."""
    st = __import__("conftest").load_script("stats")
    a, b = "a" * 40, "b" * 40
    for seed in (1, 2):
        with_environment(write_drl(tmp_path, "Basic", "camal", seed, 80.0, 0.1), commits=(a,))
        with_environment(write_drl(tmp_path, "Basic", "vanilla", seed, 79.0, 0.02), commits=(a,))
        resumed = (a, b) if seed == 1 else (a,)
        with_environment(write_drl(tmp_path, "TakeCover", "camal", seed, 500.0, 0.1), commits=resumed)
        with_environment(write_drl(tmp_path, "TakeCover", "vanilla", seed, 400.0, 0.02), commits=(b,), dirty=seed == 2)
    with_environment(write_drl(tmp_path, "TakeCover", "vanilla", 3, 410.0, 0.03), commits=(b,), lost=True)
    stats, _, _, _ = st.analyse(args_for(st, tmp_path))
    said = [(w["run"], w["reason"]) for w in stats["warnings"] if "commit" in w["reason"] or "record" in w["reason"]]
    assert not [r for run, r in said if run == "Basic"], said
    reasons = [r for run, r in said if run == "TakeCover"]
    assert len(reasons) == 3, said
    assert reasons[0].startswith("its runs come from 2 commits of the code (aaaaaaaa, bbbbbbbb); 1 of them resumed")
    assert "1 of its runs were trained from a checkout with uncommitted changes" in reasons[1]
    assert "1 of its runs were trained from a damaged environment.json" in reasons[2]
