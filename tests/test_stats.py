"""stats.py on run folders written with known numbers, checked against scipy and rliable called directly."""

import json
import os
import shutil

import numpy as np
import pytest
import scipy.stats

from conftest import ROOT, load_script, read_events, run_script

REPS = 1000  # enough to exercise the bootstrap; the equality checks below do not depend on it


@pytest.fixture(scope="module")
def st():
    return load_script("stats")


def test_faithfulness_wilcoxon_over_paired_runs(st, tmp_path):
    """Each run's mean AUC is one value of the paired test (folds here, and seeds), against scipy called directly:
    H1 CAMAL's removal lower and its insertion higher; the table carries both p."""
    cam = {0: ([0.2, 0.3], [0.7, 0.8]), 1: ([0.25], [0.75]), 2: ([0.3], [0.6]), 3: ([0.5, 0.1], [0.5, 0.2])}
    base = {0: ([0.4, 0.5], [0.5, 0.6]), 1: ([0.45], [0.55]), 2: ([0.35], [0.62]), 3: ([0.45], [0.4])}
    for fold in cam:
        write_dl(tmp_path, "pets", "resnet18", "camal", fold, 0.8, 0.5, faithfulness=cam[fold])
        write_dl(tmp_path, "pets", "resnet18", "vanilla", fold, 0.8, 0.1, faithfulness=base[fold])
    stats, tables, _, _ = st.analyse(args_for(st, tmp_path))
    (res,) = stats["dl"]["faithfulness"]["vanilla"]
    means = {m: [[np.mean(v[f][j]) for f in sorted(v)] for j in (0, 1)] for m, v in (("camal", cam), ("vanilla", base))}
    removal = scipy.stats.wilcoxon(np.subtract(means["vanilla"][0], means["camal"][0]), alternative="greater")
    insertion = scipy.stats.wilcoxon(np.subtract(means["camal"][1], means["vanilla"][1]), alternative="greater")
    assert res["removal_auc"]["wilcoxon"]["p"] == pytest.approx(removal.pvalue)
    assert res["insertion_auc"]["wilcoxon"]["p"] == pytest.approx(insertion.pvalue)
    assert res["removal_auc"]["paired_runs"] == 4 and res["removal_auc"]["camal"]["n"] == 6  # runs, and samples
    (table,) = [t for t in tables if t["name"] == "dl_faithfulness_camal_vs_vanilla"]
    assert table["csv_rows"][0][table["csv_header"].index("removal_wilcoxon_p")] == pytest.approx(removal.pvalue)


def test_faithfulness_pooled_over_comparisons_of_other_fills_is_refused(st, tmp_path):
    """Each comparison scored alike, but Pets with zero and Flowers with blur: their pooled row would mix the fills."""
    for dataset, fill in (("pets", None), ("flowers102", "blur")):
        for fold in (0, 1):
            for method in ("camal", "vanilla"):
                run = write_dl(tmp_path, dataset, "resnet18", method, fold, 0.8, 0.5, faithfulness=([0.3], [0.6]))
                if fill:
                    faith = json.loads((run / "faithfulness.json").read_text())
                    (run / "faithfulness.json").write_text(json.dumps({**faith, "fill": fill}))
    with pytest.raises(st.StatsError) as err:
        st.analyse(args_for(st, tmp_path))
    assert "scored with different --fill (blur in the flowers102 resnet18 comparison, zero in the pets" in str(
        err.value
    ) or "scored with different --fill (zero in the pets resnet18 comparison, blur in the flowers102" in str(err.value)


def test_split_seeds_are_replicates_of_one_experiment(st, tmp_path):
    """Runs on three k-fold splits (the spurious-shapes benchmark's seeds): one comparison, paired per split, fold."""
    for split in (7, 8, 9):
        for fold in (0, 1):
            faith = ([0.2 + 0.01 * split], [0.7])
            write_dl(
                tmp_path,
                "shapes",
                "resnet18",
                "camal",
                fold,
                0.9,
                0.5,
                seed=split,
                split_seed=split,
                faithfulness=faith,
            )
            write_dl(
                tmp_path,
                "shapes",
                "resnet18",
                "vanilla",
                fold,
                0.5,
                0.1,
                seed=split,
                split_seed=split,
                faithfulness=([0.4], [0.5]),
            )
    stats, _, _, _ = st.analyse(args_for(st, tmp_path))
    (comp,) = stats["dl"]["comparisons"]
    assert comp["variant"] == "" and len(comp["pairs"]) == 6
    assert {(p["fold"], p["seed"]) for p in comp["pairs"]} == {(f, s) for f in (0, 1) for s in (7, 8, 9)}
    (res,) = stats["dl"]["faithfulness"]["vanilla"]
    assert res["removal_auc"]["paired_runs"] == 6


def test_a_pair_scored_on_other_samples_is_refused(st, tmp_path):
    """CAMAL's run kept every held-out image for eval_faithfulness.py, vanilla's one per class: their mean AUCs are
    over other images, so the pair is not a pair."""
    for fold in (0, 1):
        write_dl(tmp_path, "pets", "resnet18", "camal", fold, 0.8, 0.5, faithfulness=([0.3], [0.6]), per_class=0)
        write_dl(
            tmp_path,
            "pets",
            "resnet18",
            "vanilla",
            fold,
            0.8,
            0.5,
            faithfulness=([0.3], [0.6]),
            per_class=1 if fold else 0,
        )
    with pytest.raises(st.StatsError) as err:
        st.analyse(args_for(st, tmp_path))
    assert (
        "fold 1 of 5 (split seed 0), seed 1: the camal and vanilla runs' faithfulness samples were drawn "
        in str(err.value)
        and "--faithfulness-per-class 0 in" in str(err.value)
        and "--faithfulness-per-class 1 in" in str(err.value)
    )


