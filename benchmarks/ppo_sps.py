"""Steps per second of ppo_camal_vizdoom.py: env alone, vanilla PPO, PPO + CAMAL, in one run.

    python benchmarks/ppo_sps.py                      # 60 x 80, 8 envs, TakeCover, CPU, async and sync envs
    python benchmarks/ppo_sps.py --vector async       # worker-process envs only
    python benchmarks/ppo_sps.py --frame-height 240 --frame-width 320 --cuda

Machines are shared and noisy: read the ratios, not the absolute numbers. Each figure is the median of
--rounds measurements taken in turn (env, vanilla, camal, env, vanilla, ...). Training SPS is the steady
state: steps over wall time between the events of the first and the last iteration, so start-up and the
first iteration's warm-up are left out. Targets (issue 2): camal >= 0.85 x vanilla, and at 60 x 80 on a
CPU, training >= 40 % of env-only.
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
    """Run the real script; steady-state SPS from its TensorBoard event wall times."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    batch = opts.num_envs * opts.num_steps
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [
            sys.executable,
            str(SCRIPT),
            "--env",
            opts.env,
            "--method",
            method,
            "--num-envs",
            str(opts.num_envs),
            "--num-steps",
            str(opts.num_steps),
            "--total-timesteps",
            str(batch * opts.iterations),
            "--frame-height",
            str(opts.frame_height),
            "--frame-width",
            str(opts.frame_width),
            "--eval-episodes",
            "0",
            "--image-every",
            "0",
            "--vector-env",
            "async" if async_envs else "sync",
            "--cuda" if opts.cuda else "--no-cuda",
        ]
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
    opts = p.parse_args()

    ppo = load_ppo()
    modes = {"async": [True], "sync": [False], "both": [True, False]}[opts.vector]
    results = {}
    for _ in range(opts.rounds):
        for async_envs in modes:
            tag = "async" if async_envs else "sync"
            results.setdefault((tag, "env"), []).append(env_only_sps(ppo, opts, async_envs, opts.env_seconds))
            for method in ("vanilla", "camal"):
                results.setdefault((tag, method), []).append(training_sps(opts, method, async_envs))

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


if __name__ == "__main__":
    main()
