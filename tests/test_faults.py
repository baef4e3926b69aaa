"""Faults, one at a time, as a user meets them: every file a run reads broken in every way (zero bytes, cut short,
random bytes, pickled code, wrong keys or types), a full disk and a read-only folder during the writes, every spelling
of a grid flag, a model.pt from another run, and the analysis's edge cases. Each gives a clear message (exit code 2
where a command runs) and no traceback, and leaves the last good state whole.

A full disk is a small tmpfs where this machine lets the tests mount one (root, as in CI); everywhere the same write is
also failed in-process with ENOSPC at the write call, so the logic is tested on every machine. Most cases run in-process
through the functions the scripts run first; the few real commands are tiny.
"""

import errno
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import scipy.stats
import torch

from conftest import PPO_TINY, ROOT, load_script, run_script


@pytest.fixture(scope="module")
def ef():
    return load_script("eval_faithfulness")


@pytest.fixture(scope="module")
def st():
    return load_script("stats")


@pytest.fixture(scope="module")
def bench():
    return load_script("benchmark")


@pytest.fixture
def small_disk(tmp_path):
    """A 24 MB tmpfs at tmp_path/disk, or a skip that says why not (the same cases run simulated in-process too)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root; the in-process ENOSPC cases cover the same writes")
    made = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(disk)], capture_output=True, text=True
    )
    if made.returncode:
        pytest.skip(f"this machine does not allow mounting a tmpfs ({made.stderr.strip()})")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], capture_output=True)


def no_space(monkeypatch, module):
    """The disk is full from now on, for `module`'s writes: fsync fails with ENOSPC, as a real full disk fails a
    flush."""

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(module.os, "fsync", full)


def ppo_state(ppo, folder):
    """A real checkpoint of a tiny PPO run, written as the script writes it."""
    args = ppo.Args(env="Basic", frame_height=60, frame_width=80, num_envs=2, num_steps=32, total_timesteps=256)
    args.batch_size, args.minibatch_size, args.num_iterations = 64, 16, 4
    agent = ppo.Agent(3, 4, 60, 80)
    ppo.save_checkpoint(str(folder / "checkpoint.pt"), agent, torch.optim.Adam(agent.parameters()), args, 1, 64)
    return folder / "checkpoint.pt"


# ---------------------------------------------------------------------------------------------
# Reading: one reader, every way a file can be broken
# ---------------------------------------------------------------------------------------------
BROKEN = {
    "zero bytes": lambda p: p.write_bytes(b""),
    "cut short": lambda p: p.write_bytes(p.read_bytes()[:3000]),
    "random bytes": lambda p: p.write_bytes(bytes(np.random.default_rng(0).integers(0, 256, 3000, dtype=np.uint8))),
    "text": lambda p: p.write_text("hello"),
}
WORDS = {
    "zero bytes": "is empty",
    "cut short": "truncated or corrupt",
    "random bytes": "not a file torch.save wrote",
    "text": "truncated or corrupt",
}


@pytest.mark.parametrize("case", BROKEN)
def test_a_broken_checkpoint_falls_back_to_the_previous_one(ppo, dl, tmp_path, case, capsys):
    """Both trainers' read_checkpoint (the same tested copy): the previous checkpoint is used, and the warning names the
    broken file."""
    ckpt = ppo_state(ppo, tmp_path)
    shutil.copy(ckpt, tmp_path / "checkpoint.prev.pt")
    BROKEN[case](ckpt)
    for script in (ppo, dl):
        state = script.read_checkpoint(str(ckpt), ppo.PPO_CHECKPOINT_KEYS)
        assert state["iteration"] == 1
        err = capsys.readouterr().err
        assert f"{ckpt}" in err and WORDS[case] in err and "resuming from the previous checkpoint" in err
    BROKEN[case](tmp_path / "checkpoint.prev.pt")  # neither whole: one message naming both
    with pytest.raises(ppo.RunFileError) as e:
        ppo.read_checkpoint(str(ckpt), ppo.PPO_CHECKPOINT_KEYS)
    assert str(ckpt) in str(e.value) and "checkpoint.prev.pt" in str(e.value)


def test_reader_words(ppo, tmp_path):
    """Each failure is called what it is: missing, a folder, empty, cut, random bytes, pickled code, JSON of the wrong
    kind."""
    from conftest import write_code_running_file

    write_code_running_file(tmp_path / "code.pt", tmp_path / "ran")
    (tmp_path / "list.json").write_text("[1, 2]")
    (tmp_path / "cut.json").write_text('{"a": ')
    (tmp_path / "empty.json").write_text("")
    (tmp_path / "bytes.json").write_bytes(b"\xff\xfe\x00garbage")
    cases = [
        (ppo.read_torch, tmp_path / "nope.pt", "No such file"),
        (ppo.read_torch, tmp_path, "Is a directory"),
        (ppo.read_torch, tmp_path / "code.pt", "pickled Python objects"),
        (ppo.read_json, tmp_path / "list.json", "holds a JSON list, where a dict belongs"),
        (ppo.read_json, tmp_path / "cut.json", "not whole JSON"),
        (ppo.read_json, tmp_path / "empty.json", "is empty"),
        (ppo.read_json, tmp_path / "bytes.json", "not whole JSON"),
    ]
    for read, path, words in cases:
        with pytest.raises(ppo.RunFileError, match=words):
            read(str(path))
    assert not (tmp_path / "ran").exists()  # the pickled payload never ran


@pytest.mark.slow
def test_resume_from_the_previous_checkpoint_alone(ppo, dl, tmp_path, capsys):
    """A crash between the two renames leaves checkpoint.prev.pt alone: a whole state, resumed with a warning."""
    run = tmp_path / "run"
    run.mkdir()
    os.replace(ppo_state(ppo, run), run / "checkpoint.prev.pt")
    args, checkpoint = ppo.resume_from(ppo.Args(resume=str(run)))
    assert checkpoint["iteration"] == 1 and args.num_envs == 2
    assert "is missing; resuming from the previous checkpoint" in capsys.readouterr().err
    # train_dl_camal.py the same way, with its own checkpoint of a tiny model
    dl_args = dl.Args(
        shapes_classes=2,
        shapes_per_class=4,
        folds=2,
        epochs=2,
        learning_rate=1e-3,
        batch_size=4,
        image_size=64,
        pretrained=False,
    )
    model = dl.CamModel("resnet18", 2)
    dl_run = tmp_path / "dl_run"
    dl_run.mkdir()
    dl.save_checkpoint(str(dl_run / "checkpoint.pt"), model, torch.optim.AdamW(model.parameters()), dl_args, 0, 1)
    os.replace(dl_run / "checkpoint.pt", dl_run / "checkpoint.prev.pt")
    resumed, checkpoint, _, _ = dl.setup(dl.Args(resume=str(dl_run)))
    assert checkpoint["epoch"] == 1 and resumed.shapes_per_class == 4
    # and the benchmark counts such a cell as resumable, with the run folder to --resume
    cell = load_script("benchmark").Cell(
        "drl", {"env": "Basic", "method": "camal", "cam": "abs", "seed": 1}, [], tmp_path / "b", 10
    )
    (cell.folder / "runs").mkdir(parents=True)
    shutil.copytree(run, cell.folder / "runs" / "r")
    assert cell.resumable() == cell.folder / "runs" / "r" and "--resume" in cell.command()


@pytest.mark.parametrize("case", ["a file", "missing", "no checkpoint"])
def test_resume_refusals_say_what_is_wrong(ppo, tmp_path, case, capsys):
    target = {"a file": tmp_path / "f.txt", "missing": tmp_path / "nope", "no checkpoint": tmp_path}[case]
    (tmp_path / "f.txt").write_text("x")
    with pytest.raises(SystemExit) as e:
        ppo.resume_from(ppo.Args(resume=str(target)))
    words = {
        "a file": "is a file, not a run folder",
        "missing": "does not exist",
        "no checkpoint": "no checkpoint.pt there",
    }[case]
    assert e.value.code == 2 and words in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# Writing: atomic, marker last, a full disk or a read-only folder is a message and the last good state stays whole
# ---------------------------------------------------------------------------------------------
def test_a_failed_write_leaves_the_old_file_and_no_temporary(ppo, tmp_path, monkeypatch):
    path = tmp_path / "eval.json"
    ppo.write_json(str(path), {"good": 1})
    ckpt = ppo_state(ppo, tmp_path)
    before = ckpt.read_bytes()
    no_space(monkeypatch, ppo)
    with pytest.raises(ppo.RunFileError, match=f"cannot write {path}: the disk is full"):
        ppo.write_json(str(path), {"good": 2})
    # a checkpoint: the current one and its predecessor untouched
    with pytest.raises(ppo.RunFileError, match="the disk is full"):
        ppo_state(ppo, tmp_path)
    assert json.loads(path.read_text()) == {"good": 1} and ckpt.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.json", "checkpoint.pt", "eval.json"]  # no .tmp


def test_no_room_for_a_checkpoint_is_said_before_writing(ppo, tmp_path, monkeypatch):
    ckpt = ppo_state(ppo, tmp_path)
    size = ckpt.stat().st_size
    monkeypatch.setattr(ppo.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10 * size, 9 * size, size // 2))
    with pytest.raises(ppo.RunFileError, match="no room for a checkpoint .* it needs about .* MB beside the two kept"):
        ppo_state(ppo, tmp_path)
    assert ckpt.stat().st_size == size and not (tmp_path / "checkpoint.prev.pt").exists()


def test_dl_results_write_the_marker_last(dl, tmp_path, monkeypatch):
    """A run whose model.pt cannot be written has no metrics.json: it is not finished, and --resume or the benchmark
    redo it."""
    calls = []
    real = dl.atomic_write

    def fail_model(path, write, previous=None):
        calls.append(os.path.basename(path))
        if path.endswith("model.pt"):
            raise dl.RunFileError(f"cannot write {path}: the disk is full")
        return real(path, write, previous)

    monkeypatch.setattr(dl, "atomic_write", fail_model)
    args = dl.Args(
        shapes_classes=2, shapes_per_class=4, folds=2, epochs=1, batch_size=4, image_size=64, pretrained=False
    )
    records, classes = dl.dataset_records(args)
    train_set, test_set = dl.fold_sets(args, 0, records, None)
    result = {
        "accuracy": 0.5,
        "iou": 0.1,
        "alpha": 0.2,
        "beta": 0.1,
        "cam_empty_fraction": 0.0,
        "mask_empty_fraction": 0.0,
        "per_class_accuracy": [0.5, 0.5],
    }
    with pytest.raises(dl.RunFileError, match="the disk is full"):
        metrics = dl.fold_metrics(
            args, 0, result, classes, "r", {"train_size": len(train_set), "test_size": len(test_set)}
        )
        dl.save_results(str(tmp_path), metrics, classes, dl.CamModel("resnet18", 2), test_set, args)
    assert calls == ["model.pt"] and not (tmp_path / "metrics.json").exists()


@pytest.mark.slow
def test_a_full_disk_during_a_real_ppo_run(small_disk):
    """The tmpfs fills at the second checkpoint: a message, exit code 2, no traceback, the first checkpoint whole."""
    # fill the disk so that one checkpoint (about 11 MB at 60 x 80) fits and a second does not
    (small_disk / "ballast").write_bytes(b"\0" * 4 * 2**20)
    proc = run_script(
        "ppo_camal_vizdoom",
        [
            "--env",
            "Basic",
            "--num-envs",
            "2",
            "--num-steps",
            "32",
            "--total-timesteps",
            "256",
            "--frame-height",
            "60",
            "--frame-width",
            "80",
        ]
        + ["--checkpoint-every", "1", "--eval-episodes", "1", "--image-every", "0"],
        cwd=small_disk,
        env_extra={"OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "no room for a checkpoint" in proc.stderr and "The last whole checkpoint is in" in proc.stderr
    (run,) = (small_disk / "runs").iterdir()
    assert not list(run.glob("*.tmp")) and not (run / "eval.json").exists()
    assert torch.load(run / "checkpoint.pt", weights_only=True)["iteration"] == 1


@pytest.mark.slow
def test_a_full_disk_at_the_end_of_a_real_dl_run(small_disk):
    """model.pt does not fit: exit code 2 with a message, no metrics.json (the run is not taken for finished), no
    .tmp."""
    (small_disk / "ballast").write_bytes(
        b"\0" * 14 * 2**20
    )  # resnet18's model.pt (about 45 MB) cannot fit in what is left
    tiny = [
        "--shapes-classes",
        "2",
        "--shapes-per-class",
        "4",
        "--folds",
        "2",
        "--batch-size",
        "4",
        "--epochs",
        "1",
        "--image-size",
        "64",
    ]
    proc = run_script("train_dl_camal", tiny, cwd=small_disk, env_extra={"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "cannot write" in proc.stderr and "the disk is full" in proc.stderr
    (run,) = (small_disk / "runs").iterdir()
    assert not (run / "metrics.json").exists() and not list(run.glob("*.tmp"))


@pytest.mark.slow
def test_read_only_folders(ppo, st, small_disk, tmp_path):
    """A read-only file system: the run folder, stats.py's --out and a JSON write are refused with the reason."""
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    with pytest.raises(ppo.RunFileError, match="the file system is read-only"):
        ppo.make_folder(str(small_disk / "runs" / "x"))
    with pytest.raises(ppo.RunFileError, match="the file system is read-only"):
        ppo.write_json(str(small_disk / "a.json"), {})
    assert ppo.unwritable(str(small_disk / "out")) == f"{small_disk} is not writable"
    with pytest.raises(st.StatsError, match="is not writable"):
        st.check_args(st.Args(paths=[str(tmp_path)], out=str(small_disk / "out")))


