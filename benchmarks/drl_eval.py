"""More evaluation episodes for trained agents: each run's saved policy plays --episodes episodes, and a random policy
the same games, as ppo_camal_vizdoom.py's own evaluation does at the end of training (its functions, its eval.json).

    python benchmarks/drl_eval.py RUN... --episodes 100 --out takecover_eval100
    python stats.py takecover_eval100      # SBCI and probability of improvement over the longer evaluations

Ten episodes (the trainer's default) separate Basic's agents from chance; TakeCover's returns spread too widely for
that (a random policy's ten episodes ranged from 106 to 765). Each run (trained with --save-model) gets
OUT/<run name>/ with eval.json (the trainer's format: stats.py reads it), args.json (the run's), environment.json
(which code played) and reevaluation.json (the run it came from). The games start from the trainer's evaluation seeds,
so the first episode of each game starts as the trainer's did; the actions are sampled from a generator seeded with the
run's seed, so a second call plays the same episodes. Bad input: a message and exit code 2, before any play.
"""

import argparse
import dataclasses
import importlib.util
import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def load(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


figure = load("drl_attention_figure")  # its loader: weights only, the run's own settings checked
ppo = figure.ppo


def parse(argv):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
    )
    p.add_argument("runs", nargs="+", help="run folders of ppo_camal_vizdoom.py saved with --save-model")
    p.add_argument("--episodes", type=int, default=100, help="evaluation episodes per run")
    p.add_argument("--out", required=True, help="the folder that gets one evaluation folder per run")
    args = p.parse_args(argv)
    if args.episodes < 1:
        p.exit(2, f"error: --episodes must be at least 1, got {args.episodes}\n")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        p.exit(2, f"error: --out {args.out} is a file\n")
    return args


def main(argv=None):
    args = parse(sys.argv[1:] if argv is None else argv)
    agents = []
    for run in args.runs:  # every run is checked before the first one plays
        try:
            run_args, agent = figure.load_saved_agent(run)
        except ValueError as e:  # RunFileError is a ValueError
            print(f"error: {e}", file=sys.stderr)
            return 2
        agents.append((run, dataclasses.replace(run_args, eval_episodes=args.episodes, cuda=False), agent))
    names = [os.path.basename(os.path.normpath(run)) for run, _, _ in agents]
    if len(set(names)) < len(names):
        print(
            f"error: two runs share a folder name ({names}): their evaluations would overwrite each other",
            file=sys.stderr,
        )
        return 2
    for (run, run_args, agent), name in zip(agents, names):
        folder = Path(args.out) / name
        folder.mkdir(parents=True, exist_ok=True)
        trained = Path(run, "eval.json")  # the steps the run trained for, as its own evaluation recorded them
        step = ppo.read_json(str(trained)).get("total_timesteps") if trained.is_file() else run_args.total_timesteps
        envs = ppo.make_envs(run_args)
        torch.manual_seed(run_args.seed)  # the policy's sampled actions: the same evaluation on every call
        try:
            episodes = ppo.evaluate(agent, envs, run_args, torch.device("cpu"))
            by_chance = ppo.random_returns(envs, run_args)
        finally:
            envs.close()
        with ppo.SummaryWriter(str(folder)) as writer:
            ppo.report_evaluation(episodes, by_chance, run_args, writer, str(folder), step)
        ppo.write_json(str(folder / "args.json"), ppo.read_json(os.path.join(run, "args.json")), indent=2)
        ppo.write_json(str(folder / "reevaluation.json"), {"run": os.path.abspath(run), "episodes": args.episodes})
        ppo.record_environment(str(folder), torch.device("cpu"))
        print(f"[drl_eval] {run} -> {folder}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
