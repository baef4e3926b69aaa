"""eval_faithfulness.py: curves on a model whose answer is known, end to end on shapes runs, bad input."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import load_script, run_script

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
        assert removal[0] == pytest.approx(insertion[-1]) and removal[-1] == pytest.approx(insertion[0])  # k = 0 and 100 %
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


def test_end_to_end_on_shapes_runs(shapes_runs):
    tmp_path, runs, proc = shapes_runs  # camal and vanilla, 3 folds each, then eval_faithfulness.py over all six
    assert len(runs) == 6
    assert proc.returncode == 0, proc.stderr[-3000:]
    for line in ("camal/random", "vanilla/random", "camal vs vanilla: removal"):
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
            np.mean([x["attention"]["removal_auc"] for x in result["samples"]]))
        assert "random" in result


def test_bad_input(tmp_path):
    (tmp_path / "notarun").mkdir()
    proc = run_script("eval_faithfulness", [str(tmp_path / "notarun")], cwd=tmp_path)
    assert proc.returncode == 2 and "not a run of train_dl_camal.py: no model.pt" in proc.stderr
    proc = run_script("eval_faithfulness", [], cwd=tmp_path)
    assert proc.returncode == 2 and "give one or more run folders" in proc.stderr
    proc = run_script("eval_faithfulness", [str(tmp_path / "notarun"), "--figures", "f", "--figure-samples", "0"], cwd=tmp_path)
    assert proc.returncode == 2 and "--figure-samples must be at least 1" in proc.stderr and "Traceback" not in proc.stderr

    fake = tmp_path / "oldrun"  # a run folder whose model file comes from another version (checked in-process: load_run)
    fake.mkdir()
    torch.save({"weights": {}}, fake / "model.pt")
    torch.save({"images": torch.zeros(1, 3, 224, 224, dtype=torch.uint8), "labels": torch.tensor([0])}, fake / "faithfulness_samples.pt")
    (fake / "metrics.json").write_text("{}")
    with pytest.raises(ef.RunError, match="not a train_dl_camal.py model file of this version"):
        ef.load_run(str(fake))
    torch.save({"state_dict": {"fc.weight": torch.zeros(2, 2)}, "architecture": "resnet18", "num_classes": 3, "classes": [],
                "preprocessing": {"resize": 256, "crop": 224, "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}},
               fake / "model.pt")
    with pytest.raises(ef.RunError, match="does not match resnet18"):
        ef.load_run(str(fake))
    torch.save({"state_dict": {}, "architecture": "resnet18", "num_classes": 3, "classes": [],
                "preprocessing": {"resize": 256, "crop": 192, "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}}, fake / "model.pt")
    with pytest.raises(ef.RunError, match="trained with other preprocessing"):
        ef.load_run(str(fake))
