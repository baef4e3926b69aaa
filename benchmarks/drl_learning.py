"""The DRL learning check: do vanilla PPO and PPO + CAMAL learn Basic on a CPU, and what does CAMAL cost the return?

    python benchmarks/drl_learning.py                                   # Basic 60 x 80, camal + vanilla, seeds 1-3
    python benchmarks/drl_learning.py --camal-coefs 0.1 0.3 1           # CAMAL's cost to the return per lambda
    python benchmarks/drl_learning.py --cams abs paper abs-target       # ... and per CAM formulation
    python benchmarks/drl_learning.py --reference                       # + Stable-Baselines3's PPO on the same frames
    python benchmarks/drl_learning.py --train-args "--reward-scale 0.01" --out drl_learning_scaled
    python benchmarks/drl_learning.py --env TakeCover --total-timesteps 1024000 --records docs/runs/drl/TakeCover

Table 8's settings throughout (ppo_camal_vizdoom.py's defaults), at a CPU-sized frame and for a budget in which both
methods learn the game (409,600 steps: measured, docs/results.md). The cells run through benchmark.py (resumable: a
rerun of the same command skips finished cells and resumes interrupted ones), --workers at a time with the CPU
threads shared out. Then, per CAMAL configuration (lambda x CAM), stats.py compares it with vanilla (rliable SBCI
and probability of improvement of the evaluation return and IoU; vanilla's IoU is measured under the same CAM), and
this script prints and plots the mean training return against steps with 95 % bands, the steps each run needs to
reach --threshold, and the evaluation return and IoU at the end. --reference adds SB3's PPO (benchmarks/
sb3_ppo_vizdoom.py) on the same frames and hyperparameters: a defect in our PPO would show as a gap between the curves.

Verdicts (exit code 0 when all hold, 1 otherwise, 2 on bad input): vanilla and each CAMAL configuration reach a mean
evaluation return of at least --threshold in every seed (Basic 50, DefendCenter 10, DefendLine 15, TakeCover 500),
and above a random policy's on the same games by --random-margin (each
eval.json holds the random policy's returns); each CAMAL configuration's evaluation IoU is above vanilla's (under its
CAM) in every seed, with a significant probability of improvement; with --reference, our vanilla's evaluation return is
at least SB3's minus --reference-margin in the mean over seeds.

--records DIR keeps what stats.py needs of each run, a few kB (eval.json, args.json, environment.json and the run's
binned curves), in DIR/<cell>/, and SB3's (reference_eval.json, curves) in
DIR/reference__<env>__<frame>__<steps>__seed_N/: the runs' checkpoints and events can go, and `python stats.py DIR`
still compares every scenario recorded there (the paper's Figure 4 across scenarios). --from-records DIR redoes this
script's analysis (table, steps to the threshold, figure, stats.py, verdicts) from such records alone: seeds run in
different sessions, whose run folders are gone, are analysed together. A run kept in --records DIR and absent from
--out is not trained again, its record standing in: a configuration added later (--cams abs paper) trains alone.
--reference-episodes gives SB3's
agents as many evaluation episodes as drl_eval.py gives ours (TakeCover needs about 100).
"""

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def load(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# stats.py's curve helpers; benchmark.py's cells, as its runs name them
stats, benchmark = load("stats"), load("benchmark")
# the return a learned agent reaches: Basic agents score 75-85 (docs/results.md), public DefendCenter agents
# about 11 after 150k-260k steps (random about 0); budget seed 11 passed TakeCover's 500 (random 432) and DefendLine's
# 15 (random 10.2: a random policy kills the monsters that walk into its line of fire)
THRESHOLDS = {"Basic": 50.0, "DefendCenter": 10.0, "DefendLine": 15.0, "TakeCover": 500.0}


def parse(argv):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
    )
    p.add_argument(
        "--out",
        default="drl_learning",
        help="the benchmark's folder: cells/ (benchmark.py's), reference/, stats/, the figure",
    )
    p.add_argument("--env", default="Basic", choices=["Basic", "DefendLine", "DefendCenter", "TakeCover"])
    p.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        default=[1, 2, 3],
        help="the seeds (the budget was chosen on seed 11: docs/results.md)",
    )
    p.add_argument("--frame-height", type=int, default=60)
    p.add_argument("--frame-width", type=int, default=80)
    p.add_argument("--total-timesteps", type=int, default=409_600)
    p.add_argument("--camal-coefs", type=float, nargs="+", default=[1.0], help="lambda of each CAMAL configuration")
    p.add_argument(
        "--cams",
        nargs="+",
        default=["abs"],
        choices=benchmark.CAM_KINDS,
        help="--cam of each CAMAL configuration; vanilla runs with the first and is measured under each",
    )
    p.add_argument(
        "--threshold",
        type=float,
        help="the return a learned agent reaches (default per scenario: THRESHOLDS)",
    )
    p.add_argument(
        "--random-margin", type=float, default=0.0, help="how far above a random policy's return a learned agent is"
    )
    p.add_argument(
        "--reference",
        action="store_true",
        help="also train Stable-Baselines3's PPO on the same frames (requirements-bench.txt)",
    )
    p.add_argument("--reference-episodes", type=int, default=10, help="evaluation episodes of each SB3 agent")
    p.add_argument(
        "--reference-margin", type=float, default=15.0, help="how far below SB3's mean evaluation return ours may fall"
    )
    p.add_argument("--workers", type=int, default=2, help="runs at a time (each gets cores / workers CPU threads)")
    p.add_argument("--curve-points", type=int, default=40, help="points of the step grid of the curves")
    p.add_argument("--records", help="a folder to keep each run's record in (eval.json, args.json, curves)")
    p.add_argument(
        "--from-records",
        help="analyse the runs kept in this --records folder instead of training them (no checkpoints, no events)",
    )
    p.add_argument(
        "--train-args",
        default="",
        help="more ppo_camal_vizdoom.py flags for every run, one string (e.g. --reward-scale 0.01)",
    )
    args = p.parse_args(argv)
    problems = []
    if any(s < 0 for s in args.seeds) or len(set(args.seeds)) != len(args.seeds):
        problems.append(f"--seeds must be distinct and not negative, got {args.seeds}")
    if any(not (np.isfinite(c) and c > 0) for c in args.camal_coefs):
        problems.append(f"--camal-coefs must be positive numbers, got {args.camal_coefs}")
    if args.workers < 1 or args.curve_points < 2 or args.total_timesteps < 1 or args.reference_episodes < 1:
        problems.append(
            "--workers, --total-timesteps and --reference-episodes must be at least 1, --curve-points at least 2"
        )
    if args.threshold is None:
        args.threshold = THRESHOLDS[args.env]
    if not all(np.isfinite(v) for v in (args.threshold, args.reference_margin, args.random_margin)):
        problems.append("--threshold, --reference-margin and --random-margin must be numbers")
    flags = args.train_args.split()
    if any(f.split("=")[0] in ("--camal-coef", "--cam", "--method", "--seed", "--env", "--resume") for f in flags):
        problems.append(
            f"--train-args may not set what the benchmark sets (--camal-coef, --cam, --method, --seed, --env): {flags}"
        )
    for flag, folder in (("--out", args.out), ("--records", args.records)):
        if folder and Path(folder).exists() and not Path(folder).is_dir():
            problems.append(f"{flag} {folder} is a file")
    if args.from_records and not Path(args.from_records).is_dir():
        problems.append(f"--from-records {args.from_records} is not a folder")
    if args.from_records and args.records:
        problems.append("--from-records analyses records already kept: --records would only copy them")
    if problems:
        p.exit(2, "error: " + "; ".join(problems) + "\n")
    return args


