"""train_dl_camal.py end to end on the built-in shapes data, its outputs, resume, and bad input."""

import json

import pytest
import torch

from conftest import read_events, run_script

TINY = ["--shapes-classes", "3", "--shapes-per-class", "6", "--folds", "3", "--batch-size", "6", "--epochs", "2"]
SMALL = [
    "--image-size",
    "96",
]  # where the size does not matter (prior needs 224): a 224 run costs about 4 times as much on a CPU


@pytest.mark.slow
@pytest.mark.parametrize("method", ["camal", "suppress", "vanilla"])
def test_shapes_end_to_end(tmp_path, method):
    workers = ["--num-workers", "2"] if method == "vanilla" else []  # one run loads through worker processes
    size = 96 if method == "suppress" else 224  # one run at a smaller --image-size
    proc = run_script(
        "train_dl_camal",
        ["--method", method, "--fold", "1", "--image-size", str(size), "--collapse-patience", "1", *TINY, *workers],
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert run_dir.name.startswith(f"shapes__resnet18__{method}__fold1__1__")

    m = json.loads((run_dir / "metrics.json").read_text())
    assert (m["dataset"], m["model"], m["method"], m["fold"], m["seed"], m["epochs"]) == (
        "shapes",
        "resnet18",
        method,
        1,
        1,
        2,
    )
    assert 0 <= m["test_accuracy"] <= 1 and 0 <= m["test_iou"] <= 1 and m["wall_time"] > 0
    assert set(m["per_class_accuracy"]) == {"circle", "square", "triangle"}
    assert m["train_size"] + m["test_size"] == 18 and m["test_size"] == 6
    assert (
        0 <= m["test_cam_empty_fraction"] <= 1 and 0 <= m["train_cam_empty_fraction"] <= 1 and m["image_size"] == size
    )

    saved = torch.load(run_dir / "model.pt", weights_only=True)
    assert saved["architecture"] == "resnet18" and saved["classes"] == ["circle", "square", "triangle"]
    resize = {224: 256, 96: 110}[size]  # in the paper's 256 / 224 proportion
    assert saved["preprocessing"] == {
        "resize": resize,
        "resize_mode": "square",
        "crop": size,
        "mean": (0.485, 0.456, 0.406),
        "std": (0.229, 0.224, 0.225),
    }
    import torchvision

    net = torchvision.models.resnet18(num_classes=3)
    net.load_state_dict(saved["state_dict"])  # loads into a plain torchvision model

    samples = torch.load(run_dir / "faithfulness_samples.pt", weights_only=True)
    assert samples["images"].dtype == torch.uint8 and samples["images"].shape == (3, 3, size, size)
    assert samples["masks"].dtype == torch.uint8 and samples["masks"].shape == (3, size, size)
    assert sorted(samples["labels"].tolist()) == [0, 1, 2]  # one per class

    acc = read_events(run_dir)
    scalars = set(acc.Tags()["scalars"])
    expected = {
        "train/loss",
        "train/ce",
        "train/regularizer",
        "train/alpha",
        "train/beta",
        "train/accuracy",
        "test/accuracy",
        "test/attention_iou",
        "test/alpha",
        "test/beta",
        "train/cam_empty_fraction",
        "test/cam_empty_fraction",
    }
    assert expected <= scalars, expected - scalars
    assert [e.step for e in acc.Scalars("test/accuracy")] == [1, 2]
    assert "test/image_mask_cam" in acc.Tags()["images"]
    # the collapse warning (patience 1 here) comes exactly when over half an epoch's training CAMs were empty
    empty = [e.value for e in acc.Scalars("train/cam_empty_fraction")]
    assert ("warning: the CAM has been empty" in proc.stderr) == any(v > 0.5 for v in empty), (
        empty,
        proc.stderr[-2000:],
    )
    if method == "vanilla":  # CE alone
        for lo, ce in zip(acc.Scalars("train/loss"), acc.Scalars("train/ce")):
            assert lo.value == pytest.approx(ce.value)
    else:
        for lo, ce, reg in zip(acc.Scalars("train/loss"), acc.Scalars("train/ce"), acc.Scalars("train/regularizer")):
            assert lo.value == pytest.approx(ce.value + reg.value, abs=1e-5)


@pytest.mark.slow
def test_folds_differ_and_fold_all(shapes_runs):
    _, runs, _ = shapes_runs  # camal and vanilla, each trained with --fold all
    runs = [r for r in runs if "__camal__" in r]
    assert [json.loads(open(f"{r}/metrics.json").read())["fold"] for r in runs] == [0, 1, 2]
    picks = [torch.load(f"{r}/faithfulness_samples.pt", weights_only=True)["images"] for r in runs]
    assert not torch.equal(picks[0], picks[1])  # held-out samples differ between folds


@pytest.mark.slow
def test_resume_fold_all_continues_with_the_next_folds(tmp_path):
    proc = run_script(
        "train_dl_camal", ["--fold", "all", *TINY, *SMALL, "--epochs", "1", "--checkpoint-every", "1"], cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    # --fold all's ETA covers the folds still to run: after fold 0's only epoch, folds 1 and 2 are left
    etas = {
        line.split()[1]: line.split("eta=")[1]
        for line in proc.stdout.splitlines()
        if line.startswith("fold ") and "eta=" in line
    }
    assert etas["0"] != "0m 00s" and etas["2"] == "0m 00s", etas
    by_fold = {json.loads((r / "metrics.json").read_text())["fold"]: r for r in (tmp_path / "runs").iterdir()}
    for r in by_fold.values():
        (r / "metrics.json").unlink()
    # as if the run had stopped in fold 1: resuming finishes fold 1, then runs fold 2 in a new folder
    assert torch.load(by_fold[1] / "checkpoint.pt", weights_only=True)["fold"] == 1
    resumed = run_script("train_dl_camal", ["--resume", str(by_fold[1])], cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert (
        "fold 1: results" in resumed.stdout and "fold 2: results" in resumed.stdout and "fold 0:" not in resumed.stdout
    )
    assert (by_fold[1] / "metrics.json").is_file() and not (by_fold[0] / "metrics.json").exists()
    new = [r for r in (tmp_path / "runs").iterdir() if r not in by_fold.values()]
    assert len(new) == 1 and json.loads((new[0] / "metrics.json").read_text())["fold"] == 2


@pytest.mark.slow
def test_prior_method_with_random_clip(tmp_path):
    """--method prior with an untrained open_clip encoder: pseudo-masks computed once, cached, reused."""
    pytest.importorskip("open_clip", reason="requirements-prior.txt")  # .ci/run installs it, so CI runs this
    args = [*TINY, "--epochs", "1", "--method", "prior", "--prior-model", "ViT-B-32", "--prior-weights", "random"]
    first = run_script("train_dl_camal", args, cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "prior: CLIP CAMs 18/18" in first.stdout
    (cache,) = (tmp_path / "prior_cache").iterdir()
    cams = torch.load(cache, weights_only=True)
    assert cams.shape == (18, 7, 7) and cams.dtype == torch.float16  # ViT-B-32: a 7 x 7 grid
    assert 0 <= cams.min() and cams.max() <= 1
    second = run_script("train_dl_camal", args, cwd=tmp_path)
    assert second.returncode == 0 and "from the cache" in second.stdout
    runs = sorted((tmp_path / "runs").iterdir())
    m = json.loads((runs[0] / "metrics.json").read_text())
    assert m["method"] == "prior" and m["test_iou"] is not None  # measured against the true masks

    from conftest import load_script

    dl = load_script("train_dl_camal")
    mask = dl.prior_mask(cams[0], 0.5, 224)
    assert mask.shape == (224, 224) and mask.dtype == torch.bool
    # training items carry the pseudo-mask, not the ground truth
    a = dl.Args(shapes_classes=3, shapes_per_class=6, prior_threshold=0.5)
    records, _ = dl.dataset_records(a)
    with_prior = dl.SegmentationDataset(records, a, train=True, prior_cams=cams)
    truth = dl.SegmentationDataset(records, a, train=True)
    for i in range(3):
        assert torch.equal(with_prior[i][1], dl.prior_mask(cams[i], 0.5, 224))
    assert any(not torch.equal(with_prior[i][1], truth[i][1]) for i in range(3))


@pytest.mark.slow
def test_resume_survives_a_broken_checkpoint_and_refuses_an_unsafe_one(tmp_path, dl):
    """The repair is run for real; the refusals in-process through setup(), which the script turns into exit code 2
    (test_bad_input.py runs that path)."""
    from conftest import write_code_running_file

    def refused(match):
        with pytest.raises(ValueError, match=match):
            dl.setup(dl.Args(resume=str(run_dir)))

    first = run_script("train_dl_camal", [*TINY, *SMALL, "--epochs", "3", "--checkpoint-every", "1"], cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    (run_dir,) = (tmp_path / "runs").iterdir()
    ckpt, prev = run_dir / "checkpoint.pt", run_dir / "checkpoint.prev.pt"
    assert torch.load(prev, weights_only=True)["epoch"] == 2  # the one before is kept
    refused("this run finished")
    (run_dir / "metrics.json").unlink()
    good_prev = prev.read_bytes()
    ckpt.write_bytes(ckpt.read_bytes()[:5000])  # a copy cut short
    resumed = run_script(
        "train_dl_camal", ["--resume", str(run_dir), "--seed", "5", "--num-workers", "0"], cwd=tmp_path
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert (
        "ignored: --seed 5 (the run's: 1)" in resumed.stderr and "num-workers" not in resumed.stderr
    )  # said, not silent
    assert (
        "checkpoint.pt is truncated or corrupt" in resumed.stderr
        and "resuming from the previous checkpoint" in resumed.stderr
    )
    assert "up to 1 iterations or epochs of progress will be redone" in resumed.stderr
    assert "resuming" in resumed.stdout and "epoch 3/3" in resumed.stdout
    # epoch 3 ran twice (its events from the first run were on disk): purged, not doubled
    assert [e.step for e in read_events(run_dir).Scalars("test/accuracy")] == [1, 2, 3]

    (run_dir / "metrics.json").unlink()  # written again by the resumed run
    ckpt.write_bytes(b"not a checkpoint")
    prev.write_bytes(good_prev[:100])
    refused("truncated or corrupt")

    prev.unlink()
    write_code_running_file(ckpt, tmp_path / "ran", args={})
    refused("could run code, so it is refused")
    assert not (tmp_path / "ran").exists()


@pytest.mark.slow
def test_a_resumed_run_is_the_same_experiment(tmp_path):
    """A run stopped with Ctrl-C at an epoch's end and resumed ends bit for bit where the same run uninterrupted ends:
    the held-out figures, the weights and every training curve (the batch order is drawn per epoch, and nothing draws
    from the restored generators that the uninterrupted run did not)."""
    import os
    import signal
    import subprocess
    import sys

    from conftest import ROOT

    args = [*TINY, *SMALL, "--epochs", "4", "--method", "camal", "--fold", "0"]
    runs = {}
    for name in ("whole", "stopped"):
        (tmp_path / name).mkdir()
        if name == "whole":
            assert run_script("train_dl_camal", args, cwd=tmp_path / name).returncode == 0
        else:
            env = dict(os.environ, PYTHONUNBUFFERED="1")
            cmd = [sys.executable, str(ROOT / "train_dl_camal.py"), *args]
            proc = subprocess.Popen(cmd, cwd=tmp_path / name, stdout=subprocess.PIPE, text=True, env=env)
            for line in proc.stdout:
                if line.startswith("fold 0 epoch 1/4"):
                    os.kill(proc.pid, signal.SIGINT)  # seen at the end of epoch 1 or 2
            assert proc.wait(timeout=300) == 128 + signal.SIGINT
            (run,) = (tmp_path / name / "runs").iterdir()
            assert (
                not (run / "metrics.json").exists()
                and torch.load(run / "checkpoint.pt", weights_only=True)["epoch"] < 4
            )
            resumed = run_script("train_dl_camal", ["--resume", str(run)], cwd=tmp_path / name)
            assert resumed.returncode == 0, resumed.stderr[-3000:]
        (runs[name],) = (tmp_path / name / "runs").iterdir()
    metrics = [json.loads((r / "metrics.json").read_text()) for r in runs.values()]
    for key in (
        "test_accuracy",
        "test_iou",
        "test_alpha",
        "test_beta",
        "per_class_accuracy",
        "train_cam_empty_fraction",
    ):
        assert metrics[0][key] == metrics[1][key], key
    weights = [torch.load(r / "model.pt", weights_only=True)["state_dict"] for r in runs.values()]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    curves = [read_events(r) for r in runs.values()]
    for tag in ("train/loss", "train/alpha", "test/attention_iou"):
        assert [(e.step, e.value) for e in curves[0].Scalars(tag)] == [
            (e.step, e.value) for e in curves[1].Scalars(tag)
        ]


@pytest.mark.slow
def test_the_share_of_empty_masks_is_reported(tmp_path):
    """BUSI's normal images have empty masks (a third of this tree): each epoch's line, the curves and metrics.json
    say how many training and held-out images had none after the crop, and the first epoch warns."""
    from test_dl_data import make_busi

    make_busi(tmp_path / "data")
    args = ["--dataset", "busi", "--data-dir", str(tmp_path / "data"), "--no-pretrained", "--epochs", "1"]
    proc = run_script("train_dl_camal", [*args, "--folds", "3", "--fold", "0", "--image-size", "64"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run_dir,) = (tmp_path / "runs").iterdir()
    m = json.loads((run_dir / "metrics.json").read_text())
    assert m["train_mask_empty_fraction"] == pytest.approx(2 / 6) and m["test_mask_empty_fraction"] == pytest.approx(
        1 / 3
    )
    assert "mask_empty=0.33" in proc.stdout and "33% of the training images have an empty mask" in proc.stderr
    assert {"train/mask_empty_fraction", "test/mask_empty_fraction"} <= set(read_events(run_dir).Tags()["scalars"])