# ---------------------------------------------------------------------------------------------
# Validation at the door
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "flags, words",
    [
        ({"learning_rate": -1.0}, "--learning-rate must be a number above 0"),
        ({"learning_rate": float("nan")}, "--learning-rate must be a number above 0"),
        ({"seed": -1}, "--seed must lie in 0 .. 2**31 - 1"),
        ({"gamma": 1.5}, "--gamma must be a number at least 0 and at most 1"),
        ({"max_grad_norm": 0.0}, "--max-grad-norm must be a number above 0"),
        ({"target_kl": float("inf")}, "--target-kl must be a number above 0"),
        ({"camal_coef": -0.1}, "--camal-coef must be a number at least 0"),
    ],
)
def test_ppo_numbers_are_checked(ppo, flags, words):
    with pytest.raises(ValueError, match=re.escape(words)):
        ppo.check_args(ppo.Args(env="Basic", frame_height=60, frame_width=80, **flags))


@pytest.mark.parametrize(
    "flags, words",
    [
        ({"seed": -1}, "--seed must lie in 0"),
        ({"split_seed": -1}, "--split-seed must lie in 0"),
        ({"learning_rate": float("nan")}, "--learning-rate must be a number above 0"),
        ({"weight_decay": float("nan")}, "--weight-decay must be a number at least 0"),
        ({"shapes_per_class": 0}, "--shapes-per-class 0 is less than --folds"),
        ({"shapes_per_class": 1, "fold": "4"}, "some held-out folds would lack a class"),
    ],
)
def test_dl_numbers_are_checked(dl, flags, words):
    args = dl.Args(**{"folds": 5, "epochs": 1, "learning_rate": 1e-3, **flags})
    with pytest.raises(ValueError, match=re.escape(words)):
        dl.check_args(args)


