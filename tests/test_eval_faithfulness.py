"""eval_faithfulness.py: curves on a model whose answer is known, end to end on shapes runs, bad input."""

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import DL_TINY, load_script, run_script

ef = load_script("eval_faithfulness")


def region_model(region):
    """predict(): the true class's probability rises with the mean brightness inside `region` only."""

    def predict(batch):
        inside = batch[:, :, region].float().mean(dim=(1, 2)) / 255.0
        logits = torch.stack([8 * (inside - 0.5), torch.zeros_like(inside)], dim=1)
        return torch.softmax(logits, dim=1)[:, 0].numpy()

    return predict


def test_true_map_beats_random_and_inverted_map_loses():
    rng = np.random.default_rng(0)
    region = torch.zeros(32, 32, dtype=torch.bool)
    region[4:12, 18:30] = True
    image = torch.from_numpy(rng.integers(150, 256, (3, 32, 32), dtype=np.uint8))
    predict = region_model(region)
    true_map = region.float().numpy() + 0.01 * rng.random((32, 32))  # the region first
    rankings = {
        "true": ef.pixel_ranking(true_map, rng),
        "random": rng.permutation(32 * 32),
        "inverted": ef.pixel_ranking(-true_map, rng),
    }
    aucs = {}
    for name, ranking in rankings.items():
        ks, removal, insertion = ef.faithfulness_curves(predict, image, ranking, steps=20)
        assert len(ks) == len(removal) == len(insertion) == 21
        assert removal[0] == pytest.approx(insertion[-1]) and removal[-1] == pytest.approx(
            insertion[0]
        )  # k = 0 and 100 %
        aucs[name] = (ef.auc(ks, removal), ef.auc(ks, insertion))
    assert aucs["true"][0] < aucs["random"][0] < aucs["inverted"][0]  # removal: lower is better
    assert aucs["true"][1] > aucs["random"][1] > aucs["inverted"][1]  # insertion: higher is better


def test_curve_pixels_and_auc():
    image = torch.full((3, 2, 2), 200, dtype=torch.uint8)
    seen = []

    def predict(batch):
        seen.append(batch.clone())
        return np.zeros(len(batch))

    ef.faithfulness_curves(predict, image, np.array([3, 0, 2, 1]), steps=4)
    batch = seen[0]
    assert batch.shape == (10, 3, 2, 2)  # 5 removal + 5 insertion images in one forward
    assert batch[2, 0].flatten().tolist() == [0, 200, 200, 0]  # removal, k = 50 %: pixels 3 and 0 black
    assert batch[7, 0].flatten().tolist() == [200, 0, 0, 200]  # insertion, k = 50 %: pixels 3 and 0 back
    assert ef.auc([0, 0.5, 1], [1, 1, 0]) == pytest.approx(0.75)
    mean, ci = ef.mean_ci([1.0, 2.0, 3.0])
    assert mean == 2.0 and ci == pytest.approx(1.96 * 1.0 / np.sqrt(3))


def test_ties_are_broken_at_random_not_in_raster_order():
    rng = np.random.default_rng(1)
    ranking = ef.pixel_ranking(np.zeros((16, 16)), rng)
    assert sorted(ranking.tolist()) == list(range(256)) and ranking[:20].tolist() != list(range(20))


@pytest.mark.slow
def test_end_to_end_on_shapes_runs(shapes_runs):
    tmp_path, runs, proc = shapes_runs  # camal and vanilla, 3 folds each, then eval_faithfulness.py over all six
    assert len(runs) == 6
    assert proc.returncode == 0, proc.stderr[-3000:]
    for line in (
        "camal/random",
        "vanilla/random",
        "camal vs vanilla: removal",
        "wrong at k=0",
        "divided by the sample's probability",
        "samples that every method's model classifies correctly",
    ):
        assert line in proc.stdout
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the paper's Figures 3 and 10: the same samples side by side (both methods hold the same images per fold),
    # and the mean and variance maps of the masks and of each method's CAMs
    from PIL import Image

    for name, size in (("attention_samples.png", (3 * 220, 4 * 220)), ("attention_mean_variance.png", (3 * 240, 460))):
        with Image.open(tmp_path / "figs" / name) as im:
            assert im.size == size, (name, im.size)
    for run in runs:
        result = json.loads((Path(run) / "faithfulness.json").read_text())
        assert result["k"] == pytest.approx([0, 0.2, 0.4, 0.6, 0.8, 1.0])
        assert len(result["samples"]) == 3  # one per class
        s = result["samples"][0]["attention"]
        assert len(s["removal"]) == 6 and 0 <= s["removal_auc"] <= 1
        assert s["removal_auc"] == pytest.approx(ef.auc(result["k"], s["removal"]))
        assert result["attention"]["removal_auc"]["mean"] == pytest.approx(
            np.mean([x["attention"]["removal_auc"] for x in result["samples"]])
        )
        assert "random" in result