def write_dl(root, dataset, model, method, fold, acc, iou, seed=1, folds=5, faithfulness=None, epochs=2, **saved):
    split_seed, per_class = saved.get("split_seed", 0), saved.get("per_class", 1)
    run = root / f"{dataset}__{model}__{method}__fold{fold}__{seed}__{split_seed}"
    run.mkdir(parents=True)
    metrics = {
        "dataset": dataset,
        "model": model,
        "method": method,
        "fold": fold,
        "folds": folds,
        "seed": seed,
        "split_seed": split_seed,
        "test_accuracy": acc,
        "test_iou": iou,
        "epochs": epochs,
        "run_name": run.name,
    }
    (run / "metrics.json").write_text(json.dumps(metrics))
    if faithfulness is not None:  # (removal AUCs, insertion AUCs) per sample, with straight-line curves on 3 points
        k = [0.0, 0.5, 1.0]
        samples = [
            {
                "label": 0,
                "attention": {
                    "removal": [1.0, 2 * r - 1.0, 0.0],
                    "insertion": [0.0, 2 * i - 0.5, 1.0],
                    "removal_auc": r,
                    "insertion_auc": i,
                },
            }
            for r, i in zip(*faithfulness)
        ]
        faith = {"k": k, "samples": samples, "method": method, "per_class": per_class}
        (run / "faithfulness.json").write_text(json.dumps(faith))
    return run


def write_drl(root, env, method, seed, ret, iou, total_timesteps=1000, cam_empty=None, cam=None, by_cam=None):
    run = root / f"{env}__ppo_camal_vizdoom__{method}__{seed}__{cam or 0}"
    run.mkdir(parents=True)
    result = {
        "env": env,
        "method": method,
        "seed": seed,
        "mean_return": ret,
        "mean_iou": iou,
        "total_timesteps": total_timesteps,
        "episodic_returns": [ret] * 4,
    }
    if cam_empty is not None:
        result["cam_empty_fraction"] = cam_empty
    if cam is not None:
        result["cam"] = cam
    if by_cam is not None:
        result["by_cam"] = {k: {"mean_iou": v, "cam_empty_fraction": 0.0} for k, v in by_cam.items()}
    (run / "eval.json").write_text(json.dumps(result))
    return run


def args_for(st, *paths, **kw):
    return st.Args(paths=[str(p) for p in paths], reps=REPS, **kw)


CAMAL_ACC = {"shapes": [0.80, 0.82, 0.85, 0.79, 0.90], "pets": [0.70, 0.60, 0.75, 0.72, 0.66]}
VANILLA_ACC = {"shapes": [0.70, 0.75, 0.80, 0.74, 0.81], "pets": [0.71, 0.58, 0.70, 0.74, 0.65]}


def dl_folder(root):
    for ds in ("shapes", "pets"):
        for fold in range(5):
            write_dl(root, ds, "resnet18", "camal", fold, CAMAL_ACC[ds][fold], 0.5 + 0.01 * fold)
            write_dl(root, ds, "resnet18", "vanilla", fold, VANILLA_ACC[ds][fold], 0.1 + 0.02 * fold)
    for fold in range(4):  # prior misses fold 4
        write_dl(root, "shapes", "resnet18", "prior", fold, 0.9, 0.2)
    return root


def test_dl_tests_match_scipy(st, tmp_path):
    stats, tables, _, _ = st.analyse(args_for(st, dl_folder(tmp_path)))
    comps = {(c["dataset"], c["baseline"]): c for c in stats["dl"]["comparisons"]}
    assert set(comps) == {("shapes", "vanilla"), ("pets", "vanilla"), ("shapes", "prior")}
    for ds in ("shapes", "pets"):
        acc = comps[ds, "vanilla"]["test_accuracy"]
        x, y = CAMAL_ACC[ds], VANILLA_ACC[ds]
        ref = scipy.stats.wilcoxon(x, y, alternative="greater")
        assert acc["wilcoxon"]["p"] == pytest.approx(ref.pvalue) and acc["wilcoxon"]["r_plus"] == ref.statistic
        assert acc["camal"]["mean"] == pytest.approx(np.mean(x)) and acc["camal"]["std"] == pytest.approx(
            np.std(x, ddof=1)
        )
        half = 1.96 * np.std(y, ddof=1) / np.sqrt(5)
        assert acc["vanilla"]["ci95"] == pytest.approx([np.mean(y) - half, np.mean(y) + half])
    # shapes: every fold higher, exact p = 1/32 -> significant; pets: higher mean, p > 0.05
    shapes, pets = (
        comps["shapes", "vanilla"]["test_accuracy"]["wilcoxon"],
        comps["pets", "vanilla"]["test_accuracy"]["wilcoxon"],
    )
    assert shapes["p"] == pytest.approx(1 / 32) and shapes["verdict"] == "significant" and shapes["T"] == 0
    assert pets["p"] > 0.05 and pets["verdict"] == "higher, not significant"
    assert comps["shapes", "prior"]["test_accuracy"]["wilcoxon"]["verdict"] == "not higher"
    assert comps["shapes", "prior"]["test_accuracy"]["camal"]["n"] == 4  # paired folds only
    # the paper's layout: bold when significant, underlined when only higher
    table = next(t for t in tables if t["name"] == "dl_test_accuracy_camal_vs_vanilla")
    assert "Table 2" in table["title"]
    assert table["header"] == [
        "Model",
        "Oxford-IIIT-Pet CAMAL",
        "Oxford-IIIT-Pet Vanilla",
        "Shapes CAMAL",
        "Shapes Vanilla",
    ]
    row = table["rows"][0]
    assert row[3] == f"**{100 * np.mean(CAMAL_ACC['shapes']):.1f} ± {100 * np.std(CAMAL_ACC['shapes'], ddof=1):.1f}**"
    assert row[1].startswith("<u>") and not row[2].startswith(("**", "<u>"))
    # the fold prior lacks is listed, not dropped silently
    assert any(
        "no prior run for fold 4 of 5" in i["reason"] and "camal__fold4" in i["run"] for i in stats["incomplete"]
    )