@pytest.mark.parametrize("content", [b"", b"garbage", "resnet18 of another model"])
def test_dl_weights_that_are_not_imagenet_weights(dl, tmp_path, content):
    path = tmp_path / "w.pth"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:  # a real state dict, of another architecture
        torch.save(torch.nn.Linear(2, 2).state_dict(), path)
    download = load_script("download")
    with pytest.raises(download.RunFileError, match=str(path)):
        download.imagenet_state_dict("resnet18", str(path))


@pytest.mark.slow
def test_runs_folder_that_cannot_be_made(ppo, dl, tmp_path, monkeypatch):
    """runs/ being a file: both trainers refuse before any work; PPO leaves nothing behind."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").write_text("not a folder")
    proc = run_script("ppo_camal_vizdoom", ["--env", "Basic", *PPO_TINY], cwd=tmp_path)
    assert proc.returncode == 2 and "runs is a file" in proc.stderr and "Traceback" not in proc.stderr
    with pytest.raises(dl.RunFileError, match="runs is a file"):
        dl.setup(dl.Args(shapes_per_class=4, folds=2, epochs=1, batch_size=4, image_size=64))


def test_track_without_a_key_is_a_message(ppo, tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="requirements-cluster.txt")
    for var in ("WANDB_API_KEY", "WANDB_MODE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path))
    with pytest.raises(ValueError, match="--track: Weights and Biases did not start .*wandb login"):
        ppo.start_tracking(ppo.Args(track=True), "r", str(tmp_path))


@pytest.mark.slow
def test_a_run_that_cannot_start_leaves_no_folder(tmp_path):
    """--track without a W&B key, for real: exit code 2, the reason, and no run folder with only args.json in it."""
    pytest.importorskip("wandb", reason="requirements-cluster.txt")
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "ppo_camal_vizdoom.py"), "--env", "Basic", *PPO_TINY, "--track"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(env, HOME=str(tmp_path), WANDB_CONFIG_DIR=str(tmp_path)),
    )
    assert (
        proc.returncode == 2
        and "--track: Weights and Biases did not start" in proc.stderr
        and "Traceback" not in proc.stderr
    )
    assert not (tmp_path / "runs").exists() or not list((tmp_path / "runs").iterdir())


def test_figure_flags_are_checked_before_play(tmp_path):
    from conftest import load_script

    fig = load_script("drl_attention_figure")
    cases = ((str(tmp_path / "nodir" / "x.png"), 4, "does not exist"), (None, 0, "--frames must be at least 1"))
    for out, frames, words in cases:
        with pytest.raises(ValueError, match=words):
            fig.check(fig.Args(runs=("a", "b"), out=out, frames=frames))


# ---------------------------------------------------------------------------------------------
# benchmark.py: every spelling of a grid flag (a refused cell is not retried: test_benchmark_grid.py)
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "flag", [["--seed", "7"], ["--seed=7"], ["--se", "7"], ["--method=suppress"], ["--cam", "abs"], ["--fold=2"]]
)
def test_grid_flags_are_refused_in_every_spelling(bench, flag, capsys):
    with pytest.raises(SystemExit) as e:
        bench.parse(["--preset", "drl", *flag])
    assert e.value.code == 2 and "the grid's own" in capsys.readouterr().err


def test_benchmark_out_that_cannot_be_made(bench, tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(SystemExit) as e:
        bench.parse(["--preset", "drl", "--out", str(tmp_path / "afile" / "sub")])
    assert e.value.code == 2 and "afile is a file" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# eval_faithfulness.py: a model.pt from another run, broken files, outputs checked first, bounded normalised AUCs
# ---------------------------------------------------------------------------------------------
def fake_run(ef, folder, method="vanilla", classes=("a", "b"), model_classes=None, model_method=None):
    """A run folder as train_dl_camal.py writes it, of a tiny untrained resnet18 at 64 x 64."""
    folder.mkdir(parents=True)
    model_classes = list(model_classes or classes)
    net = ef.build_model("resnet18", len(model_classes))[0]
    saved = {
        "state_dict": net.state_dict(),
        "architecture": "resnet18",
        "num_classes": len(model_classes),
        "classes": model_classes,
        "preprocessing": {"resize": 73, "resize_mode": "square", "crop": 64, "mean": ef.MEAN, "std": ef.STD},
    }
    if model_method:
        saved.update(method=model_method, dataset="shapes")
    torch.save(saved, folder / "model.pt")
    samples = {
        "images": torch.zeros(2, 3, 64, 64, dtype=torch.uint8),
        "masks": torch.zeros(2, 64, 64),
        "labels": torch.tensor([0, 1]),
    }
    torch.save(samples, folder / "faithfulness_samples.pt")
    metrics = {
        "dataset": "shapes",
        "model": "resnet18",
        "method": method,
        "fold": 0,
        "seed": 1,
        "per_class_accuracy": {c: 0.5 for c in classes},
    }
    (folder / "metrics.json").write_text(json.dumps(metrics))
    return folder


def test_a_model_from_another_run_is_refused(ef, tmp_path):
    fake_run(ef, tmp_path / "ok")
    assert ef.load_run(str(tmp_path / "ok"))[2]["method"] == "vanilla"
    fake_run(ef, tmp_path / "four", model_classes=("a", "b", "c", "d"))  # a 4-class model in a 2-class run
    with pytest.raises(ef.RunError, match="not this run's model .* classes"):
        ef.load_run(str(tmp_path / "four"))
    fake_run(ef, tmp_path / "camal", model_method="camal")  # a camal model in a vanilla run
    with pytest.raises(ef.RunError, match="not this run's model .*method 'camal' vs 'vanilla'"):
        ef.load_run(str(tmp_path / "camal"))


@pytest.mark.parametrize(
    "name, case", [("model.pt", "zero bytes"), ("faithfulness_samples.pt", "zero bytes"), ("model.pt", "random bytes")]
)
def test_broken_run_files_are_named(ef, tmp_path, name, case):
    run = fake_run(ef, tmp_path / "run")
    BROKEN[case](run / name)
    with pytest.raises(ValueError, match=f"{run / name}.*{WORDS[case]}"):
        ef.load_run(str(run))


@pytest.mark.parametrize(
    "content, words",
    [('{"dataset": "shapes", ', "not whole JSON"), ('{"dataset": "shapes"}', "model, method, fold, seed missing")],
)
def test_broken_metrics_json_is_named(ef, tmp_path, content, words):
    run = fake_run(ef, tmp_path / "run")
    (run / "metrics.json").write_text(content)
    with pytest.raises(ValueError, match=words):
        ef.load_run(str(run))


def test_eval_outputs_are_checked_before_scoring(ef, tmp_path):
    run = str(fake_run(ef, tmp_path / "run"))
    (tmp_path / "afile").write_text("x")
    cases = [
        ({"plot": str(tmp_path / "nodir" / "c.png")}, "does not exist"),
        ({"plot": ""}, "give the PNG's path"),
        ({"figures": str(tmp_path / "afile")}, "afile is a file"),
        ({"seed": -1}, "--seed must lie in 0"),
    ]
    for flags, words in cases:
        with pytest.raises(ef.RunError, match=words):
            ef.check_inputs(ef.Args(runs=[run], **flags))


def test_too_few_samples_print_no_interval(ef, capsys):
    one = {
        "removal_auc": [0.3],
        "insertion_auc": [0.6],
        "removal_auc_normalised": [None],
        "insertion_auc_normalised": [None],
        "start": [0.01],
    }
    ef.print_summary({"camal": {**one, "correct": {("s", 0): True}, "aucs": {("s", 0): (0.3, 0.6)}}})
    out = capsys.readouterr().out
    assert "too few samples (1)" in out and "nan" not in out and "too few samples (0)" in out


# ---------------------------------------------------------------------------------------------
# stats.py: what it compared, and nothing it cannot read taken silently
# ---------------------------------------------------------------------------------------------
def dl_pair(root, folds, camal, vanilla, **extra):
    from test_stats import write_dl

    for fold, (c, v) in enumerate(zip(camal, vanilla)):
        for method, value in (("camal", c), ("vanilla", v)):
            run = write_dl(root, "shapes", "resnet18", method, fold, value, 0.5, folds=folds)
            if extra:
                m = json.loads((run / "metrics.json").read_text())
                m["args"] = {**m.get("args", {}), **extra}
                (run / "metrics.json").write_text(json.dumps(m))


def analyse(st, root, **kw):
    return st.analyse(st.Args(paths=[str(root)], reps=200, **kw))


def test_one_pair_or_equal_pairs_are_too_few_to_test(st, tmp_path):
    dl_pair(tmp_path / "one", 2, [0.5], [0.5])
    stats, tables, _, _ = analyse(st, tmp_path / "one")
    assert stats["dl"]["comparisons"][0]["test_accuracy"]["wilcoxon"]["verdict"] == "too few pairs to test"
    dl_pair(tmp_path / "equal", 2, [0.5, 0.5], [0.5, 0.5])
    stats, _, _, _ = analyse(st, tmp_path / "equal")
    assert stats["dl"]["comparisons"][0]["test_accuracy"]["wilcoxon"]["p"] == 1.0


def test_accuracies_that_tie_are_ties(st):
    """17/20 - 16/20 and 15/20 - 14/20 differ in their last bits; compared as counts they tie (the tie-aware test's R+
    and p)."""
    camal = [17 / 20, 15 / 20, 19 / 20, 12 / 20, 18 / 20, 16 / 20, 14 / 20, 20 / 20, 13 / 20, 11 / 20]
    vanilla = [16 / 20, 14 / 20, 17 / 20, 13 / 20, 15 / 20, 12 / 20, 11 / 20, 16 / 20, 10 / 20, 12 / 20]
    counts = scipy.stats.wilcoxon(
        np.round(np.array(camal) * 20) - np.round(np.array(vanilla) * 20), alternative="greater"
    )
    floats = scipy.stats.wilcoxon(camal, vanilla, alternative="greater")
    assert (floats.statistic, floats.pvalue) != (
        counts.statistic,
        counts.pvalue,
    )  # the float differences rank the ties apart
    w = st.wilcoxon_greater(camal, vanilla, 0.05)
    assert w["r_plus"] == counts.statistic and w["p"] == pytest.approx(counts.pvalue)


def test_settings_that_change_an_experiment_keep_runs_apart(st, tmp_path):
    """amp, resize and others not in a hand-made list: runs that differ in any recorded setting are two experiments."""
    dl_pair(tmp_path / "a", 2, [0.9, 0.8], [0.4, 0.3], amp=False, resize="square")
    dl_pair(tmp_path / "b", 2, [0.7, 0.6], [0.5, 0.5], amp=True, resize="square")
    stats, _, _, _ = analyse(st, tmp_path)
    assert {c["variant"] for c in stats["dl"]["comparisons"]} == {"amp False", "amp True"}
    assert not any("duplicate" in i["reason"] for i in stats["incomplete"])
    # what cannot change a result does not split them: a data folder, workers, tracking
    dl_pair(tmp_path / "c", 2, [0.9, 0.8], [0.4, 0.3], data_dir="/x", num_workers=4)
    dl_pair(tmp_path / "d", 2, [0.9, 0.8], [0.4, 0.3], data_dir="/y", num_workers=0)
    stats, _, _, _ = st.analyse(st.Args(paths=[str(tmp_path / "c"), str(tmp_path / "d")], reps=200))
    assert len(stats["dl"]["comparisons"]) == 1 and any("duplicate" in i["reason"] for i in stats["incomplete"])


def test_odd_values_are_messages_or_handled(st, tmp_path):
    from test_stats import write_dl, write_drl

    run = write_dl(tmp_path / "big", "shapes", "resnet18", "camal", 0, 0.5, 0.5)
    m = json.loads((run / "metrics.json").read_text())
    (run / "metrics.json").write_text(json.dumps(dict(m, fold=10**400)))
    with pytest.raises(st.StatsError, match="fold is .* expected a whole number"):
        analyse(st, tmp_path / "big")
    dl_pair(
        tmp_path / "list", 2, [0.9, 0.8], [0.4, 0.3], epochs=[8]
    )  # a list where a number belongs: one experiment, no traceback
    assert len(analyse(st, tmp_path / "list")[0]["dl"]["comparisons"]) == 1
    drl = write_drl(tmp_path / "args", "Basic", "camal", 1, 1.0, 0.5)
    (drl / "args.json").write_text("[1, 2]")
    with pytest.raises(st.StatsError, match="args.json holds a JSON list"):
        analyse(st, tmp_path / "args")
    # values no trainer writes: an accuracy or an IoU outside [0, 1], a return a mean would overflow (10**400 is a
    # number Python reads, not one a float holds): named, before they print as inf
    dl_pair(tmp_path / "huge", 2, [1e308, 1e308], [1.0, 1.0])
    with pytest.raises(st.StatsError, match=r"test_accuracy is 1e\+308, expected a number in \[0, 1\]"):
        analyse(st, tmp_path / "huge")
    write_drl(tmp_path / "iou", "Basic", "camal", 1, 80.0, 1.7e308)
    with pytest.raises(st.StatsError, match=r"mean_iou is 1.7e\+308, expected a number in \[0, 1\]"):
        analyse(st, tmp_path / "iou")
    result = write_drl(tmp_path / "return", "Basic", "camal", 1, 80.0, 0.5) / "eval.json"
    result.write_text(result.read_text().replace('"mean_return": 80.0', '"mean_return": ' + "9" * 400))
    with pytest.raises(st.StatsError, match="mean_return is 9+, expected a finite number of at most 1e15 in size"):
        analyse(st, tmp_path / "return")
    for bad, words in (
        ({"seed": -1}, "--seed must lie in 0"),
        ({"out": str(run / "metrics.json" / "sub")}, "is a file"),
    ):
        with pytest.raises(st.StatsError, match=words):
            analyse(st, tmp_path / "list", **bad)


def test_faithfulness_without_samples_is_named(st, tmp_path):
    dl_pair(tmp_path, 2, [0.9, 0.8], [0.4, 0.3])
    for m in tmp_path.glob("**/metrics.json"):
        (m.parent / "faithfulness.json").write_text(json.dumps({"k": [0, 1], "samples": []}))
    with pytest.raises(st.StatsError, match="holds no samples"):
        analyse(st, tmp_path)


def test_one_method_only_says_nothing_was_compared(st, tmp_path):
    from test_stats import write_dl

    for fold in range(2):
        write_dl(tmp_path, "shapes", "resnet18", "camal", fold, 0.9, 0.5)
    stats, tables, _, _ = analyse(st, tmp_path)
    assert stats["nothing_compared"] and "camal only" in stats["nothing_compared"][0]
    assert "### Nothing compared" in st.report(stats, tables)


def test_an_unreadable_folder_is_listed(st, tmp_path, monkeypatch):
    """os.walk's listing error is a skipped folder, named, not silence (as root, chmod cannot make a folder unreadable,
    so the listing fails in-process there)."""
    dl_pair(tmp_path / "ok", 2, [0.9, 0.8], [0.4, 0.3])
    hidden = tmp_path / "hidden"
    hidden.mkdir()
    if os.geteuid() == 0:
        real = os.scandir

        def scandir(path="."):
            if os.fspath(path) == str(hidden):
                raise PermissionError(errno.EACCES, "Permission denied", str(hidden))
            return real(path)

        monkeypatch.setattr(st.os, "scandir", scandir)
    else:
        hidden.chmod(0)
    try:
        stats, _, _, _ = analyse(st, tmp_path)
    finally:
        hidden.chmod(0o755)
    assert any(s["run"] == str(hidden) and "cannot be read" in s["reason"] for s in stats["skipped"])


def test_a_long_message_is_kept_whole(ppo):
    """first_line keeps the whole first line of a message, however long (it cut at 160 characters, so an offline
    --prior-pretrained ended "Last error: An err"), and the type's name when there is no message."""
    long = "Last error: " + " ".join(["An error happened while trying to locate the file on the Hub"] * 8)
    assert ppo.first_line(RuntimeError(long + "\nsecond line")) == long
    assert ppo.first_line(ValueError("short\nmore")) == "short" and ppo.first_line(EOFError()) == "EOFError"
