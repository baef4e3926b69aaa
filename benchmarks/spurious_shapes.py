"""The built-in spurious-correlation benchmark: does CAMAL make a classifier look at the object, and decide by it?

    python benchmarks/spurious_shapes.py                      # camal and vanilla, 5 folds, then stats.py
    python benchmarks/spurious_shapes.py --methods camal vanilla suppress
    python benchmarks/spurious_shapes.py --cue corner         # the stress case: a compact 24 x 24 corner cue

The data is train_dl_camal.py's built-in shapes with a class-coloured background (--shapes-cue background): in
training, 95 % of the images of a class sit on its own colour (Waterbirds' share); held out, every image sits on another
class's colour. The object (the class's shape, filled with stripes at the class's angle) is the only evidence that holds
at test time, and the shortcut is spread over everything outside the mask, where CAMAL's beta acts. Each method trains
resnet18 from scratch on every fold (train_dl_camal.py --fold all), then stats.py compares them with its paired
Wilcoxon tests. The verdict lines check: CAMAL's held-out accuracy at least 0.8 on every fold, vanilla's at most 0.5,
CAMAL's mean IoU at least twice vanilla's, and both differences significant (p < 0.05).
Exit code 0 when every criterion holds, 1 when one fails, 2 on bad input. About 12 minutes on 2 CPU cores for the
default two methods (docs/results.md).
"""

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# The benchmark's settings, chosen by measurement to fit 2 CPU cores (docs/results.md).
# A learning rate of 3e-4 instead of Table 7's 1e-3 (for 500 epochs from ImageNet weights): from scratch at 1e-3, held-out
# accuracy swings by up to 0.6 between consecutive epochs, so the last epoch is a lottery for every method.
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
    """Empty `out` for a new benchmark run, but only if this benchmark made it (its marker file is there); exit 2 otherwise."""
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


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="spurious_shapes", help="folder for the runs, logs and stats (a previous one is emptied first)")
    p.add_argument("--methods", nargs="+", default=["camal", "vanilla"], choices=["camal", "vanilla", "suppress"])
    p.add_argument("--folds", type=int, default=5, help="k of the k-fold split; every fold is trained")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument(
        "--cue",
        default="background",
        choices=["background", "corner"],
        help="the shortcut: background (the benchmark) or corner, the compact-cue stress case for mean-based alpha and beta",
    )
    p.add_argument("--train-args", default="", help="extra train_dl_camal.py flags, one string (tests: tiny settings)")
    args = p.parse_args()
    if "camal" not in args.methods or len(args.methods) < 2:
        print("error: --methods needs camal and at least one baseline", file=sys.stderr)
        sys.exit(2)
    if args.folds < 2:
        print(f"error: --folds must be at least 2, got {args.folds}", file=sys.stderr)
        sys.exit(2)

    out = fresh_folder(args.out, ".spurious_shapes")
    start = time.time()
    settings = [args.cue if x == "background" else x for x in SETTINGS] + ["--folds", str(args.folds), "--seed", str(args.seed)]
    settings += args.train_args.split()
    for method in args.methods:
        t = time.time()
        cmd = [sys.executable, str(ROOT / "train_dl_camal.py"), "--method", method, "--fold", "all", "--exp-name", "spurious", *settings]
        code = run(cmd, out, out / f"train_{method}.log")
        print(f"{method}: {args.folds} folds in {time.time() - t:.0f} s (log: {out / f'train_{method}.log'})", flush=True)
        if code:
            print(f"error: train_dl_camal.py --method {method} exited with {code}; see the log", file=sys.stderr)
            sys.exit(1)
    t = time.time()
    code = run([sys.executable, str(ROOT / "stats.py"), str(out / "runs"), "--out", str(out / "stats")], out, out / "stats.md")
    print(f"stats.py in {time.time() - t:.0f} s; total {time.time() - start:.0f} s\n", flush=True)
    if code:
        print(f"error: stats.py exited with {code}; see {out / 'stats.md'}", file=sys.stderr)
        sys.exit(1)
    print((out / "stats.md").read_text())

    runs = [json.loads((d / "metrics.json").read_text()) for d in sorted((out / "runs").iterdir())]
    by = {m: sorted((r for r in runs if r["method"] == m), key=lambda r: r["fold"]) for m in args.methods}
    stats = json.loads((out / "stats" / "stats.json").read_text())
    print("| method | held-out accuracy per fold | mean IoU | CAMs empty (test) |\n|---|---|---|---|")
    for m, rs in by.items():
        accs = " ".join(f"{r['test_accuracy']:.2f}" for r in rs)
        iou = sum(r["test_iou"] for r in rs) / len(rs)
        empty = sum(r["test_cam_empty_fraction"] for r in rs) / len(rs)
        print(f"| {m} | {accs} | {iou:.3f} | {empty:.0%} |")
    comp = {c["baseline"]: c for c in stats["dl"]["comparisons"]}.get("vanilla")
    if "vanilla" in args.methods and comp is None:
        print(f"error: stats.py paired no camal and vanilla runs; see {out / 'stats.md'}", file=sys.stderr)
        sys.exit(1)
    checks = [("CAMAL held-out accuracy >= 0.8 on every fold", all(r["test_accuracy"] >= 0.8 for r in by["camal"]))]
    if comp is not None:
        cam_iou = sum(r["test_iou"] for r in by["camal"]) / len(by["camal"])
        van_iou = sum(r["test_iou"] for r in by["vanilla"]) / len(by["vanilla"])
        checks += [
            ("vanilla held-out accuracy <= 0.5 on every fold", all(r["test_accuracy"] <= 0.5 for r in by["vanilla"])),
            ("CAMAL mean IoU >= 2 x vanilla's", cam_iou >= 2 * van_iou),
            ("accuracy: CAMAL > vanilla, Wilcoxon p < 0.05", comp["test_accuracy"]["wilcoxon"]["verdict"] == "significant"),
            ("IoU: CAMAL > vanilla, Wilcoxon p < 0.05", comp["test_iou"]["wilcoxon"]["verdict"] == "significant"),
        ]
    print()
    for name, ok in checks:
        print(f"{'PASS' if ok else 'FAIL'}: {name}")
    sys.exit(0 if all(ok for _, ok in checks) else 1)


if __name__ == "__main__":
    main()