def test_duplicates_and_missing_baseline_are_listed(st, tmp_path):
    write_dl(tmp_path / "a", "busi", "vit_b_16", "camal", 0, 0.5, 0.4)
    newer = write_dl(tmp_path / "b", "busi", "vit_b_16", "camal", 0, 0.6, 0.5)
    os.utime(newer / "metrics.json", (2e9, 2e9))
    write_dl(tmp_path, "busi", "vit_b_16", "vanilla", 0, 0.5, 0.1)
    write_dl(tmp_path / "c", "busi", "vit_b_16", "vanilla", 0, 0.5, 0.1, epochs=3)  # another experiment: never paired
    write_dl(tmp_path, "busi", "resnet18", "vanilla", 0, 0.5, 0.1)  # no camal run in this group
    stats, _, _, _ = st.analyse(args_for(st, tmp_path))
    (comp,) = stats["dl"]["comparisons"]
    assert comp["test_accuracy"]["camal"]["values"] == [0.6]  # the newer duplicate
    assert comp["variant"] == "epochs 2" and comp["test_accuracy"]["vanilla"]["n"] == 1
    reasons = " ".join(f"{i['run']}: {i['reason']}" for i in stats["incomplete"])
    assert "duplicate" in reasons and str(tmp_path / "a") in reasons
    assert "busi/resnet18: vanilla runs but no camal run" in reasons
    assert "busi/vit_b_16 [epochs 3]: vanilla runs but no camal run" in reasons


def test_iou_from_empty_cams_is_flagged(st, tmp_path):
    for seed, empty in zip((1, 2, 3), (0.9, 0.8, 0.2)):  # vanilla: 63 % empty on average
        write_drl(tmp_path, "Basic", "vanilla", seed, -100.0, 0.0, cam_empty=empty)
        write_drl(tmp_path, "Basic", "camal", seed, -90.0, 0.3, cam_empty=0.5)  # exactly half: not flagged
    run = write_dl(tmp_path, "shapes", "resnet18", "vanilla", 0, 0.5, 0.0)
    metrics = json.loads((run / "metrics.json").read_text())
    (run / "metrics.json").write_text(json.dumps(dict(metrics, test_cam_empty_fraction=1.0)))
    write_dl(tmp_path, "shapes", "resnet18", "camal", 0, 0.8, 0.4)  # written before the fraction existed: no flag
    stats, _, _, _ = st.analyse(args_for(st, tmp_path))
    flagged = {w["run"]: w["reason"] for w in stats["warnings"] if "empty" in w["reason"]}
    assert set(flagged) == {"Basic/vanilla", "shapes/resnet18/vanilla"}
    assert (
        flagged["Basic/vanilla"].startswith("63% of its CAMs were empty") and "over 3 runs" in flagged["Basic/vanilla"]
    )
    assert flagged["shapes/resnet18/vanilla"].startswith("100% of its CAMs")


def test_faithfulness_aucs(st, tmp_path):
    cam = {0: ([0.2, 0.3], [0.7, 0.8]), 1: ([0.25], [0.75])}
    base = {0: ([0.4, 0.5], [0.5, 0.6]), 1: ([0.45], [0.55])}
    for fold in (0, 1, 2):
        write_dl(tmp_path, "pets", "resnet18", "camal", fold, 0.8, 0.5, faithfulness=cam.get(fold))
        write_dl(tmp_path, "pets", "resnet18", "prior", fold, 0.8, 0.1, faithfulness=base.get(fold))
    stats, tables, curves, _ = st.analyse(args_for(st, tmp_path))
    (res,) = stats["dl"]["faithfulness"]["prior"]
    removal_c, removal_p = [0.2, 0.3, 0.25], [0.4, 0.5, 0.45]
    assert res["removal_auc"]["camal"]["mean"] == pytest.approx(np.mean(removal_c))
    assert res["removal_auc"]["relative_change_percent"] == pytest.approx(
        100 * (np.mean(removal_c) / np.mean(removal_p) - 1)
    )
    assert res["insertion_auc"]["prior"]["n"] == 3
    assert res["mean_curves"]["camal"]["removal"] == pytest.approx([1.0, 2 * np.mean(removal_c) - 1.0, 0.0])
    assert any("fold 2 of 5" in i["reason"] and "faithfulness" in i["reason"] for i in stats["incomplete"])
    assert any(t["name"] == "dl_faithfulness_camal_vs_prior" for t in tables)


def drl_folder(root):
    rng = np.random.default_rng(0)
    truth = {}
    for env, scale in (("Basic", 100.0), ("TakeCover", 1000.0)):
        for method, shift in (("camal", 0.3), ("vanilla", 0.0)):
            for seed in (1, 2, 3):
                ret, iou = scale * (rng.random() + shift), 0.1 + shift + 0.1 * rng.random()
                truth[env, method, seed] = (ret, iou)
                write_drl(root, env, method, seed, ret, iou)
    write_drl(
        root, "Basic", "camal", 4, 500.0, 0.2, total_timesteps=500
    )  # one seed more than the other cells, and shorter
    write_drl(root, "DefendLine", "camal", 1, 5.0, 0.2)  # an env without a vanilla run
    return truth