def passthrough(args):
    """The ppo_camal_vizdoom.py flags every cell gets; benchmark.py names a cell by them, so a rerun finds its cells."""
    flags = ["--frame-height", str(args.frame_height), "--frame-width", str(args.frame_width)]
    return flags + ["--total-timesteps", str(args.total_timesteps), "--save-model", *args.train_args.split()]


def configs(args):
    """(lambda, cam) of every CAMAL configuration, in the order given."""
    return [(c, cam) for c in dict.fromkeys(args.camal_coefs) for cam in dict.fromkeys(args.cams)]


def coef_flags(coef):
    return (
        [] if coef == 1.0 else ["--camal-coef", f"{coef:g}"]
    )  # the default adds no flag: its cells are the plain ones


def cells(args, out):
    """benchmark.py's cells of this check: {"vanilla": [...], (lambda, cam): [...]}, one per seed. Vanilla runs once,
    with the first of --cams (so abs, the default, shares its cells with every later call that lists abs first): it
    trains without a CAM, and its evaluation measures the IoU under each."""

    def make(method, cam, seed, extra):
        return benchmark.Cell("drl", {"env": args.env, "method": method, "cam": cam, "seed": seed}, extra, out, 10)

    first = list(dict.fromkeys(args.cams))[0]
    found = {"vanilla": [make("vanilla", first, s, passthrough(args)) for s in args.seeds]}
    for coef, cam in configs(args):
        found[coef, cam] = [make("camal", cam, s, passthrough(args) + coef_flags(coef)) for s in args.seeds]
    return found


