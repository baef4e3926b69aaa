"""The built-in spurious-correlation benchmark: does CAMAL make a classifier look at the object, and decide by it?

    python benchmarks/spurious_shapes.py  # camal and vanilla, 5 folds, seeds 7 8 9, stats.py per seed
    python benchmarks/spurious_shapes.py --seeds 1 --methods camal vanilla suppress
    python benchmarks/spurious_shapes.py --cue corner         # the stress case: a compact 24 x 24 corner cue
    python benchmarks/spurious_shapes.py --methods camal vanilla suppress --faithfulness zero blur mean

The data is train_dl_camal.py's built-in shapes with a class-coloured background (--shapes-cue background): in
training, 95 % of the images of a class sit on its own colour (Waterbirds' share); held out, every image sits on another
class's colour. The object (the class's shape, filled with stripes at the class's angle) is the only evidence that holds
at test time, and the shortcut is spread over everything outside the mask, where CAMAL's beta acts. Each method trains
resnet18 from scratch on every fold (train_dl_camal.py --fold all) of every seed (its own data, split and
initialisation), then stats.py compares them per seed with its paired Wilcoxon tests.

The verdicts, per seed, on means over the folds with their 95 % CIs (mean +- 1.96 SE), since one fold's 80 held-out
images give an accuracy with a binomial standard error of about 0.04 on their own: CAMAL decides by the object (its
mean held-out accuracy's CI above 0.5: a model that followed the tint would score 0, one that reads the stripes 1,
chance is 0.25); CAMAL's accuracy CI and IoU CI above each baseline's; accuracy and IoU higher with Wilcoxon p < 0.05
(all five folds must agree). How far vanilla falls for the cue varies with the seed (its mean held-out accuracy 0.27 to
0.53 over the seeds measured), so it is shown, not judged. A line says PASS when its criterion holds on every seed.
Exit code 0 when every criterion holds on every seed, 1 when one fails, 2 on bad input. About 12 minutes per seed on 2
CPU cores for the default two methods (docs/results.md).

With --faithfulness, every held-out image of every run (--faithfulness-per-class 0) is then scored by
eval_faithfulness.py once per fill (what removed pixels become), and stats.py tests CAMAL against each baseline over
the paired runs of all seeds (one-tailed Wilcoxon on each run's mean AUC). Per fill: faithfulness_<fill>.log (the AUC
tables: every sample, the samples every method classifies correctly, normalised by p(true) at k=0),
faithfulness_<fill>.png (the curves with 95 % bands in those three views), faithfulness_<fill>/ (stats.py's report)
and each run's faithfulness_<fill>.json. The faithfulness table is shown, not judged.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# The benchmark's settings, chosen by measurement to fit 2 CPU cores (docs/results.md). A learning rate of 3e-4 instead
# of Table 7's 1e-3 (for 500 epochs from ImageNet weights): from scratch at 1e-3, held-out accuracy swings by up to 0.6
# between consecutive epochs, so the last epoch is a lottery for every method.
SETTINGS = [
    "--dataset",
    "shapes",
    "--shapes-cue",
    "background",
    "--shapes-cue-prob",
    "0.95",
    "--shapes-classes",
    "4",
    "--shapes-per-class",
    "100",
    "--image-size",
    "112",
    "--epochs",
    "8",
    "--learning-rate",
    "3e-4",
]


def fresh_folder(out, marker):
    """Empty `out` for a new benchmark run, but only if this benchmark made it (its marker file is there); exit 2
    otherwise."""
    out = Path(out).resolve()
    if out.exists() and any(out.iterdir()) and not (out / marker).is_file():
        print(f"error: --out {out} exists and was not made by this benchmark: choose another folder", file=sys.stderr)
        sys.exit(2)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    (out / marker).touch()
    return out


def run(cmd, cwd, log):
    """Run a command, its output to a log file; the exit code."""
    with open(log, "w") as f:
        return subprocess.run(cmd, cwd=cwd, stdout=f, stderr=subprocess.STDOUT).returncode


def run_seed(args, out, seed):
    """Every method on every fold of one seed (model seed and data/split seed), then stats.py; the stats.json."""
    folder = out / f"seed_{seed}"
    folder.mkdir()
    settings = [args.cue if x == "background" else x for x in SETTINGS] + [
        "--folds",
        str(args.folds),
        "--seed",
        str(seed),
        "--split-seed",
        str(seed),
        "--faithfulness-per-class",
        str(args.faithfulness_per_class),
    ]
    settings += args.train_args.split()
    for method in args.methods:
        t = time.time()
        cmd = [
            sys.executable,
            str(ROOT / "train_dl_camal.py"),
            "--method",
            method,
            "--fold",
            "all",
            "--exp-name",
            "spurious",
            *settings,
        ]
        code = run(cmd, folder, folder / f"train_{method}.log")
        print(
            f"seed {seed}, {method}: {args.folds} folds in {time.time() - t:.0f} s (log: "
            f"{folder / f'train_{method}.log'})",
            flush=True,
        )
        if code:
            print(f"error: train_dl_camal.py --method {method} exited with {code}; see the log", file=sys.stderr)
            sys.exit(1)
    code = run(
        [sys.executable, str(ROOT / "stats.py"), str(folder / "runs"), "--out", str(folder / "stats")],
        folder,
        folder / "stats.md",
    )
    if code:
        print(f"error: stats.py exited with {code}; see {folder / 'stats.md'}", file=sys.stderr)
        sys.exit(1)
    return json.loads((folder / "stats" / "stats.json").read_text())


def score_faithfulness(args, out, fill):
    """eval_faithfulness.py on every run of every seed with one fill, then stats.py over them all; stats.py's
    faithfulness results per baseline."""
    runs = sorted(str(p.parent) for p in out.glob("seed_*/runs/*/metrics.json"))
    t = time.time()
    cmd = [sys.executable, str(ROOT / "eval_faithfulness.py"), *runs, "--fill", fill]
    code = run([*cmd, "--plot", str(out / f"faithfulness_{fill}.png")], out, out / f"faithfulness_{fill}.log")
    if code:
        log = out / f"faithfulness_{fill}.log"
        print(f"error: eval_faithfulness.py exited with {code}; see {log}", file=sys.stderr)
        sys.exit(1)
    seconds = time.time() - t
    samples = sum(len(json.loads((Path(r) / "faithfulness.json").read_text())["samples"]) for r in runs)
    print(
        f"faithfulness, removed pixels {fill}: {samples} images of {len(runs)} runs in {seconds:.0f} s "
        f"({samples / seconds:.2f} images/s; log: {out / f'faithfulness_{fill}.log'})",
        flush=True,
    )
    folders = sorted({str(Path(r).parent) for r in runs})
    report = out / f"faithfulness_{fill}"
    code = run([sys.executable, str(ROOT / "stats.py"), *folders, "--out", str(report)], out, out / f"{report}.md")
    if code:
        print(f"error: stats.py exited with {code}; see {report}.md", file=sys.stderr)
        sys.exit(1)
    for r in runs:  # the next fill's scoring writes faithfulness.json again: each fill's copy stays
        tmp = os.path.join(r, f".faithfulness_{fill}.json.tmp")  # renamed whole, so a crash never leaves half a copy
        shutil.copyfile(os.path.join(r, "faithfulness.json"), tmp)
        os.replace(tmp, os.path.join(r, f"faithfulness_{fill}.json"))
    return json.loads((report / "stats.json").read_text())["dl"]["faithfulness"]


def faithfulness_table(results):
    """{fill: stats.py's faithfulness per baseline} as one markdown table."""
    print(
        "\n| removed pixels | camal vs | images (camal / other) | p(true) at k=0 | removal AUC, camal | other "
        "| p (removal lower) | insertion AUC, camal | other | p (insertion higher) | paired runs |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")

    def cell(d):
        return f"{d['mean']:.3f} [{d['ci95'][0]:.3f}, {d['ci95'][1]:.3f}]"

    def p(w):  # stats.py's p_text
        return f"{w['p']:.3g}" if w["p"] is not None else w["verdict"]

    for fill, per_base in results.items():
        for base, (res,) in per_base.items():
            r, i, p0 = res["removal_auc"], res["insertion_auc"], res["start_probability"]
            print(
                f"| {fill} | {base} | {r['camal']['n']} / {r[base]['n']} | {p0['camal']:.2f} / {p0[base]:.2f} "
                f"| {cell(r['camal'])} | {cell(r[base])} | {p(r['wilcoxon'])} | {cell(i['camal'])} | {cell(i[base])} "
                f"| {p(i['wilcoxon'])} | {r['paired_runs']} |"
            )


def criteria(comp):
    """The verdicts of one seed from stats.py's comparison of CAMAL with a baseline (None: no comparison)."""
    if comp is None:
        return []
    acc, iou = comp["test_accuracy"], comp["test_iou"]
    b = comp["baseline"]
    return [
        (f"accuracy: CAMAL's 95 % CI above {b}'s", acc["camal"]["ci95"][0] > acc[b]["ci95"][1]),
        (f"accuracy: CAMAL > {b}, Wilcoxon p < 0.05", acc["wilcoxon"]["verdict"] == "significant"),
        (f"IoU: CAMAL's 95 % CI above {b}'s", iou["camal"]["ci95"][0] > iou[b]["ci95"][1]),
        (f"IoU: CAMAL > {b}, Wilcoxon p < 0.05", iou["wilcoxon"]["verdict"] == "significant"),
    ]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--out", default="spurious_shapes", help="folder for the runs, logs and stats (a previous one is emptied first)"
    )
    p.add_argument("--methods", nargs="+", default=["camal", "vanilla"], choices=["camal", "vanilla", "suppress"])
    p.add_argument("--folds", type=int, default=5, help="k of the k-fold split; every fold is trained")
    p.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        default=[7, 8, 9],
        help="each seed S trains with --seed S --split-seed S (its own data, split and initialisation). The settings "
        "were chosen on "
        "seeds 1 (split seed 0) and 5 (split seed 11); the verdicts took their final form after seeds 6-8 (where "
        "'vanilla below 0.5' failed on all three), and seed 9 was run after that (docs/results.md)",
    )
    p.add_argument(
        "--cue",
        default="background",
        choices=["background", "corner"],
        help="the shortcut: background (the benchmark) or corner, the compact-cue stress case for mean-based alpha and "
        "beta",
    )
    p.add_argument(
        "--faithfulness",
        nargs="*",
        default=[],
        choices=["zero", "mean", "blur"],
        help="after training, score every run with eval_faithfulness.py once per fill given (what removed pixels "
        "become)",
    )
    p.add_argument(
        "--faithfulness-per-class",
        type=int,
        default=0,
        help="held-out images per class each run keeps for eval_faithfulness.py (0: all of them; 1: the paper's)",
    )
    p.add_argument("--train-args", default="", help="extra train_dl_camal.py flags, one string (tests: tiny settings)")
    args = p.parse_args()
    problems = []
    if "camal" not in args.methods or len(args.methods) < 2:
        problems.append("--methods needs camal and at least one baseline")
    if args.folds < 2:
        problems.append(f"--folds must be at least 2, got {args.folds}")
    if args.faithfulness_per_class < 0:
        problems.append(f"--faithfulness-per-class must be 0 (all) or more, got {args.faithfulness_per_class}")
    if len(set(args.faithfulness)) != len(args.faithfulness):
        problems.append(f"--faithfulness: each fill once, got {' '.join(args.faithfulness)}")
    if any(s < 0 for s in args.seeds) or len(set(args.seeds)) != len(args.seeds):
        problems.append(f"--seeds must be distinct and not negative, got {args.seeds}")
    if any(
        f.split("=")[0] in ("--seed", "--split-seed", "--method", "--fold", "--folds", "--faithfulness-per-class")
        for f in args.train_args.split()
    ):
        problems.append(
            "--train-args may not set --seed, --split-seed, --method, --fold, --folds or --faithfulness-per-class: use "
            "--seeds, --methods, --folds, --faithfulness-per-class"
        )
    if problems:
        print("error: " + "; ".join(problems), file=sys.stderr)
        sys.exit(2)

    out = fresh_folder(args.out, ".spurious_shapes")
    start = time.time()
    results = {}
    for seed in args.seeds:
        results[seed] = run_seed(args, out, seed)
    print(f"total {time.time() - start:.0f} s; stats.py's report of each seed: {out}/seed_*/stats.md\n", flush=True)

    print(
        "| seed | method | held-out accuracy per fold | mean accuracy [95 % CI] | mean IoU [95 % CI] | CAMs empty "
        "(test) |"
    )
    print("|---|---|---|---|---|---|")
    verdicts = {}
    for seed, st in results.items():
        comps = {c["baseline"]: c for c in st["dl"]["comparisons"]}
        missing = [m for m in args.methods if m != "camal" and m not in comps]
        if missing:
            print(
                f"error: stats.py paired no camal and {', '.join(missing)} runs of seed {seed}; see "
                f"{out / f'seed_{seed}' / 'stats.md'}",
                file=sys.stderr,
            )
            sys.exit(1)
        runs = [json.loads(p.read_text()) for p in sorted((out / f"seed_{seed}" / "runs").glob("*/metrics.json"))]
        for m in args.methods:
            rs = sorted((r for r in runs if r["method"] == m), key=lambda r: r["fold"])
            d = next(c for c in comps.values() if m in c["test_accuracy"])
            acc, iou = d["test_accuracy"][m], d["test_iou"][m]
            empty = sum(r["test_cam_empty_fraction"] for r in rs) / len(rs)
            folds = " ".join(f"{r['test_accuracy']:.2f}" for r in rs)
            print(
                f"| {seed} | {m} | {folds} | {acc['mean']:.3f} [{acc['ci95'][0]:.3f}, {acc['ci95'][1]:.3f}] "
                f"| {iou['mean']:.3f} [{iou['ci95'][0]:.3f}, {iou['ci95'][1]:.3f}] | {empty:.0%} |"
            )
        first = comps[next(m for m in args.methods if m != "camal")]
        acc = first["test_accuracy"]["camal"]
        checks = [("CAMAL decides by the object: its mean held-out accuracy's 95 % CI above 0.5", acc["ci95"][0] > 0.5)]
        for m in args.methods:
            checks += criteria(comps.get(m))
        verdicts[seed] = checks
    print()
    names = list(dict.fromkeys(name for checks in verdicts.values() for name, _ in checks))
    for name in names:
        held = [seed for seed, checks in verdicts.items() if dict(checks).get(name)]
        print(
            f"{'PASS' if len(held) == len(verdicts) else 'FAIL'}: {name} (seeds {' '.join(map(str, held)) or 'none'} "
            f"of {' '.join(map(str, verdicts))})"
        )
    if args.faithfulness:
        faithfulness_table({fill: score_faithfulness(args, out, fill) for fill in args.faithfulness})
    sys.exit(0 if all(ok for checks in verdicts.values() for _, ok in checks) else 1)


if __name__ == "__main__":
    main()
