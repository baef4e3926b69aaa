"""regularizer_study.py on hand-made masks where the answer is known, on a real dataset layout, and end to end."""

import json
import math

import cv2
import numpy as np
import pytest
import scipy.stats
import torch
from test_dl_data import make_pets

from conftest import load_script, run_script

rs = load_script("regularizer_study")


def disk(r=30, size=224, centre=(112, 112)):
    m = np.zeros((size, size), np.uint8)
    cv2.circle(m, centre, r, 1, -1)
    return m.astype(bool)


def test_camal_rises_with_every_perturbation_and_suppress_only_is_flat_under_erosion():
    mask = disk()
    maps = rs.perturb(mask, levels=8, shift_max=1.0, dilate_max=1.0, angle=0.3)
    for kind in rs.PERTURBATIONS:
        resp = rs.responses(mask, maps[kind])
        assert np.all(np.diff(resp["camal"]) > 0), kind  # CAMAL: strictly rising with severity
        assert rs.correlations(resp["camal"])["spearman"] == pytest.approx(1.0)
    erode = rs.responses(mask, maps["erode"])
    assert np.all(erode["suppress"] == 0)  # H stays inside M: nothing outside to suppress
    assert rs.correlations(erode["suppress"]) == {"spearman": None, "pearson": None}
    dilate = rs.responses(mask, maps["dilate"])
    assert np.all(np.diff(dilate["suppress"]) > 0)
    # under dilation alpha stays 1, so both regularisers move together: equal correlations
    assert rs.correlations(dilate["camal"]) == pytest.approx(rs.correlations(dilate["suppress"]), abs=1e-12)


def test_shift_responses_match_hand_computation():
    mask = np.zeros((100, 100), bool)
    mask[40:60, 20:40] = True  # a 20 x 20 square; shifted right by d it keeps (20 - d) x 20 inside
    maps = rs.perturb(mask, levels=4, shift_max=1.0, dilate_max=1.0, angle=0.0)
    resp = rs.responses(mask, maps["shift"])
    for i, d in enumerate((5, 10, 15, 20)):  # extent 20 along x; shifts 1/4 .. 4/4 of it
        alpha, beta = (20 - d) / 20, d * 20 / (100 * 100 - 400)
        assert resp["camal"][i] == pytest.approx(beta - alpha) and resp["suppress"][i] == pytest.approx(beta)