def has_record(folder, name):
    """Whether folder/name holds a whole record: its curves and its evaluation (ours or SB3's)."""
    record = Path(folder) / name
    return (record / "curves.json").is_file() and any(
        (record / f).is_file() for f in ("eval.json", "reference_eval.json")
    )


def recorded(args, cell):
    """Whether a cell is kept under --records and has no run in --out: its record stands in for it, untrained again."""
    return bool(args.records) and not cell.runs() and has_record(args.records, cell.id)


def run_cells(args, out, grid):
    """benchmark.py over vanilla and every CAMAL configuration (one invocation per lambda), all in out/cells; where
    --records already holds some cells, one invocation per configuration, over the seeds that still need a run."""
    base = [sys.executable, str(ROOT / "benchmark.py"), "--preset", "drl", "--envs", args.env, "--out", str(out)]
    base += ["--workers", str(args.workers), "--no-analysis"]
    coefs, cams = list(dict.fromkeys(args.camal_coefs)), ["--cams", *dict.fromkeys(args.cams)]
    calls = [(args.seeds, cams + ["--methods", "vanilla", *(["camal"] if 1.0 in coefs else [])])]
    calls += [(args.seeds, cams + ["--methods", "camal", *coef_flags(c)]) for c in coefs if c != 1.0]
    if any(recorded(args, c) for found in grid.values() for c in found):
        calls = []
        for key, found in grid.items():
            kept = [c.axes["seed"] for c in found if recorded(args, c)]
            seeds = [s for s in args.seeds if s not in kept]
            method, coef = ("vanilla", []) if key == "vanilla" else ("camal", coef_flags(key[0]))
            name = "vanilla" if key == "vanilla" else f"CAMAL lambda {key[0]:g}, --cam {key[1]}"
            if seeds:
                calls.append((seeds, ["--cams", found[0].axes["cam"], "--methods", method, *coef]))
            if kept:
                print(f"[drl_learning] {name}: seeds {kept} from their records in {args.records}", flush=True)
    for seeds, call in calls:
        cmd = base + ["--seeds", *map(str, seeds)] + passthrough(args) + call
        print(f"[drl_learning] {' '.join(cmd[1:])}", flush=True)
        code = subprocess.run(cmd, cwd=out).returncode
        if code:
            raise SystemExit(
                f"error: benchmark.py exited with {code} (cells and logs in {out / 'cells'}); rerun this command to "
                "resume"
            )


def finished_runs(cells):
    """Each cell's run folder with its eval.json; SystemExit naming a cell that has none."""
    runs = []
    for cell in cells:
        done = [r for r in cell.runs() if (r / "eval.json").is_file()]
        if not done:
            raise SystemExit(f"error: cell {cell.folder} has no finished run; rerun this command to resume it")
        runs.append(done[-1])
    return runs