def test_bad_input(tmp_path):
    (tmp_path / "notarun").mkdir()
    proc = run_script("eval_faithfulness", [str(tmp_path / "notarun")], cwd=tmp_path)
    assert proc.returncode == 2 and "not a run of train_dl_camal.py: no model.pt" in proc.stderr
    assert "Traceback" not in proc.stderr
    # the other checks in-process: the command line turns the same RunError into the message and exit code 2 above
    for args, message in (
        ([], "give one or more run folders"),
        ([str(tmp_path / "notarun")], "--figure-samples must be at least 1"),
    ):
        with pytest.raises(ef.RunError, match=message):
            ef.check_inputs(ef.Args(runs=args, figures="f", figure_samples=0))  # the runs are checked first

    fake = (
        tmp_path / "oldrun"
    )  # a run folder whose model file comes from another version (checked in-process: load_run)
    fake.mkdir()
    torch.save({"weights": {}}, fake / "model.pt")
    torch.save(
        {"images": torch.zeros(1, 3, 224, 224, dtype=torch.uint8), "labels": torch.tensor([0])},
        fake / "faithfulness_samples.pt",
    )
    (fake / "metrics.json").write_text("{}")
    with pytest.raises(ef.RunError, match="not a train_dl_camal.py model file of this version"):
        ef.load_run(str(fake))
    torch.save(
        {
            "state_dict": {"fc.weight": torch.zeros(2, 2)},
            "architecture": "resnet18",
            "num_classes": 3,
            "classes": [],
            "preprocessing": {"resize": 256, "crop": 224, "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)},
        },
        fake / "model.pt",
    )
    with pytest.raises(ef.RunError, match="does not match resnet18"):
        ef.load_run(str(fake))
    torch.save(
        {
            "state_dict": {},
            "architecture": "resnet18",
            "num_classes": 3,
            "classes": [],
            "preprocessing": {"resize": 256, "crop": 192, "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)},
        },
        fake / "model.pt",
    )
    with pytest.raises(ef.RunError, match="trained with other preprocessing"):
        ef.load_run(str(fake))


@pytest.mark.slow
def test_run_files_are_loaded_as_weights_only(tmp_path):
    """A model.pt or samples file from elsewhere that would run code is refused with a clear error, and runs nothing."""
    from conftest import write_code_running_file

    run = tmp_path / "foreign"
    run.mkdir()
    (run / "metrics.json").write_text("{}")
    torch.save({"images": torch.zeros(1, 3, 224, 224, dtype=torch.uint8)}, run / "faithfulness_samples.pt")
    write_code_running_file(run / "model.pt", tmp_path / "ran", architecture="resnet18")
    proc = run_script("eval_faithfulness", [str(run)], cwd=tmp_path)
    assert proc.returncode == 2 and "loading it could run code, so it is refused" in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and not (tmp_path / "ran").exists()
    (run / "model.pt").write_bytes(b"PK\x03\x04 cut short")
    proc = run_script("eval_faithfulness", [str(run)], cwd=tmp_path)
    assert proc.returncode == 2 and "truncated or corrupt" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_random_baseline_does_not_change_the_methods_numbers(shapes_runs):
    """Tie-breaking and the random rankings draw from separate generators."""
    _, runs, _ = shapes_runs
    model, samples, _ = ef.load_run(runs[0])
    out = {}
    for baseline in (None, "random"):
        args = ef.Args(runs=[runs[0]], steps=5, baseline=baseline)
        tie, rand = np.random.default_rng([0, 0]), np.random.default_rng([0, 1])
        _, entries, _ = ef.evaluate_run(model, samples, args, torch.device("cpu"), tie, rand)
        out[baseline] = [(e["attention"]["removal_auc"], e["attention"]["insertion_auc"]) for e in entries]
        assert all(e["start_probability"] == e["attention"]["removal"][0] for e in entries)
        # the curves divided by the intact image's probability (where it is at least the floor), and whether the model
        # was right there
        for e in entries:
            a, ks = e["attention"], np.linspace(0, 1, 6)
            if a["removal"][0] >= ef.NORMALISE_FLOOR:
                assert a["removal_auc_normalised"] == pytest.approx(
                    ef.auc(ks, np.array(a["removal"]) / a["removal"][0])
                )
                assert a["insertion_auc_normalised"] == pytest.approx(
                    ef.auc(ks, np.array(a["insertion"]) / a["removal"][0])
                )
            else:  # a near-zero start would make the ratio explode: left out
                assert a["removal_auc_normalised"] is None and a["insertion_auc_normalised"] is None
            assert isinstance(e["correct"], bool)
        first = entries[0]
        with torch.no_grad():
            logits, _ = model(ef.normalise(samples["images"][:1]))
        assert first["correct"] == (int(logits[0].argmax()) == int(samples["labels"][0]))
    assert out[None] == out["random"]


def test_curve_plot_bands_stay_in_range_and_colours_follow_the_method(tmp_path, monkeypatch):
    import matplotlib.figure

    figures = []
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda fig, *a, **k: figures.append(fig))
    ks = np.linspace(0, 1, 5)

    def group(starts, correct):
        """A method's pooled samples: removal falls from its start, insertion rises to 1."""
        g, entries = ef.new_group(), []
        for p, ok in zip(starts, correct):
            curves = {"removal": [p, p / 2, 0.0, 0.0, 0.0], "insertion": [0.0, 0.5, 1.0, 1.0, 1.0]}
            normalised = {
                f"{c}_auc_normalised": ef.auc(ks, np.array(curves[c]) / p) if p >= 0.5 else None for c in curves
            }
            aucs = {f"{c}_auc": ef.auc(ks, np.array(curves[c])) for c in curves}
            attention = {**curves, **aucs, **normalised}
            entries.append({"attention": attention, "random": attention, "start_probability": p, "correct": ok})
        ef.pool(g, entries, list(range(len(entries))), "attention")
        return g

    both = group([0.0, 1.0, 0.9, 0.6], [False, True, True, True])
    other = group([0.2, 0.9, 0.3, 0.8], [False, True, False, True])
    ef.plot_curves(tmp_path / "a.png", ks, {"vanilla": other, "camal": both, "camal/random": both})
    ef.plot_curves(tmp_path / "b.png", ks, {"camal": both})
    colour = {}
    for fig in figures:
        assert len(fig.axes) == 6  # every sample, the correct ones, normalised; removal and insertion
        for row, ax in enumerate(fig.axes):
            top = 1 / ef.NORMALISE_FLOOR if row >= 4 else 1.0
            for band in ax.collections:  # 95 % bands of a probability (or a ratio below top): never outside
                ys = band.get_paths()[0].vertices[:, 1]
                assert ys.min() >= 0 and ys.max() <= top
            assert len(ax.collections) == sum(
                1 for line in ax.lines if line.get_linestyle() == "-"
            )  # floors have no band
            for line in ax.lines:
                name = line.get_label().split(" (n=")[0].split("/")[0]
                colour.setdefault(name, set()).add(matplotlib.colors.to_hex(line.get_color()))
    assert (
        all(len(c) == 1 for c in colour.values()) and colour["camal"] != colour["vanilla"]
    )  # one colour per method, in every plot
    n = [
        {line.get_label().split(" (n=")[0]: line.get_label()[:-1].split("n=")[1] for line in ax.lines}
        for ax in figures[0].axes[::2]
    ]
    # samples 1 and 3 are correct for both methods; camal has three starts of at least 0.5, vanilla two
    assert n[0] == {"vanilla": "4", "camal": "4", "camal/random": "4"}
    assert n[1] == {"vanilla": "2", "camal": "2", "camal/random": "2"}
    assert n[2] == {"vanilla": "2", "camal": "3", "camal/random": "3"}
    normalised = figures[0].axes[4].lines[1].get_ydata()  # camal's removal over its starts: 1 at k=0
    assert normalised[0] == pytest.approx(1.0)


@pytest.mark.slow
def test_samples_file_is_loaded_as_weights_only(tmp_path, shapes_runs):
    import shutil

    from conftest import write_code_running_file

    _, runs, _ = shapes_runs
    run = tmp_path / "copy"
    shutil.copytree(runs[0], run)
    (run / "faithfulness.json").unlink()  # the shared runs were evaluated already
    write_code_running_file(run / "faithfulness_samples.pt", tmp_path / "ran", images=torch.zeros(1))
    proc = run_script("eval_faithfulness", [str(run)], cwd=tmp_path)
    assert proc.returncode == 2 and "faithfulness_samples.pt holds pickled Python objects" in proc.stderr, proc.stderr[
        -2000:
    ]
    assert not (tmp_path / "ran").exists() and not (run / "faithfulness.json").exists()


@pytest.mark.slow
def test_samples_from_another_fold_are_refused(shapes_runs, tmp_path):
    """A fold's held-out samples copied into another fold's run (where they were training images) are refused, as a
    foreign model.pt is: the samples name their run, fold and seed."""
    import shutil

    _, runs, _ = shapes_runs
    by_fold = {json.loads(open(f"{r}/metrics.json").read())["fold"]: r for r in runs if "__camal__" in r}
    samples = torch.load(f"{by_fold[1]}/faithfulness_samples.pt", weights_only=True)
    assert samples["fold"] == 1 and samples["run_name"] == os.path.basename(by_fold[1])
    run = tmp_path / os.path.basename(by_fold[0])
    shutil.copytree(by_fold[0], run)
    shutil.copy(f"{by_fold[1]}/faithfulness_samples.pt", run / "faithfulness_samples.pt")
    proc = run_script("eval_faithfulness", [str(run), "--steps", "3"], cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "faithfulness_samples.pt is not this run's held-out samples" in proc.stderr
    assert "fold 1 vs 0" in proc.stderr, proc.stderr


@pytest.mark.slow
def test_many_steps_go_through_the_model_in_chunks_and_too_many_are_refused(shapes_runs, tmp_path):
    """--steps 100 (202 images per curve pair) goes through the model 64 at a time, with the numbers of one batch;
    --steps beyond 1000 is refused at once (10**8 steps once asked for a 409 GB allocation)."""
    _, runs, _ = shapes_runs
    model, samples, _ = ef.load_run(runs[0])
    image, label = samples["images"][0], int(samples["labels"][0])
    sizes = []

    def predict(batch):
        sizes.append(len(batch))
        with torch.no_grad():
            logits, _ = model(ef.normalise(batch, torch.float32))
        return torch.softmax(logits, dim=1)[:, label].numpy()

    ranking = np.random.default_rng(0).permutation(image.shape[1] * image.shape[2])
    ks, removal, insertion = ef.faithfulness_curves(predict, image, ranking, 100)
    assert sizes == [64, 64, 64, 10] and len(removal) == len(insertion) == len(ks) == 101
    assert removal[0] == pytest.approx(insertion[-1], abs=1e-5)  # both the intact image
    proc = run_script("eval_faithfulness", [runs[0], "--steps", "100000000"], cwd=tmp_path)
    assert proc.returncode == 2 and "--steps must lie in 1 .. 1000, got 100000000" in proc.stderr, proc.stderr[-2000:]


def test_removal_fills():
    """zero blacks the removed pixels (the paper's); mean gives them the image's mean colour; blur gives them the
    blurred image, which on a flat image is the image itself, so nothing changes however many pixels go."""
    image = torch.zeros(3, 32, 32, dtype=torch.uint8)
    image[0], image[1, :16], image[2] = 200, 100, 30  # top half (200, 100, 30), bottom half (200, 0, 30)
    seen = []

    def predict(batch):
        seen.append(batch.clone())
        return np.zeros(len(batch))

    ranking = np.arange(32 * 32)  # raster order: k = 50 % removes the top half
    for fill in ef.FILLS:
        ef.faithfulness_curves(predict, image, ranking, steps=2, fill=fill)
    zero, mean, blur = (b[1] for b in seen)  # removal at k = 50 %
    assert zero[:, :16].eq(0).all() and zero[:, 16:].equal(image[:, 16:])
    assert mean[:, :16, 0].tolist() == [[200] * 16, [50] * 16, [30] * 16] and mean[:, 16:].equal(image[:, 16:])
    flat = torch.full((3, 32, 32), 77, dtype=torch.uint8)
    assert ef.fill_image(flat, "blur").equal(flat)
    assert not blur[:, :16].equal(image[:, :16]) and blur[0].eq(200).all()  # the edge is smeared, the flat red kept
    for b, fill in zip(seen, ef.FILLS):  # insertion at k = 0 is the fill itself, at 100 % the image
        assert b[3].equal(ef.fill_image(image, fill)) and b[5].equal(image)


@pytest.mark.slow
def test_fill_end_to_end_and_mixed_fills_in_stats(shapes_runs, tmp_path):
    """--fill blur on a real run: recorded in faithfulness.json and printed; other AUCs than zero's on the same samples.
    stats.py refuses to compare runs scored with different fills; a bad --fill is refused at the door."""
    _, runs, _ = shapes_runs
    aucs = {}
    for fill in ("zero", "blur"):
        for run in runs:
            shutil.copytree(run, tmp_path / fill / os.path.basename(run))
        copies = sorted(str(p) for p in (tmp_path / fill).iterdir())
        proc = run_script("eval_faithfulness", [*copies, "--fill", fill, "--steps", "4"], cwd=tmp_path)
        assert proc.returncode == 0 and f"(removed pixels: {fill})" in proc.stdout + proc.stderr, proc.stderr[-2000:]
        faith = [json.loads((Path(c) / "faithfulness.json").read_text()) for c in copies]
        assert all(f["fill"] == fill for f in faith)
        aucs[fill] = [s["attention"]["removal_auc"] for f in faith for s in f["samples"]]
    assert len(aucs["zero"]) == len(aucs["blur"]) and aucs["zero"] != aucs["blur"]
    camal = next(p for p in (tmp_path / "blur").iterdir() if "__camal__" in p.name)
    shutil.copy(tmp_path / "zero" / camal.name / "faithfulness.json", camal / "faithfulness.json")
    proc = run_script("stats", [str(tmp_path / "blur"), "--out", str(tmp_path / "stats")], cwd=tmp_path)
    assert proc.returncode == 2 and "scored with different --fill (" in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    proc = run_script("eval_faithfulness", [runs[0], "--fill", "noise"], cwd=tmp_path)
    assert proc.returncode == 2 and "--fill must be one of zero, mean, blur, got 'noise'" in proc.stderr


@pytest.mark.slow
def test_every_held_out_image_or_a_number_per_class(tmp_path):
    """--faithfulness-per-class 0 keeps every held-out image of the fold for eval_faithfulness.py, which scores all;
    2 keeps two per class (the default, the paper's one, is what every other run here keeps)."""
    tiny = [*DL_TINY, "--shapes-per-class", "9", "--fold", "0"]  # 3 held-out images per class
    counts = {}
    for per_class in ("0", "2"):
        (tmp_path / per_class).mkdir()
        done = run_script("train_dl_camal", [*tiny, "--faithfulness-per-class", per_class], cwd=tmp_path / per_class)
        assert done.returncode == 0, done.stderr[-2000:]
        (run,) = (tmp_path / per_class / "runs").iterdir()
        samples = torch.load(run / "faithfulness_samples.pt", weights_only=True)
        labels = samples["labels"].tolist()
        counts[per_class] = [labels.count(c) for c in range(3)]
        assert samples["per_class"] == int(per_class) and len(samples["images"]) == len(labels)
        scored = run_script("eval_faithfulness", [str(run), "--steps", "4"], cwd=tmp_path)
        assert scored.returncode == 0, scored.stderr[-2000:]
        faith = json.loads((run / "faithfulness.json").read_text())
        assert len(faith["samples"]) == len(labels)
    assert counts == {"0": [3, 3, 3], "2": [2, 2, 2]}
