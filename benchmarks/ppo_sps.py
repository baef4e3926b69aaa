"""Steps per second of ppo_camal_vizdoom.py: env alone, vanilla PPO, PPO + CAMAL, in one run.

    python benchmarks/ppo_sps.py                      # 60 x 80, 8 envs, TakeCover, CPU, async and sync envs
    python benchmarks/ppo_sps.py --vector async       # worker-process envs only
    python benchmarks/ppo_sps.py --frame-height 240 --frame-width 320 --cuda
    python benchmarks/ppo_sps.py --vector sync --reference   # + Stable-Baselines3's PPO (in-process games)

Machines are shared and noisy: read the ratios, not the absolute numbers. Each figure is the median of
--rounds measurements taken in turn (env, vanilla, camal, env, vanilla, ...). Training SPS is the steady
state: steps over wall time between the events of the first and the last iteration, so start-up and the
first iteration's warm-up are left out. --reference also times benchmarks/sb3_ppo_vizdoom.py (the same games,
frames and hyperparameters; its events mark each rollout's end) and prints vanilla / sb3. Targets (issue 2):
camal >= 0.85 x vanilla, and at 60 x 80 on a CPU, training >= 40 % of env-only.
"""

import argparse
import importlib.util
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "ppo_camal_vizdoom.py"
REFERENCE = ROOT / "benchmarks" / "sb3_ppo_vizdoom.py"


def load_ppo():
    spec = importlib.util.spec_from_file_location("ppo_camal_vizdoom", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def env_only_sps(ppo, opts, async_envs, seconds):
    """Random actions on the same vector env the trainer uses."""
    args = ppo.Args(
        env=opts.env,
        num_envs=opts.num_envs,
        frame_height=opts.frame_height,
        frame_width=opts.frame_width,
        vector_env="async" if async_envs else "sync",
    )
    envs = ppo.make_envs(args)
    try:
        envs.reset(seed=0)
        rng = np.random.default_rng(0)
        for _ in range(20):  # warm-up
            envs.step(rng.integers(0, envs.single_action_space.n, opts.num_envs))
        n, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            envs.step(rng.integers(0, envs.single_action_space.n, opts.num_envs))
            n += 1
        return n * opts.num_envs / (time.perf_counter() - start)
    finally:
        envs.close()


def training_sps(opts, method, async_envs):
    """Run the real script (method sb3: the reference); steady-state SPS from its TensorBoard event wall times."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    batch = opts.num_envs * opts.num_steps
    with tempfile.TemporaryDirectory() as tmp:
        shared = ["--env", opts.env, "--num-envs", str(opts.num_envs), "--eval-episodes", "0"]
        shared += ["--total-timesteps", str(batch * opts.iterations)]
        shared += ["--frame-height", str(opts.frame_height), "--frame-width", str(opts.frame_width)]
        if method == "sb3":  # its games are in-process (DummyVecEnv), its rollout 128 steps; it uses a GPU when present
            cmd = [sys.executable, str(REFERENCE), *shared, "--out", "runs/sb3"]
        else:
            cmd = [sys.executable, str(SCRIPT), *shared, "--method", method, "--num-steps", str(opts.num_steps)]
            cmd += ["--image-every", "0", "--vector-env", "async" if async_envs else "sync"]
            cmd += ["--cuda" if opts.cuda else "--no-cuda"]
        subprocess.run(cmd, cwd=tmp, check=True, stdout=subprocess.DEVNULL)
        (run_dir,) = (Path(tmp) / "runs").iterdir()
        acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
        acc.Reload()
        events = acc.Scalars("charts/SPS")
        first, last = events[0], events[-1]
        return (last.step - first.step) / (last.wall_time - first.wall_time)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--env", default="TakeCover")
    p.add_argument("--num-envs", type=int, default=8)
    p.add_argument("--num-steps", type=int, default=128)
    p.add_argument("--frame-height", type=int, default=60)
    p.add_argument("--frame-width", type=int, default=80)
    p.add_argument("--iterations", type=int, default=6, help="training iterations per measurement")
    p.add_argument("--env-seconds", type=float, default=8.0, help="seconds of env-only stepping per measurement")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--vector", choices=["async", "sync", "both"], default="both")
    p.add_argument("--cuda", action="store_true")
    p.add_argument("--reference", action="store_true", help="also time Stable-Baselines3's PPO (in-process games)")
    opts = p.parse_args()
    if opts.reference and opts.num_steps != 128:
        p.exit(2, f"error: --reference runs SB3 with 128-step rollouts, got --num-steps {opts.num_steps}\n")

    ppo = load_ppo()
    modes = {"async": [True], "sync": [False], "both": [True, False]}[opts.vector]
    results = {}
    for _ in range(opts.rounds):
        for async_envs in modes:
            tag = "async" if async_envs else "sync"
            results.setdefault((tag, "env"), []).append(env_only_sps(ppo, opts, async_envs, opts.env_seconds))
            for method in ("vanilla", "camal"):
                results.setdefault((tag, method), []).append(training_sps(opts, method, async_envs))
        if opts.reference:
            results.setdefault("sb3", []).append(training_sps(opts, "sb3", False))

    print(
        f"\n{opts.env}, {opts.frame_height} x {opts.frame_width}, {opts.num_envs} envs x {opts.num_steps} steps, "
        f"{'cuda' if opts.cuda else 'cpu'}, median of {opts.rounds}"
    )
    print(
        f"{'vector env':<11}{'env-only':>10}{'vanilla':>10}{'camal':>10}{'camal/vanilla':>15}{'vanilla/env':>13}"
        f"{'camal/env':>11}"
    )
    for async_envs in modes:
        tag = "async" if async_envs else "sync"
        env, van, cam = (float(np.median(results[(tag, k)])) for k in ("env", "vanilla", "camal"))
        print(f"{tag:<11}{env:>10.0f}{van:>10.0f}{cam:>10.0f}{cam / van:>15.2f}{van / env:>13.2f}{cam / env:>11.2f}")
    if opts.reference:
        sb3 = float(np.median(results["sb3"]))
        print(f"sb3 (in-process games): {sb3:.0f} SPS, each round {[round(v) for v in results['sb3']]}")
        for tag in [t for t in ("sync", "async") if (t, "vanilla") in results]:
            van = results[(tag, "vanilla")]
            ratios = [v / r for v, r in zip(van, results["sb3"])]
            print(f"vanilla ({tag}) / sb3: {np.median(ratios):.2f} (rounds {', '.join(f'{r:.2f}' for r in ratios)})")


if __name__ == "__main__":
    main()