def test_drl_matches_rliable(st, tmp_path):
    from rliable import library as rly
    from rliable import metrics

    truth = drl_folder(tmp_path)
    stats, tables, _, _ = st.analyse(args_for(st, tmp_path, seed=3))
    drl = stats["drl"]
    assert drl["envs"] == ["Basic", "TakeCover"] and drl["methods"] == ["camal", "vanilla"]
    raw = {m: np.array([[truth[e, m, s][0] for e in drl["envs"]] for s in (1, 2, 3)]) for m in ("camal", "vanilla")}
    lo, hi = (
        np.minimum(raw["camal"].min(0), raw["vanilla"].min(0)),
        np.maximum(raw["camal"].max(0), raw["vanilla"].max(0)),
    )
    # Basic's extra seed 4 (return 500) is left out of the matrices, so it sets no range either: lo and hi are the
    # matrix's own
    norm = {m: (raw[m] - lo) / (hi - lo) for m in raw}
    res = drl["metrics"]["return"]
    assert np.array(res["normalised"]["camal"]) == pytest.approx(norm["camal"])
    for m in ("camal", "vanilla"):
        np.random.seed(3)
        point, interval = rly.get_interval_estimates(
            {m: norm[m]}, lambda s: np.array([metrics.aggregate_mean(s)]), reps=REPS
        )
        assert res["sbci_mean"][m]["mean"] == pytest.approx(point[m][0])
        assert res["sbci_mean"][m]["ci95"] == pytest.approx(np.ravel(interval[m]).tolist())
    np.random.seed(3)  # rliable's own probability_of_improvement, to the same resamples
    point, interval = rly.get_interval_estimates(
        {"x": (norm["camal"], norm["vanilla"])}, metrics.probability_of_improvement, reps=REPS
    )
    poi = res["poi"]["vanilla"]
    assert poi["p"] == pytest.approx(point["x"]) and poi["ci95"] == pytest.approx(np.ravel(interval["x"]).tolist())
    assert poi["significant"] == (point["x"] > 0.5 and np.ravel(interval["x"])[0] > 0.5)
    # IoU is not normalised; every camal IoU beats every vanilla one, so P = 1 (Eq. 6)
    iou = drl["metrics"]["iou"]
    assert np.array(iou["raw"]["vanilla"]) == pytest.approx(
        np.array([[truth[e, "vanilla", s][1] for e in drl["envs"]] for s in (1, 2, 3)])
    )
    assert iou["poi"]["vanilla"]["p"] == 1.0
    reasons = " ".join(i["reason"] for i in stats["incomplete"])
    assert "seed 4 is left out" in reasons and "DefendLine has no vanilla run" in reasons
    assert stats["warnings"] == []  # the shorter run is the left-out seed 4: no run in the matrix differs in length
    sbci = next(t for t in tables if t["name"] == "drl_return_sbci")
    assert any("min-max normalised" in n and "TakeCover [" in n for n in sbci["notes"])


def test_vanilla_is_the_baseline_of_each_cam(st, tmp_path):
    """benchmark.py's DRL grid runs vanilla once; its eval.json's by_cam gives its IoU under each CAMAL formulation."""
    for seed in (1, 2, 3):
        write_drl(tmp_path, "Basic", "camal", seed, 80.0, 0.30 + 0.01 * seed, cam="paper")
        write_drl(tmp_path, "Basic", "camal", seed, 81.0, 0.50 + 0.01 * seed, cam="abs")
        write_drl(
            tmp_path,
            "Basic",
            "vanilla",
            seed,
            79.0,
            0.05,
            cam="paper",
            by_cam={"paper": 0.05, "abs": 0.60, "abs-target": 0.2},
        )
    write_drl(tmp_path, "TakeCover", "camal", 1, 5.0, 0.2, cam="abs")
    write_drl(
        tmp_path, "TakeCover", "vanilla", 1, 4.0, 0.1, cam="paper"
    )  # an older eval.json: no by_cam, so no abs baseline
    stats, _, _, _ = st.analyse(args_for(st, tmp_path))
    drl = stats["drl"]
    iou = drl["metrics"]["iou"]
    assert drl["envs"] == ["Basic [cam abs]", "Basic [cam paper]"]
    assert iou["raw"]["vanilla"] == [[0.60, 0.05]] * 3  # the same three runs, scored under each CAM
    assert iou["poi"]["vanilla"]["p"] == 0.5  # paper: camal above vanilla in every seed; abs: below in every seed
    assert (
        sorted(r["task"] for r in drl["runs"] if r["method"] == "vanilla")
        == ["Basic [cam abs]"] * 3 + ["Basic [cam paper]"] * 3
    )
    reasons = {i["run"]: i["reason"] for i in stats["incomplete"]}
    assert any(
        "TakeCover" in k and "has no vanilla run" in v for k, v in reasons.items()
    )  # not compared under another CAM
    assert any("TakeCover" in k and "has no camal run" in v for k, v in reasons.items())
    # vanilla runs made before a setting existed (no reward_scale in their args.json) are the baseline of newer CAMAL
    # runs; a vanilla run of another gamma is not, and neither is a setting that cannot change the result
    # (frame_stack_on)
    newer = tmp_path / "newer"
    for seed in (1, 2):
        camal = write_drl(newer, "Basic", "camal", seed, 80.0, 0.4, cam="abs-target")
        (camal / "args.json").write_text(json.dumps({"gamma": 0.99, "reward_scale": 1.0, "frame_stack_on": "device"}))
        older = write_drl(
            newer, "Basic", "vanilla", seed, 79.0, 0.05, cam="abs", by_cam={"abs": 0.05, "abs-target": 0.1}
        )
        (older / "args.json").write_text(json.dumps({"gamma": 0.99, "frame_stack_on": "env"}))
        other = write_drl(
            newer / "other", "Basic", "vanilla", seed, 79.0, 0.05, cam="abs", by_cam={"abs": 0.05, "abs-target": 0.1}
        )
        (other / "args.json").write_text(json.dumps({"gamma": 0.9}))
    stats, _, _, _ = st.analyse(args_for(st, newer))
    assert (
        stats["drl"]["envs"] == ["Basic [cam abs-target, gamma 0.99]"]
        and stats["drl"]["metrics"]["iou"]["raw"]["vanilla"] == [[0.1]] * 2
    )
    reasons = [i["reason"] for i in stats["incomplete"]]
    assert sum("has no camal run" in r for r in reasons) == 2  # the gamma 0.9 runs
    # by_cam of the wrong shape is named, never a traceback
    bad = write_drl(tmp_path / "bad", "Basic", "vanilla", 1, 1.0, 0.1, cam="paper")
    e = json.loads((bad / "eval.json").read_text())
    (bad / "eval.json").write_text(json.dumps(dict(e, by_cam={"abs": {"mean_iou": "high"}})))
    with pytest.raises(st.StatsError, match="by_cam abs"):
        st.analyse(args_for(st, tmp_path / "bad"))


