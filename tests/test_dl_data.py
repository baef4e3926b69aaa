"""Loaders on small trees in the real on-disk layouts, the k-fold split, and the shapes data."""
import numpy as np
import pytest
import torch
from PIL import Image
from scipy.io import savemat

from conftest import load_script

dl = load_script("train_dl_camal")


def args_for(dataset, data_dir, **kw):
    return dl.Args(dataset=dataset, data_dir=str(data_dir), **kw)


def make_pets(root, n_per_class=3, breeds=("Abyssinian", "beagle")):
    base = root / "oxford-iiit-pet"
    (base / "images").mkdir(parents=True)
    (base / "annotations" / "trimaps").mkdir(parents=True)
    lines = {"trainval.txt": [], "test.txt": []}
    for c, breed in enumerate(breeds):
        for k in range(n_per_class):
            stem = f"{breed}_{k + 1}"
            Image.fromarray(np.full((300, 400, 3), 40 * c + k, np.uint8)).save(base / "images" / f"{stem}.jpg")
            trimap = np.full((300, 400), 2, np.uint8)  # background
            trimap[100:200, 150:250] = 1  # foreground
            trimap[95:100, 150:250] = 3  # boundary
            Image.fromarray(trimap).save(base / "annotations" / "trimaps" / f"{stem}.png")
            lines["trainval.txt" if k % 2 == 0 else "test.txt"].append(f"{stem} {c + 1} 1 {c + 1}")
    for name, ls in lines.items():
        (base / "annotations" / name).write_text("\n".join(ls) + "\n")


def test_pets(tmp_path):
    make_pets(tmp_path)
    records, classes = dl.dataset_records(args_for("pets", tmp_path))
    assert classes == ["Abyssinian", "beagle"] and len(records) == 6  # official lists pooled
    ds = dl.SegmentationDataset(records, args_for("pets", tmp_path), train=True)
    image, mask, label = ds[0]
    assert image.shape == (3, 224, 224) and image.dtype == torch.uint8 and mask.shape == (224, 224)
    # trimap 1 and 3 are in; geometry: resize 300 -> 256 (x 256/300), centre crop 224
    expected = np.zeros((300, 400), bool)
    expected[95:200, 150:250] = True
    ref = torch.from_numpy(expected)[None].to(torch.uint8)
    ref = dl.TF.center_crop(dl.TF.resize(ref, 256, interpolation=dl.TF.InterpolationMode.NEAREST), 224)[0].bool()
    assert torch.equal(mask, ref) and 0.1 < mask.float().mean() < 0.4


def test_pets_missing_file_is_named(tmp_path):
    make_pets(tmp_path)
    (tmp_path / "oxford-iiit-pet" / "annotations" / "trimaps" / "beagle_2.png").unlink()
    with pytest.raises(FileNotFoundError, match="beagle_2.png"):
        dl.dataset_records(args_for("pets", tmp_path))


def make_flowers(root, n=6):
    base = root / "flowers-102"
    (base / "jpg").mkdir(parents=True)
    (base / "segmim").mkdir()
    for i in range(1, n + 1):
        img = np.random.default_rng(i).integers(0, 255, (240, 320, 3), dtype=np.uint8)
        Image.fromarray(img).save(base / "jpg" / f"image_{i:05d}.jpg")
        seg = np.zeros((240, 320, 3), np.uint8)
        seg[..., 2] = 254  # blue background
        seg[60:180, 80:240] = (200, 180, 40)  # the flower
        Image.fromarray(seg).save(base / "segmim" / f"segmim_{i:05d}.jpg", quality=75)
    savemat(base / "imagelabels.mat", {"labels": np.array([[1, 2, 1, 2, 1, 2]])})
    savemat(base / "setid.mat", {"trnid": np.array([[1, 2]]), "valid": np.array([[3, 4]]), "tstid": np.array([[5, 6]])})


def test_flowers_jpeg_blue_background(tmp_path):
    make_flowers(tmp_path)
    records, classes = dl.dataset_records(args_for("flowers", tmp_path))
    assert len(records) == 6 and [r[2] for r in records] == [0, 1, 0, 1, 0, 1] and len(classes) == 2
    _, mask, _ = dl.SegmentationDataset(records, args_for("flowers", tmp_path), train=True)[0]
    # 240 x 320 -> 256 x 341, crop 224: the flower box maps to rows 52..180, cols 42..198 or so
    inside, outside = mask[70:160, 60:180], torch.cat([mask[:40].flatten(), mask[200:].flatten()])
    assert inside.float().mean() > 0.99, "JPEG noise inside the flower must not punch holes"
    assert outside.float().mean() < 0.01, "JPEG noise on the blue must not leak into the mask"