def run_references(args, out):
    """SB3's PPO per seed into out/reference/seed_N (skipped where its reference_eval.json is there, or its record under
    --records), --workers at a time."""
    ref = out / "reference"
    ref.mkdir(exist_ok=True)
    scale = next(
        (float(v) for k, v in zip(args.train_args.split(), args.train_args.split()[1:]) if k == "--reward-scale"), 1.0
    )
    threads = str(max(1, (os.cpu_count() or 1) // args.workers))

    def one(seed):
        folder = ref / f"seed_{seed}"
        if (folder / "reference_eval.json").is_file() or kept_reference(args, out, seed):
            return 0
        shutil.rmtree(folder, ignore_errors=True)  # an interrupted SB3 run restarts: it keeps no checkpoint
        cmd = [sys.executable, str(ROOT / "benchmarks" / "sb3_ppo_vizdoom.py"), "--env", args.env, "--seed", str(seed)]
        cmd += ["--frame-height", str(args.frame_height), "--frame-width", str(args.frame_width)]
        cmd += ["--total-timesteps", str(args.total_timesteps), "--reward-scale", str(scale), "--out", str(folder)]
        cmd += ["--eval-episodes", str(args.reference_episodes)]
        env = dict(os.environ, OMP_NUM_THREADS=threads)
        with open(ref / f"seed_{seed}.log", "w") as log:
            code = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env).returncode
        print(f"[drl_learning] SB3 PPO seed {seed}: exit code {code} (log: {ref / f'seed_{seed}.log'})", flush=True)
        return code

    with ThreadPoolExecutor(args.workers) as pool:
        codes = list(pool.map(one, args.seeds))
    if any(codes):
        raise SystemExit(f"error: the SB3 reference failed; see {ref}/seed_*.log")
    return [kept_reference(args, out, s) or ref / f"seed_{s}" for s in args.seeds]


def kept_reference(args, out, seed):
    """SB3's record of a seed under --records, standing in for a run that out/reference lacks (None: none there)."""
    trained = out / "reference" / f"seed_{seed}" / "reference_eval.json"
    kept = bool(args.records) and has_record(args.records, reference_name(args, seed))
    return Path(args.records) / reference_name(args, seed) if kept and not trained.is_file() else None


def reference_name(args, seed):
    """SB3's record folder of one seed under --records."""
    return f"reference__{args.env}__{args.frame_height}x{args.frame_width}__{args.total_timesteps}__seed_{seed}"


def recorded_runs(args, grid):
    """Under --from-records: the record folder of each cell's run, and SB3's per seed with --reference; exit 2 naming
    every record that is not there."""
    names = [c.id for found in grid.values() for c in found]
    names += [reference_name(args, s) for s in args.seeds] if args.reference else []
    missing = [n for n in names if not has_record(args.from_records, n)]
    if missing:
        bad(
            f"--from-records {args.from_records} has no record of {', '.join(missing)} (kept by a run of this "
            "command with the same settings and --records)"
        )
    return {n: Path(args.from_records) / n for n in names}


def read_record(path, *keys):
    """A run's or record's JSON object holding these keys (stats.py's reader); exit 2 naming a damaged one (a record may
    be hand-copied)."""
    try:
        found = stats.read_json(str(path))
    except stats.RunFileError as e:
        bad(f"{path} cannot be read ({e})")
    if any(k not in found for k in keys):
        bad(f"{path} cannot be read (it lacks one of {', '.join(keys)})")
    return found


def bad(message):
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def curve(run_dir, key, edges):
    """A run's training curve ("return" or "iou") binned on the step grid: from its events, or from the curves.json
    of its record (exit 2 where that was binned on another grid)."""
    kept = Path(run_dir) / "curves.json"
    if kept.is_file() and not list(Path(run_dir).glob("events.out.tfevents.*")):
        record = read_record(kept, "steps", key)
        if len(record["steps"]) != len(edges) - 1 or not np.allclose(record["steps"], edges[1:]):
            bad(
                f"{run_dir}'s curves were binned on another step grid (--total-timesteps, --curve-points) than this "
                "command's"
            )
        return np.array([np.nan if v is None else v for v in record[key]], dtype=float)
    tag = {"return": "charts/episodic_return", "iou": "charts/attention_iou"}[key]
    steps, values = stats.scalar_series(stats.read_tensorboard(str(run_dir)), tag)
    return stats.binned(steps, values, edges)


def first_reach(row, edges, threshold):
    """The grid step at which a run's binned training return first reaches the threshold (None: never)."""
    hit = np.flatnonzero(row >= threshold)
    return int(edges[1:][hit[0]]) if len(hit) else None


def run_stats(out, name, runs):
    """stats.py over one CAMAL configuration's runs and vanilla's; its stats.json."""
    folder = out / "stats" / name
    folder.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, str(ROOT / "stats.py"), *map(str, runs), "--out", str(folder)]
    with open(folder / "stats.md", "w") as f:
        code = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT).returncode
    if code:
        raise SystemExit(f"error: stats.py exited with {code}; see {folder / 'stats.md'}")
    return json.loads((folder / "stats.json").read_text())


def returns(evals):
    return " ".join(f"{e['mean_return']:.1f}" for e in evals)


def above_random(evals, margin):
    """Whether every run's evaluation return beats the random policy's on its games by `margin`, and the random
    policy's returns per seed as text ("-" for an eval.json written before it was measured)."""
    known = [e.get("random_mean_return") for e in evals]
    ok = all(r is not None and e["mean_return"] >= r + margin for e, r in zip(evals, known))
    return ok, " ".join("-" if r is None else f"{r:.1f}" for r in known)


def ious(values):
    return " ".join("—" if v is None else f"{v:.3f}" for v in values)