def test_probability_of_improvement_equals_rliables(st):
    from rliable import metrics

    rng = np.random.default_rng(0)
    for shape_x, shape_y in [((5, 4), (5, 4)), ((3, 2), (6, 2)), ((1, 1), (1, 1))]:
        for _ in range(20):
            x, y = rng.integers(0, 4, shape_x).astype(float), rng.integers(0, 4, shape_y).astype(float)  # many ties
            assert st.probability_of_improvement(x, y) == metrics.probability_of_improvement(x, y)
            x, y = rng.random(shape_x), rng.random(shape_y)
            assert st.probability_of_improvement(x, y) == metrics.probability_of_improvement(x, y)
    x = rng.random((5, 4))
    assert st.probability_of_improvement(x, x.copy()) == 0.5 == metrics.probability_of_improvement(x, x.copy())


def write_tb_run(
    root, env, method, seed, returns, per_step=100, batch_size=None, total_timesteps=None, eval_json=False
):
    """A ppo_camal_vizdoom.py run folder as TensorBoard sees it: the hyperparameters text and one value per
    iteration."""
    from torch.utils.tensorboard import SummaryWriter

    run = root / f"{env}__ppo_camal_vizdoom__{method}__{seed}__0"
    writer = SummaryWriter(str(run))
    hp = {"env": env, "method": method, "seed": seed, "batch_size": batch_size, "total_timesteps": total_timesteps}
    writer.add_text(
        "hyperparameters", "|param|value|\n|-|-|\n" + "\n".join(f"|{k}|{v}|" for k, v in hp.items() if v is not None)
    )
    for i, v in enumerate(returns):
        writer.add_scalar("charts/episodic_return", v, per_step * (i + 1))
        writer.add_scalar("charts/attention_iou", v / 100, per_step * (i + 1))
        writer.add_scalar("charts/SPS", 100.0, per_step * (i + 1))
    writer.close()
    if eval_json:
        (run / "eval.json").write_text(
            json.dumps({"env": env, "method": method, "seed": seed, "mean_return": -1.0, "mean_iou": 0.0})
        )
    return run


def test_tensorboard_scores(st, tmp_path):
    returns = [float(v) for v in range(20)]
    write_tb_run(tmp_path, "TakeCover", "vanilla", 7, returns, eval_json=True)
    write_tb_run(tmp_path, "TakeCover", "camal", 7, [30.0] * 20, eval_json=True)
    stats, tables, _, _ = st.analyse(args_for(st, tmp_path, last_n=5, drl_score="training"))
    (fallback,) = [r for r in stats["drl"]["runs"] if r["method"] == "vanilla"]
    assert fallback["return"] == pytest.approx(np.mean(returns[-5:])) and fallback["iou"] == pytest.approx(
        np.mean(returns[-5:]) / 100
    )
    assert "last 5 of 20 charts/episodic_return (to step 2000)" in fallback["source"]
    runs_table = next(t for t in tables if t["name"] == "drl_runs")
    assert all(row[5].startswith("TensorBoard") for row in runs_table["rows"])  # never a mix with eval.json scores
    # learning curves from the same events: the mean of each run's values in each bin of the step grid
    curves = st.learning_curves([dict(r, dir=r["dir"]) for r in stats["drl"]["runs"] if r["method"] == "vanilla"], 4)
    c = curves["return"]["TakeCover"]["vanilla"]
    assert (
        c["steps"] == [500, 1000, 1500, 2000] and c["mean"] == pytest.approx([2.0, 7.0, 12.0, 17.0]) and c["runs"] == 1
    )
    # the default scores from eval.json only: the same folders, other numbers, and the sources say so
    stats, tables, _, _ = st.analyse(args_for(st, tmp_path))
    assert {r["return"] for r in stats["drl"]["runs"]} == {-1.0}
    assert all(row[5].startswith("eval.json") for row in next(t for t in tables if t["name"] == "drl_runs")["rows"])


