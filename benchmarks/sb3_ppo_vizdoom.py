"""A reference for our PPO: Stable-Baselines3's PPO on ppo_camal_vizdoom.py's own frames, with Table 8's
hyperparameters.

    pip install -r requirements-bench.txt
    python benchmarks/sb3_ppo_vizdoom.py --env Basic --seed 1 --frame-height 60 --frame-width 80 \\
        --total-timesteps 409600

The game, the frames (grayscale, resized, 4 stacked), the frame skip and the reward clip are ppo_camal_vizdoom.py's
VizDoomEnv and rollout; the learner is SB3's PPO with its CnnPolicy (the same Nature CNN, shared by actor and critic,
orthogonal init, Adam with eps 1e-5, the learning rate annealed linearly to 0). If our PPO had a defect, its learning
curve would fall below this one. What SB3 does differently, by its own design: the value loss is the plain squared error
(ours: CleanRL's clipped value loss), and a truncated episode (Basic's 300-tic timeout) is bootstrapped from the value
of its last frame (ours: CleanRL treats it as an end).

The run folder gets TensorBoard events with `charts/episodic_return` (the unclipped game return, at the global step
where each episode ended, as ppo_camal_vizdoom.py logs it), args.json and, after --eval-episodes episodes with the
trained policy (sampled actions), reference_eval.json. Exit code 2 on bad input, or when stable-baselines3 is not
installed.
"""

import argparse
import importlib.util
import math
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def load_ppo():
    spec = importlib.util.spec_from_file_location("ppo_camal_vizdoom", ROOT / "ppo_camal_vizdoom.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def parse(argv):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
    )
    p.add_argument("--env", default="Basic", choices=["Basic", "DefendLine", "DefendCenter", "TakeCover"])
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--frame-height", type=int, default=60)
    p.add_argument("--frame-width", type=int, default=80)
    p.add_argument("--total-timesteps", type=int, default=409_600)
    p.add_argument("--num-envs", type=int, default=8)
    p.add_argument(
        "--reward-scale",
        type=float,
        default=1.0,
        help="rewards times this before the [-1, 1] clip (as ppo_camal_vizdoom.py)",
    )
    p.add_argument("--eval-episodes", type=int, default=10)
    p.add_argument("--out", default=None, help="the run folder (default: runs/{env}__sb3_ppo__{seed}__{time})")
    args = p.parse_args(argv)
    problems = []
    if args.seed < 0:
        problems.append(f"--seed must not be negative, got {args.seed}")
    if args.num_envs < 1 or args.eval_episodes < 0:
        problems.append("--num-envs must be at least 1 and --eval-episodes not negative")
    if args.total_timesteps < args.num_envs * 128:
        problems.append(f"--total-timesteps {args.total_timesteps} is less than one rollout ({args.num_envs} x 128)")
    if not (math.isfinite(args.reward_scale) and args.reward_scale > 0):
        problems.append(f"--reward-scale must be a positive number, got {args.reward_scale}")
    if problems:
        p.exit(2, "error: " + "; ".join(problems) + "\n")
    return args