def plot(path, groups, edges, env, threshold):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    x = edges[1:]
    for name, g in groups.items():
        for ax, key in zip(axes, ("return", "iou")):
            if key not in g:
                continue
            mean, band = stats.mean_band(np.array(g[key]))
            line = ax.plot(
                x, mean, label=f"{name} ({len(g[key])} seeds)", linestyle="--" if name.startswith("SB3") else "-"
            )[0]
            ax.fill_between(x, mean - band, mean + band, alpha=0.15, color=line.get_color())
    axes[0].axhline(threshold, color="grey", linewidth=0.8, linestyle=":")
    axes[0].set_title(f"{env}: training return (charts/episodic_return), mean and 95 % band")
    axes[1].set_title(f"{env}: training attention IoU (charts/attention_iou, own CAM)")
    for ax in axes:
        ax.set_xlabel("global step")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def keep_records(folder, runs, edges, group, names=None):
    """Each run's record in folder/<cell>/ (or folder/<names[i]>/): what stats.py reads (eval.json, args.json), which
    code made it (environment.json), SB3's reference_eval.json, and its binned training curves (group: tag -> one row
    per run); a record there is replaced."""
    for i, run in enumerate(runs):
        if run.parent.resolve() == Path(folder).resolve():  # a record standing in for its run: already kept
            continue
        record = Path(folder) / (names[i] if names else run.parent.parent.name)
        record.mkdir(parents=True, exist_ok=True)
        for name in ("eval.json", "args.json", "environment.json", "reference_eval.json"):
            if (run / name).is_file():
                stats.write_json(str(record / name), json.loads((run / name).read_text()), indent=1)
        rows = {tag: group[tag][i].tolist() for tag in group}
        stats.write_json(str(record / "curves.json"), stats.clean({"steps": edges[1:].tolist(), **rows}), indent=1)