def test_unfinished_and_unscored_drl_runs_are_left_out(st, tmp_path):
    """What happened, not what was asked: a run short of its planned steps is not scored and does not shape the
    normalisation or the curves; the note gives its steps and the checkpoint a resume would start from."""
    for seed in (1, 2):
        for method, ret in (("camal", 10.0), ("vanilla", 5.0)):
            write_tb_run(
                tmp_path, "Basic", method, seed, [ret] * 10, batch_size=100, total_timesteps=1000, eval_json=True
            )
    short = (
        tmp_path / "short"
    )  # stopped after 3 of 10 iterations, with a checkpoint at iteration 2 and a very high return
    run = write_tb_run(short, "Basic", "vanilla", 3, [99.0] * 3, batch_size=100, total_timesteps=1000)
    (run / "checkpoint.json").write_text(json.dumps({"iteration": 2, "global_step": 200}))
    noeval = write_tb_run(tmp_path / "noeval", "Basic", "camal", 3, [7.0] * 10, batch_size=100, total_timesteps=1000)
    write_tb_run(tmp_path / "noeval", "Basic", "vanilla", 3, [6.0] * 10, batch_size=100, total_timesteps=1000)
    stats, _, _, _ = st.analyse(args_for(st, tmp_path, drl_score="training"))
    reasons = {i["run"]: i["reason"] for i in stats["incomplete"]}
    assert (
        "its curves reach step 300 of 1000, its checkpoint step 200" in reasons[str(run)]
        and "--resume" in reasons[str(run)]
    )
    assert str(run) not in {r["dir"] for r in stats["drl"]["runs"]}
    assert stats["drl"]["metrics"]["return"]["normalisation"] == {
        "Basic": [5.0, 10.0]
    }  # not 99 from the unfinished run
    assert str(noeval) in {r["dir"] for r in stats["drl"]["runs"]}  # finished: --drl-score training scores it
    # --include-unfinished: scored from its curves up to its checkpoint (step 200: two values of 99), and named under
    # Warnings
    stats, _, _, found = st.analyse(args_for(st, tmp_path, drl_score="training", include_unfinished=True))
    (short_run,) = [
        r for r in found if r["dir"] == str(run)
    ]  # scored (the matrix then keeps the newer seed-3 run of the cell)
    assert short_run["return"] == 99.0 and "last 2 of 2 charts/episodic_return (to step 200)" in short_run["source"]
    assert any(w["run"] == str(run) and "unfinished, scored anyway" in w["reason"] for w in stats["warnings"])
    stats, _, _, _ = st.analyse(args_for(st, tmp_path))
    reasons = {i["run"]: i["reason"] for i in stats["incomplete"]}
    assert "finished without eval.json" in reasons[str(noeval)] and "unfinished" in reasons[str(run)]
    assert all(r["steps_done"] is None or r["steps_done"] <= 1000 for r in stats["drl"]["runs"])


def test_runs_of_other_settings_are_other_experiments(st, tmp_path):
    """Two experiments in one folder (more images, more epochs) are never taken for duplicates or paired."""
    for fold in range(3):
        write_dl(tmp_path / "a", "shapes", "resnet18", "camal", fold, 0.9, 0.5)
        write_dl(tmp_path / "a", "shapes", "resnet18", "vanilla", fold, 0.4, 0.1)
        for method, acc in (("camal", 0.7), ("vanilla", 0.6)):
            run = write_dl(tmp_path / "b", "shapes", "resnet18", method, fold, acc, 0.3, epochs=20)
            m = json.loads((run / "metrics.json").read_text())
            m["args"] = {"shapes_per_class": 120, "epochs": 20}
            (run / "metrics.json").write_text(json.dumps(m))
    stats, tables, _, _ = st.analyse(args_for(st, tmp_path))
    comps = {c["variant"]: c for c in stats["dl"]["comparisons"]}
    # shapes_per_class is unknown (None) in "a"'s older metrics.json: only epochs tells the experiments apart
    assert set(comps) == {"epochs 2", "epochs 20"}
    assert comps["epochs 2"]["test_accuracy"]["camal"]["values"] == [0.9] * 3
    assert comps["epochs 20"]["test_accuracy"]["camal"]["values"] == [0.7] * 3
    assert not any("duplicate" in i["reason"] for i in stats["incomplete"])
    # a setting a run does not record (an older metrics.json) is no evidence of another experiment
    assert st.variants(
        [{"dir": "x", "settings": {"epochs": 2}}, {"dir": "y", "settings": {"epochs": None}}], lambda r: 0, ("epochs",)
    ) == {
        "x": "",
        "y": "",
    }
    runs_table = next(t for t in tables if t["name"] == "dl_runs")
    assert {row[0] for row in runs_table["rows"]} == {"Shapes [epochs 2]", "Shapes [epochs 20]"}
    # one method run twice with another camal_coef: two experiments of camal, named as such, the newer used
    other = write_dl(tmp_path / "c", "shapes", "resnet18", "camal", 0, 0.1, 0.1)
    m = json.loads((other / "metrics.json").read_text())
    m["camal_coef"] = 3.0
    (other / "metrics.json").write_text(json.dumps(m))
    os.utime(other / "metrics.json", (2e9, 2e9))
    stats, _, _, _ = st.analyse(args_for(st, tmp_path))
    assert any("another experiment (camal_coef None vs 3.0)" in i["reason"] for i in stats["incomplete"])