def make_busi(root):
    base = root / "Dataset_BUSI_with_GT"
    for name in ("benign", "malignant", "normal"):
        (base / name).mkdir(parents=True)
        for k in (1, 2, 3):
            stem = f"{name} ({k})"
            Image.fromarray(np.full((200, 200), 90, np.uint8)).save(base / name / f"{stem}.png")
            m = np.zeros((200, 200), np.uint8)
            if name != "normal":
                m[20:60, 20:60] = 255
            Image.fromarray(m).save(base / name / f"{stem}_mask.png")
    extra = np.zeros((200, 200), np.uint8)
    extra[120:160, 120:180] = 255
    Image.fromarray(extra).save(base / "benign" / "benign (2)_mask_1.png")


def test_busi_union_and_empty_normal(tmp_path):
    make_busi(tmp_path)
    records, classes = dl.dataset_records(args_for("busi", tmp_path))
    assert classes == ["benign", "malignant", "normal"] and len(records) == 9
    two = next(r for r in records if r[0].endswith("benign (2).png"))
    assert sorted(p.rsplit("/", 1)[1] for p in two[1]) == ["benign (2)_mask.png", "benign (2)_mask_1.png"]
    ds = dl.SegmentationDataset(records, args_for("busi", tmp_path), train=True)
    _, m_one, _ = ds[records.index(next(r for r in records if r[0].endswith("benign (1).png")))]
    _, m_two, _ = ds[records.index(two)]
    assert m_two.sum() > m_one.sum() > 0  # the union holds both lesions
    _, m_normal, y = ds[records.index(next(r for r in records if "normal" in r[0]))]
    assert y == 2 and m_normal.sum() == 0  # normal: empty mask, trains on CE alone


def test_busi_missing_mask_and_corrupt_image(tmp_path):
    make_busi(tmp_path)
    (tmp_path / "Dataset_BUSI_with_GT" / "malignant" / "malignant (3)_mask.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"malignant \(3\)"):
        dl.dataset_records(args_for("busi", tmp_path))
    make_busi(tmp_path / "b")
    bad = tmp_path / "b" / "Dataset_BUSI_with_GT" / "benign" / "benign (1).png"
    bad.write_bytes(b"not a png")
    records, _ = dl.dataset_records(args_for("busi", tmp_path / "b"))
    ds = dl.SegmentationDataset(records, args_for("busi", tmp_path / "b"), train=True)
    with pytest.raises(dl.DataError, match=r"benign \(1\)\.png"):
        ds[[r[0] for r in records].index(str(bad))]


def test_stratified_folds():
    labels = [0] * 23 + [1] * 17 + [2] * 10
    folds = dl.stratified_folds(labels, 10, split_seed=3)
    assert np.array_equal(folds, dl.stratified_folds(labels, 10, split_seed=3))
    assert not np.array_equal(folds, dl.stratified_folds(labels, 10, split_seed=4))
    sizes = np.bincount(folds, minlength=10)
    assert sizes.max() - sizes.min() <= 1
    for c in range(3):  # each class spread evenly over the folds
        per_fold = np.bincount(folds[np.array(labels) == c], minlength=10)
        assert per_fold.max() - per_fold.min() <= 1


@pytest.mark.parametrize("cue", ["background", "corner"])
def test_shapes_cue_planted_in_train_and_shuffled_in_test(cue):
    args = dl.Args(shapes_classes=4, shapes_per_class=10, shapes_cue_prob=1.0, shapes_cue=cue)
    records, classes = dl.dataset_records(args)
    assert classes == ["circle", "square", "triangle", "cross"]
    train = dl.SegmentationDataset(records, args, train=True)
    test = dl.SegmentationDataset(records, args, train=False)
    colours = torch.tensor(dl.CUE_COLOURS, dtype=torch.int16)

    def cue_of(image, mask):
        if cue == "corner":  # a square of the exact colour
            hits = [int((image.to(torch.int16).permute(1, 2, 0) == col).all(-1).sum()) for col in colours]
            return int(np.argmax(hits)) if max(hits) > 100 else None
        # the background, everything outside the mask, is tinted: its mean colour is nearest the cue's
        mean = image.permute(1, 2, 0)[~mask].float().mean(0)
        return int(torch.cdist(mean[None], colours.float())[0].argmin())

    for i in range(8):
        img_tr, mask_tr, y = train[i]
        img_te, mask_te, _ = test[i]
        assert cue_of(img_tr, mask_tr) == y
        assert cue_of(img_te, mask_te) not in (y, None)
        assert torch.equal(mask_tr, mask_te) and mask_tr.any()  # same object, only the cue moves
        assert torch.equal(train[i][0], img_tr)  # deterministic