def main(argv=None):
    args = parse(sys.argv[1:] if argv is None else argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    grid = cells(args, out)
    if args.from_records:  # a session's runs are gone, their records are not: the analysis needs no more
        record_of = recorded_runs(args, grid)

        def finished(found):
            return [record_of[c.id] for c in found]

        refs = [record_of[reference_name(args, s)] for s in args.seeds] if args.reference else []
    else:
        run_cells(args, out, grid)

        def finished(found):
            return [Path(args.records) / c.id if recorded(args, c) else finished_runs([c])[0] for c in found]

        refs = run_references(args, out) if args.reference else []
    print(f"[drl_learning] runs done in {time.time() - start:.0f} s; analysing", flush=True)

    edges = np.linspace(0, args.total_timesteps, args.curve_points + 1)
    vanilla = finished(grid["vanilla"])
    groups, rows, checks = {}, [], []
    van_eval = [read_record(r / "eval.json", "mean_return") for r in vanilla]
    name = f"vanilla (IoU curve: --cam {grid['vanilla'][0].axes['cam']})"
    groups[name] = {
        "return": [curve(r, "return", edges) for r in vanilla],
        "iou": [curve(r, "iou", edges) for r in vanilla],
    }
    reach = {"vanilla": [first_reach(c, edges, args.threshold) for c in groups[name]["return"]]}
    kept = [(name, vanilla)]
    checks.append(
        (
            f"vanilla: evaluation return >= {args.threshold:g} in every seed",
            all(e["mean_return"] >= args.threshold for e in van_eval),
        )
    )
    checks.append(
        (
            f"vanilla: above the random policy by {args.random_margin:g} in every seed",
            above_random(van_eval, args.random_margin)[0],
        )
    )
    for coef, cam in configs(args):
        name = f"CAMAL lambda {coef:g}, --cam {cam}"
        runs = finished(grid[coef, cam])
        evals = [read_record(r / "eval.json", "mean_return") for r in runs]
        groups[name] = {
            "return": [curve(r, "return", edges) for r in runs],
            "iou": [curve(r, "iou", edges) for r in runs],
        }
        reach[name] = [first_reach(c, edges, args.threshold) for c in groups[name]["return"]]
        kept.append((name, runs))
        st = run_stats(out, f"camal_{coef:g}_{cam}", runs + vanilla)
        # e.g. runs of two experiments: stats.py says why it paired nothing
        if set(st["drl"]["metrics"]) != {"return", "iou"}:
            why = "; ".join(sorted({i["reason"] for i in st["incomplete"]}) or st.get("nothing_compared", []))
            raise SystemExit(
                f"error: stats.py compared no {name} runs with vanilla's ({why}); see "
                f"{out / 'stats' / f'camal_{coef:g}_{cam}' / 'stats.md'}"
            )
        poi = {m: st["drl"]["metrics"][m]["poi"]["vanilla"] for m in ("return", "iou")}
        van_iou = [e["by_cam"][cam]["mean_iou"] for e in van_eval]
        rows.append((name, evals, van_iou, poi))
        checks.append(
            (
                f"{name}: evaluation return >= {args.threshold:g} in every seed",
                all(e["mean_return"] >= args.threshold for e in evals),
            )
        )
        checks.append(
            (
                f"{name}: above the random policy by {args.random_margin:g} in every seed",
                above_random(evals, args.random_margin)[0],
            )
        )
        checks.append(
            (
                f"{name}: evaluation IoU above vanilla's (under --cam {cam}) in every seed, probability of improvement "
                "significant",
                all(e["mean_iou"] is not None and v is not None and e["mean_iou"] > v for e, v in zip(evals, van_iou))
                and poi["iou"]["significant"],
            )
        )
    if refs:
        ref_eval = [read_record(r / "reference_eval.json", "mean_return") for r in refs]
        groups["SB3 PPO (reference)"] = {"return": [curve(r, "return", edges) for r in refs]}
        reach["SB3 PPO (reference)"] = [
            first_reach(c, edges, args.threshold) for c in groups["SB3 PPO (reference)"]["return"]
        ]
        ours, theirs = np.mean([e["mean_return"] for e in van_eval]), np.mean([e["mean_return"] for e in ref_eval])
        checks.append(
            (
                f"our vanilla PPO's mean evaluation return ({ours:.1f}) >= SB3's ({theirs:.1f}) - "
                f"{args.reference_margin:g}",
                ours >= theirs - args.reference_margin,
            )
        )

    seeds = " ".join(map(str, args.seeds))
    print(
        f"\n## {args.env} at {args.frame_height} x {args.frame_width}, {args.total_timesteps} steps, seeds {seeds} "
        f"{args.train_args}\n"
    )
    print(
        "| run | evaluation return per seed | mean | a random policy's, per seed | evaluation IoU per seed | vanilla's "
        "IoU (same CAM) | P(CAMAL > vanilla), return | P(CAMAL > vanilla), IoU |"
    )
    print("|---|---|---|---|---|---|---|---|")
    van_mean = np.mean([e["mean_return"] for e in van_eval])
    print(f"| vanilla | {returns(van_eval)} | {van_mean:.1f} | {above_random(van_eval, 0)[1]} | | | | |")
    for name, evals, van_iou, poi in rows:
        p = {m: f"{poi[m]['p']:.2f} [{poi[m]['ci95'][0]:.2f}, {poi[m]['ci95'][1]:.2f}]" for m in poi}
        print(
            f"| {name} | {returns(evals)} | {np.mean([e['mean_return'] for e in evals]):.1f} | "
            f"{above_random(evals, 0)[1]} | {ious([e['mean_iou'] for e in evals])} | {ious(van_iou)} "
            f"| {p['return']} | {p['iou']} |"
        )
    if refs:
        print(
            f"| SB3 PPO (reference) | {returns(ref_eval)} | {np.mean([e['mean_return'] for e in ref_eval]):.1f} | | | "
            "| | |"
        )
    print(
        f"\nsteps until the training return (binned over {args.total_timesteps // args.curve_points} steps) first "
        f"reaches {args.threshold:g}:"
    )
    for name, r in reach.items():
        print(f"- {name}: " + ", ".join(f"seed {s}: {'never' if v is None else v}" for s, v in zip(args.seeds, r)))
    plot(out / "drl_learning.png", groups, edges, args.env, args.threshold)
    for name, runs in kept if args.records else []:
        keep_records(args.records, runs, edges, groups[name])
    if args.records and refs:  # stats.py passes these folders by: they hold no eval.json
        names = [reference_name(args, s) for s in args.seeds]
        keep_records(args.records, refs, edges, groups["SB3 PPO (reference)"], names)
    summary = {name: {k: [row.tolist() for row in v] for k, v in g.items()} for name, g in groups.items()}
    stats.write_json(
        str(out / "curves.json"), stats.clean({"steps": edges[1:].tolist(), "groups": summary, "first_reach": reach})
    )
    print(
        f"\nfigure: {out / 'drl_learning.png'}; stats.py's reports: {out / 'stats'}/*/stats.md; total "
        f"{time.time() - start:.0f} s\n"
    )
    for name, ok in checks:
        print(f"{'PASS' if ok else 'FAIL'}: {name}")
    return 0 if all(ok for _, ok in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
