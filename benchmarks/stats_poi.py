"""What stats.py's vectorised probability of improvement saves, in one run.

    python benchmarks/stats_poi.py            # the paper's DRL shape: 5 runs x 4 environments per method

rliable's probability_of_improvement calls scipy's mannwhitneyu once per environment, and the stratified bootstrap
calls it once per resample. stats.py passes the same bootstrap a vectorised function with the same numbers
(tests/test_stats.py checks both). Both run here on the same resamples (same seed, --reps each), and the figures
are extrapolated to stats.py's default of 50,000 resamples. Read the ratio: machines are shared and noisy.
"""

import argparse
import importlib.util
import time
from pathlib import Path

import numpy as np
from rliable import library as rly
from rliable import metrics

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("stats", ROOT / "stats.py")
stats = importlib.util.module_from_spec(spec)
spec.loader.exec_module(stats)

parser = argparse.ArgumentParser()
parser.add_argument("--reps", type=int, default=2000)
parser.add_argument("--runs", type=int, default=5)
parser.add_argument("--envs", type=int, default=4)
args = parser.parse_args()

rng = np.random.default_rng(0)
x, y = rng.random((args.runs, args.envs)), rng.random((args.runs, args.envs))
results = {}
for name, fn in (("rliable", metrics.probability_of_improvement), ("stats.py", stats.probability_of_improvement)):
    np.random.seed(0)
    start = time.perf_counter()
    point, interval = rly.get_interval_estimates({"x": (x, y)}, fn, reps=args.reps)
    results[name] = (time.perf_counter() - start, float(point["x"]), np.ravel(interval["x"]).tolist())
for name, (sec, p, ci) in results.items():
    print(
        f"{name:>9}: {sec:7.2f} s for {args.reps} resamples ({sec * 50000 / args.reps:7.1f} s at 50,000); P = {p:.4f}, "
        f"CI = {ci}"
    )
assert results["rliable"][1:] == results["stats.py"][1:], "the two gave different numbers"
print(f"speed-up: {results['rliable'][0] / results['stats.py'][0]:.1f}x, identical estimates")