def test_morphology_equals_opencv_erode_and_dilate_with_a_disk():
    mask = np.zeros((224, 224), np.uint8)
    cv2.fillPoly(mask, [np.array([(60, 40), (170, 70), (150, 180), (50, 160)], np.int32)], 1)
    levels = 5
    maps = rs.perturb(mask.astype(bool), levels, shift_max=1.0, dilate_max=0.5, angle=0.0)
    inside = cv2.distanceTransform(mask, cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
    for i in range(levels):
        r_erode = (i + 1) / (levels + 1) * float(inside.max())
        r_dilate = (i + 1) / levels * 0.5 * math.sqrt(mask.sum() / math.pi)
        for kind, r, op in (("erode", r_erode, cv2.erode), ("dilate", r_dilate, cv2.dilate)):
            k = math.floor(r)
            y, x = np.mgrid[-k : k + 1, -k : k + 1]
            kernel = (x * x + y * y <= r * r).astype(
                np.uint8
            )  # the Euclidean disk of radius r as a structuring element
            assert np.array_equal(maps[kind][i] > 0.5, op(mask, kernel).astype(bool)), (kind, i)  # pixel for pixel
    assert np.all(np.diff([m.sum() for m in maps["erode"]]) < 0) and maps["erode"][-1].sum() > 0  # never empty


def test_summary_cells_and_wilcoxon_against_scipy():
    rng = np.random.default_rng(0)
    per_image = []
    for _ in range(12):
        entry = {}
        for kind in rs.PERTURBATIONS:
            c = {"spearman": float(rng.uniform(0.8, 1)), "pearson": float(rng.uniform(0.8, 1))}
            s = {"spearman": None, "pearson": None} if kind == "erode" else {k: float(rng.uniform(0, 1)) for k in c}
            entry[kind] = {"camal": c, "suppress": s}
        per_image.append(entry)
    table = rs.summarise(per_image, 0.05)
    cam = [e["shift"]["camal"]["spearman"] for e in per_image]
    sup = [e["shift"]["suppress"]["spearman"] for e in per_image]
    cell = table["shift", "spearman"]
    assert cell["wilcoxon_p"] == pytest.approx(scipy.stats.wilcoxon(cam, sup, alternative="greater").pvalue)
    assert cell["camal"]["mean"] == pytest.approx(np.mean(cam)) and cell["camal"]["std"] == pytest.approx(
        np.std(cam, ddof=1)
    )
    erode = table["erode", "pearson"]
    assert erode["suppress"]["responding"] == 0 and erode["suppress"]["flat"] == 12
    cam_e = [e["erode"]["camal"]["pearson"] for e in per_image]
    assert erode["wilcoxon_p"] == pytest.approx(scipy.stats.wilcoxon(cam_e, np.zeros(12), alternative="greater").pvalue)
    text = rs.table_markdown("pets", table, 12, 0.05)
    erode_row = next(line for line in text.splitlines() if line.startswith("| Erode"))
    assert erode_row.split(" | ")[2] == "—" and erode_row.split(" | ")[1].startswith("**")


def test_pets_masks_follow_training_geometry(tmp_path):
    make_pets(tmp_path)
    dl = load_script("train_dl_camal")
    dl_args = dl.Args(dataset="pets", data_dir=str(tmp_path))
    records, _ = dl.dataset_records(dl_args)
    args = rs.Args(dataset="pets", data_dir=str(tmp_path), levels=4)
    assert rs.dataset_records(args)[0] == records
    mask = rs.load_mask(args, records[0])
    assert torch.equal(torch.from_numpy(mask), dl.SegmentationDataset(records, dl_args, train=True)[0][1])
    # the 300 x 400 masks differ between the two geometries; each matches training's
    for how in ("square", "shorter-side"):
        dl_args.resize, args.resize = how, how
        assert torch.equal(
            torch.from_numpy(rs.load_mask(args, records[0])), dl.SegmentationDataset(records, dl_args, train=True)[0][1]
        )
    args.resize = "square"
    per_image, left_out, _, _ = rs.study(args, records)
    assert len(per_image) == 6 and not left_out


@pytest.mark.slow
def test_end_to_end_on_shapes(tmp_path):
    proc = run_script(
        "regularizer_study", ["--max-images", "12", "--levels", "6", "--out", "out"], cwd=tmp_path, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "the paper's Table 4" in proc.stdout
    erode_row = next(line for line in proc.stdout.splitlines() if line.startswith("| Erode"))
    assert erode_row.split(" | ")[2] == "—"  # suppress-only does not respond to erosion
    result = json.loads((tmp_path / "out" / "study.json").read_text())
    assert result["masks"] == 12 and len(result["per_image"]) == 12
    assert all(e["erode"]["camal"]["spearman"] == pytest.approx(1.0) for e in result["per_image"])
    assert result["table"]["erode/spearman"]["verdict"] == "significant"
    assert len(result["mean_response"]["shift"]["camal"]) == 6
    assert (tmp_path / "out" / "figure9.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_busi_normal_masks_are_left_out_and_bad_input(tmp_path):
    from PIL import Image

    normal = tmp_path / "Dataset_BUSI_with_GT" / "normal"
    for name in ("benign", "malignant", "normal"):
        (tmp_path / "Dataset_BUSI_with_GT" / name).mkdir(parents=True)
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(normal / "normal (1).png")
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(normal / "normal (1)_mask.png")
    proc = run_script(
        "regularizer_study", ["--dataset", "busi", "--data-dir", str(tmp_path)], cwd=tmp_path, timeout=120
    )
    assert proc.returncode == 2 and "every mask of busi is empty" in proc.stderr and "Traceback" not in proc.stderr
    for args, message in (
        (rs.Args(levels=2), r"--levels must lie in \[3, 200\]"),
        (rs.Args(levels=201), r"--levels must lie in \[3, 200\]"),
        (rs.Args(shift_max=0.0), r"--shift-max must be a number in \(0, 100\]"),
        (rs.Args(shift_max=float("nan")), r"--shift-max must be a number in \(0, 100\].*got nan"),
        (rs.Args(dilate_max=float("nan")), r"--dilate-max must be a number"),
        (rs.Args(dilate_max=float("inf")), r"--dilate-max must be a number.*got inf"),
        (rs.Args(max_images=0), "--max-images must be at least 1"),
    ):
        with pytest.raises(ValueError, match=message):
            rs.check_args(args)
    with pytest.raises(ValueError, match="needs --data-dir"):
        rs.dataset_records(rs.Args(dataset="pets"))


def test_figure9_regions_follow_the_gradient():
    """Green where the regulariser encourages attention, red where it suppresses attention that is there."""
    mask = np.zeros((20, 20), bool)
    mask[5:12, 5:12] = True
    h = np.zeros((20, 20))
    h[8:15, 8:15] = 1.0  # shifted: part on M, part spurious
    green, red = np.array([0.25, 0.7, 0.25]), np.array([0.85, 0.2, 0.2])
    for reg, encouraged in (("camal", mask), ("suppress", np.zeros_like(mask))):
        img = rs.regions(mask, h, reg)
        assert np.array_equal((img == green).all(-1), encouraged)  # CAMAL: all of M; suppress-only: nowhere
        assert np.array_equal((img == red).all(-1), (h > 0) & ~mask)  # both: the spurious attention