@pytest.mark.slow
def test_cli_repeats_and_writes_everything(tmp_path):
    runs = tmp_path / "runs"
    dl_folder(runs / "dl")
    drl_folder(runs / "drl")
    outs = []
    for i in range(2):
        proc = run_script(
            "stats", [str(runs), "--reps", str(REPS), "--out", str(tmp_path / f"out{i}")], cwd=tmp_path, timeout=120
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        outs.append(proc.stdout)
    assert outs[0].replace("out0", "out1") == outs[1]
    assert "Table 2" in outs[0] and "probability of improvement" in outs[0] and "Incomplete" in outs[0]
    a, b = (json.loads((tmp_path / f"out{i}" / "stats.json").read_text()) for i in range(2))
    a["args"].pop("out"), b["args"].pop("out")
    assert a == b
    files = set(os.listdir(tmp_path / "out0"))
    assert {
        "stats.json",
        "dl_test_accuracy_camal_vs_vanilla.csv",
        "dl_test_iou_camal_vs_prior.csv",
        "drl_return_sbci.csv",
        "drl_iou_poi.csv",
        "drl_runs.csv",
        "drl_interval_estimates.png",
        "drl_probability_of_improvement.png",
    } <= files
    csv_rows = (tmp_path / "out0" / "dl_test_accuracy_camal_vs_vanilla.csv").read_text().splitlines()
    assert csv_rows[0].startswith("dataset,variant,model,pairs,camal_mean") and len(csv_rows) == 3


@pytest.mark.parametrize("folder", sorted(p.name for p in (ROOT / "docs" / "runs").iterdir()))
def test_committed_records_are_scored_whole(tmp_path, folder):
    """docs/runs holds the records docs/results.md quotes, one set per folder: stats.py scores every run there, none
    left out, skipped or warned about, each with its own eval.json's return and IoU (SB3's records, without an
    eval.json, are passed by)."""
    root = ROOT / "docs" / "runs" / folder
    evals = [json.loads(p.read_text()) for p in sorted(root.glob("*/*/eval.json"))]  # a folder per scenario
    assert len(evals) >= 4 and not list(root.glob("*/eval.json"))
    proc = run_script("stats", [str(root), "--out", "s", "--reps", "2000"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "s" / "stats.json").read_text())
    assert result["incomplete"] == [] and result["skipped"] == [] and result["warnings"] == []
    for metric, key in (("return", "mean_return"), ("iou", "mean_iou")):
        raw = result["drl"]["metrics"][metric]["raw"]
        for method in ("camal", "vanilla"):
            got = sorted(v for row in raw[method] for v in row)
            assert got == pytest.approx(sorted(e[key] for e in evals if e["method"] == method), abs=1e-6)


@pytest.mark.slow
def test_end_to_end_on_real_runs(tmp_path, ppo_smoke_run, shapes_runs):
    """stats.py over short real runs of both training scripts, with eval_faithfulness.py's AUCs."""
    shapes_root, dl_runs, _ = shapes_runs  # shapes, resnet18: camal and vanilla on 3 folds
    envs = ("Basic", "DefendLine", "DefendCenter", "TakeCover")
    ppo = {(env, m): ppo_smoke_run(env, m) for env in envs for m in ("camal", "vanilla")}
    assert all(proc.returncode == 0 for proc, _ in ppo.values())
    crashed = (
        tmp_path / "crashed"
    )  # a finished run without eval.json: scored only from its TensorBoard events (--drl-score training)
    shutil.copytree(ppo["TakeCover", "vanilla"][1] / "runs", crashed)
    (crashed_run,) = crashed.iterdir()
    (crashed_run / "eval.json").unlink()
    paths = [shapes_root / "runs", crashed] + [
        cwd / "runs" for key, (_, cwd) in ppo.items() if key != ("TakeCover", "vanilla")
    ]
    proc = run_script(
        "stats",
        [*map(str, paths), "--reps", str(REPS), "--last-n", "3", "--out", str(tmp_path / "out")],
        cwd=tmp_path,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    stats = json.loads((tmp_path / "out" / "stats.json").read_text())

    (comp,) = stats["dl"]["comparisons"]
    assert (comp["dataset"], comp["model"], comp["baseline"], len(comp["pairs"])) == (
        "shapes",
        "resnet18",
        "vanilla",
        3,
    )
    metrics = {
        m: [json.loads(open(f"{r}/metrics.json").read()) for r in dl_runs if f"__{m}__" in r]
        for m in ("camal", "vanilla")
    }
    x, y = ([r["test_accuracy"] for r in sorted(metrics[m], key=lambda r: r["fold"])] for m in ("camal", "vanilla"))
    acc = comp["test_accuracy"]
    assert acc["camal"]["values"] == x and acc["vanilla"]["values"] == y
    with np.errstate(invalid="ignore"):  # tiny models may tie on every fold: scipy then divides 0 by 0 and gives p = 1
        assert acc["wilcoxon"]["p"] == pytest.approx(scipy.stats.wilcoxon(x, y, alternative="greater").pvalue)
    faith = [json.loads(open(f"{r}/faithfulness.json").read()) for r in dl_runs if "__camal__" in r]
    (res,) = stats["dl"]["faithfulness"]["vanilla"]
    assert res["removal_auc"]["camal"]["mean"] == pytest.approx(
        np.mean([s["attention"]["removal_auc"] for f in faith for s in f["samples"]])
    )

    drl = stats["drl"]
    # Basic's vanilla run used the paper's CAM (--cam paper), its camal run the default: vanilla's eval.json measured it
    # under every CAM, so it is scored under abs, as that camal run's baseline; the crashed copy finished but wrote no
    # eval.json, so the default (eval.json) scores leave TakeCover out
    assert drl["envs"] == ["Basic", "DefendLine", "DefendCenter"] and drl["methods"] == ["camal", "vanilla"]
    (basic,) = [r for r in drl["runs"] if (r["env"], r["method"]) == ("Basic", "vanilla")]
    (basic_run,) = (ppo["Basic", "vanilla"][1] / "runs").iterdir()
    assert basic["iou"] == json.loads((basic_run / "eval.json").read_text())["by_cam"]["abs"]["mean_iou"]
    assert "IoU under --cam abs (eval.json's by_cam; the run's own is paper)" in basic["source"]
    reasons = " ".join(f"{i['run']}: {i['reason']}" for i in stats["incomplete"])
    assert f"{crashed_run}: finished without eval.json" in reasons
    assert all(r["source"].startswith("eval.json") for r in drl["runs"])

    proc = run_script(
        "stats",
        [
            *map(str, paths),
            "--reps",
            str(REPS),
            "--last-n",
            "3",
            "--drl-score",
            "training",
            "--out",
            str(tmp_path / "out"),
        ],
        cwd=tmp_path,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    drl = json.loads((tmp_path / "out" / "stats.json").read_text())["drl"]
    assert drl["envs"] == ["DefendLine", "DefendCenter", "TakeCover"]
    assert all(r["source"].startswith("TensorBoard") for r in drl["runs"])  # every run from its curves: no mix
    (fallback,) = [r for r in drl["runs"] if r["dir"] == str(crashed_run)]
    assert (fallback["env"], fallback["method"], fallback["seed"]) == ("TakeCover", "vanilla", 2)
    iou = [e.value for e in read_events(crashed_run).Scalars("charts/attention_iou")]
    assert fallback["iou"] == pytest.approx(np.mean(iou[-3:]))
    assert "iou" in drl["metrics"] and drl["metrics"]["iou"]["k"] == 1
    assert not drl["metrics"]["iou"]["poi"]["vanilla"]["significant"]  # one run per env: a zero-width CI is no evidence
    assert fallback["total_timesteps"] == 128 and fallback["steps_done"] == 128
    for name in ("drl_learning_curves.png", "dl_faithfulness_camal_vs_vanilla.png", "drl_interval_estimates.png"):
        assert (tmp_path / "out" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert drl["learning_curves"]["iou"]["TakeCover"]["vanilla"]["runs"] == 1
    assert "TensorBoard: mean of the last" in proc.stdout and "Table 2" in proc.stdout


@pytest.mark.parametrize(
    "case, message",
    [
        ("empty", "no runs of train_dl_camal.py or ppo_camal_vizdoom.py"),
        ("foreign", "no runs of train_dl_camal.py or ppo_camal_vizdoom.py"),
        ("missing", "does not exist"),
        ("broken", "is not whole JSON"),
        ("not_ours", "is not a metrics.json of train_dl_camal.py"),
        ("reps", "--reps must lie in 1 .. 1,000,000"),
        ("reps huge", "--reps must lie in 1 .. 1,000,000 (rliable's default is 50,000), got 100000000000"),
    ],
)
def test_bad_input(tmp_path, case, message):
    folder = tmp_path / "runs"
    folder.mkdir()
    extra = []
    if case == "foreign":
        (folder / "notes.txt").write_text("hello")
        (folder / "sub").mkdir()
        (folder / "sub" / "data.json").write_text("{}")
    elif case == "missing":
        folder = tmp_path / "nowhere"
    elif case == "broken":
        (folder / "run").mkdir()
        (folder / "run" / "metrics.json").write_text("{not json")
    elif case == "not_ours":
        (folder / "run").mkdir()
        (folder / "run" / "metrics.json").write_text(json.dumps({"accuracy": 1.0}))
    elif case.startswith("reps"):
        extra = ["--reps", "100000000000" if case == "reps huge" else "0"]
    proc = run_script("stats", [str(folder), *extra], cwd=tmp_path, timeout=60)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr


FUZZ = {
    "random bytes": bytes(np.random.default_rng(0).integers(0, 256, 200, dtype=np.uint8)),
    "empty": b"",
    "truncated": b'{"dataset": "shapes", "model": ',
    "a list": b"[1, 2, 3]",
}


@pytest.mark.parametrize("name", ["metrics.json", "eval.json", "faithfulness.json"])
@pytest.mark.parametrize("case", [*FUZZ, "wrong types"])
def test_fuzzed_run_files_are_named(st, tmp_path, name, case):
    """Every reader of run files: a clear error that names the file, for bytes, empty files, truncated JSON and wrong
    types."""
    runs = dl_folder(tmp_path / "runs")
    drl = write_drl(runs, "Basic", "camal", 1, 1.0, 0.5)
    write_drl(runs, "Basic", "vanilla", 1, 1.0, 0.5)
    metrics = sorted(runs.glob("**/metrics.json"))
    # every DL run evaluated, as eval_faithfulness.py leaves them, so the pairs read them
    if name == "faithfulness.json":
        sample = {
            "label": 0,
            "attention": {"removal": [1, 0], "insertion": [0, 1], "removal_auc": 0.5, "insertion_auc": 0.5},
        }
        for m in metrics:
            (m.parent / name).write_text(json.dumps({"k": [0, 1], "samples": [sample]}))
    target = {"metrics.json": metrics[0], "eval.json": drl / name, "faithfulness.json": metrics[0].parent / name}[name]
    if case == "wrong types":
        data = json.loads(target.read_text())
        if name == "metrics.json":
            data["test_accuracy"] = "high"
        elif name == "eval.json":
            data["seed"] = [1]
        else:
            data["samples"][0]["attention"]["removal"] = ["a", "b"]
        target.write_text(json.dumps(data))
    else:
        target.write_bytes(FUZZ[case])
    with pytest.raises(st.StatsError) as e:
        st.analyse(args_for(st, runs))
    assert str(target) in str(e.value)


def test_fuzzed_file_exits_2_and_writes_nothing(tmp_path):
    runs = tmp_path / "runs"
    dl_folder(runs)
    bad = sorted(runs.glob("**/metrics.json"))[0]
    bad.write_text('{"dataset": "shapes", "test_accuracy": ')
    proc = run_script("stats", [str(runs), "--out", str(tmp_path / "out")], cwd=tmp_path, timeout=120)
    assert proc.returncode == 2 and str(bad) in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()  # nothing written, not half