def main(argv=None):
    args = parse(sys.argv[1:] if argv is None else argv)
    try:
        import gymnasium as gym
        import torch
        from stable_baselines3 import PPO
        from stable_baselines3.common.callbacks import BaseCallback
        from stable_baselines3.common.monitor import Monitor
        from stable_baselines3.common.vec_env import DummyVecEnv
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:
        print(
            f"error: the reference PPO needs stable-baselines3 ({e}): pip install -r requirements-bench.txt",
            file=sys.stderr,
        )
        return 2
    ppo = load_ppo()
    try:
        ppo.nature_cnn_output_size(args.frame_height, args.frame_width)
        ppo.render_resolution(args.frame_height, args.frame_width)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    class Frames(gym.Wrapper):
        """VizDoomEnv's newest frames, stacked as ppo_camal_vizdoom.py's stack_frames does (an episode's first frame
        fills the stack), without the mask (it is CAMAL's): a Box SB3's CnnPolicy reads channels first."""

        def __init__(self, env, stack=4):
            super().__init__(env)
            h, w = env.observation_space["frame"].shape
            self.observation_space = gym.spaces.Box(0, 255, (stack, h, w), np.uint8)
            self.frames = np.zeros((stack, h, w), np.uint8)

        def reset(self, **kw):
            obs, info = self.env.reset(**kw)
            self.frames[:] = obs["frame"]
            return self.frames.copy(), info

        def step(self, action):
            obs, reward, term, trunc, info = self.env.step(action)
            if not (term or trunc):  # an episode's end has no new frame: its last stack stands
                self.frames = np.concatenate((self.frames[1:], obs["frame"][None]))
            return self.frames.copy(), reward, term, trunc, info

    class Clip(gym.RewardWrapper):
        """Table 8's clip after --reward-scale, as ppo_camal_vizdoom.py's rollout does; Monitor below it sees the game's
        reward."""

        def reward(self, reward):
            return float(np.clip(reward * args.reward_scale, -1.0, 1.0))

    def make():
        return Clip(Monitor(Frames(ppo.VizDoomEnv(args.env, 4, args.frame_height, args.frame_width))))

    run_dir = Path(args.out or f"runs/{args.env}__sb3_ppo__{args.seed}__{int(time.time())}")
    run_dir.mkdir(parents=True, exist_ok=True)
    ppo.write_json(str(run_dir / "args.json"), vars(args), indent=2)
    writer = SummaryWriter(str(run_dir))

    class Episodes(BaseCallback):
        """charts/episodic_return at the global step where each episode ended, and a progress line per 10 rollouts."""

        def __init__(self):
            super().__init__()
            self.rollouts, self.start, self.recent = 0, time.time(), []

        def _on_step(self):
            for info in self.locals["infos"]:
                if "episode" in info:
                    writer.add_scalar("charts/episodic_return", info["episode"]["r"], self.num_timesteps)
                    writer.add_scalar("charts/episodic_length", info["episode"]["l"], self.num_timesteps)
                    self.recent.append(info["episode"]["r"])
            return True

        def _on_rollout_end(self):
            self.rollouts += 1
            sps = int(self.num_timesteps / (time.time() - self.start))
            writer.add_scalar("charts/SPS", sps, self.num_timesteps)
            if self.rollouts % 10 == 0:
                mean = f"{np.mean(self.recent):.2f}" if self.recent else "-"
                print(
                    f"sb3 global_step={self.num_timesteps} SPS={sps} episodes={len(self.recent)} mean_return={mean}",
                    flush=True,
                )
                self.recent = []

    envs = DummyVecEnv([make for _ in range(args.num_envs)])  # PPO(seed=...) seeds them: env i with seed + i
    lr = 2.5e-4
    model = PPO(
        "CnnPolicy",
        envs,
        learning_rate=lambda remaining: remaining * lr,  # annealed linearly to 0, as --anneal-lr
        n_steps=128,
        batch_size=args.num_envs * 128 // 4,  # 4 minibatches
        n_epochs=4,
        gamma=0.99,
        gae_lambda=0.95,
        clip_range=0.1,
        ent_coef=0.01,
        vf_coef=0.5,
        max_grad_norm=0.5,
        seed=args.seed,
        device="cpu" if not torch.cuda.is_available() else "cuda",
        verbose=0,
    )
    print(
        f"sb3 PPO on {args.env} {args.frame_height} x {args.frame_width}, seed {args.seed}, {args.total_timesteps} "
        f"steps -> {run_dir}",
        flush=True,
    )
    model.learn(total_timesteps=args.total_timesteps, callback=Episodes())
    writer.close()
    envs.close()
    if args.eval_episodes:
        env = make()
        returns = []
        for i in range(args.eval_episodes):
            obs, _ = env.reset(seed=args.seed + 1_000_003 + i)
            done = False
            while not done:
                action, _ = model.predict(obs, deterministic=False)
                obs, _, term, trunc, info = env.step(int(action))
                done = term or trunc
            returns.append(info["episode"]["r"])
        env.close()
        result = {"env": args.env, "method": "sb3_ppo", "seed": args.seed, "total_timesteps": model.num_timesteps}
        result |= {"mean_return": float(np.mean(returns)), "episodic_returns": [float(r) for r in returns]}
        # not eval.json: stats.py would take it for a run of ppo_camal_vizdoom.py
        ppo.write_json(str(run_dir / "reference_eval.json"), result, indent=2)
        print(f"eval: mean_return={result['mean_return']:.2f} over {len(returns)} episodes", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
