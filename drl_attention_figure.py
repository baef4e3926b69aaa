"""The paper's Figure 11: two trained agents' attention on the same frames.

    python drl_attention_figure.py runs/Basic__*__camal__1__* runs/Basic__*__vanilla__1__*

The first run's policy plays its scenario. Frames with an object on screen are picked, spread over the play, and each
row shows the frame, its object mask and each agent's critic CAM (under the --cam it trained with) with its IoU. Both
runs must have been trained with --save-model, on the same scenario and frame geometry. Bad input: a message and exit
code 2, checked before the play.

It also prints each agent's mean IoU over every frame with an object beside that of two fixed maps, the same for every
frame: the agent's CAMs averaged, and the masks averaged (where objects usually are). A CAM that beats neither marks a
place, not the objects.
"""

import importlib.util
import os
import sys
from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np
import torch
import tyro

HERE = os.path.dirname(os.path.abspath(__file__))
_spec = importlib.util.spec_from_file_location("ppo_camal_vizdoom", os.path.join(HERE, "ppo_camal_vizdoom.py"))
ppo = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ppo)  # the trainer's agent, games and file helpers: the figure uses what trained the runs
MAX_STEPS = 2000  # a few episodes' worth of play to pick frames from


@dataclass
class Args:
    runs: tyro.conf.Positional[Tuple[str, str]]
    """two run folders saved with --save-model (e.g. camal, then vanilla); the first one's policy plays"""
    frames: int = 4
    """how many frames (with an object on screen) to draw, spread over the play"""
    out: Optional[str] = None
    """the PNG to write (default: figure11_{env}.png)"""
    seed: int = 1
    """seed of the play (the game's and the policy's sampling)"""
    tau: float = 0.7
    """the threshold on H for the IoU under each map"""


def load_saved_agent(run_dir):
    """(the run's Args, its Agent) from args.json and the saved weights (weights only: no code runs)."""
    if not os.path.isdir(run_dir):
        raise ValueError(
            f"{run_dir} is a file, not a run folder" if os.path.exists(run_dir) else f"{run_dir} does not exist"
        )
    args_path = os.path.join(run_dir, "args.json")
    if not os.path.lexists(args_path):
        raise ValueError(f"{run_dir} is not a run folder of ppo_camal_vizdoom.py (no args.json)")
    saved = ppo.read_json(args_path)
    try:
        run_args = ppo.Args(**{k: v for k, v in saved.items() if k in ppo.Args.__dataclass_fields__})
        ppo.check_args(run_args)
    except (TypeError, ValueError) as e:
        raise ppo.RunFileError(
            f"{args_path} does not hold ppo_camal_vizdoom.py's settings ({ppo.first_line(e)})"
        ) from None
    model_path = os.path.join(run_dir, f"{run_args.exp_name}.cleanrl_model")
    if not os.path.lexists(model_path):
        raise ValueError(f"{run_dir} has no {os.path.basename(model_path)}: train it with --save-model")
    state = ppo.read_torch(model_path)
    try:
        agent = ppo.Agent(
            state["actor.weight"].shape[0], run_args.frame_stack, run_args.frame_height, run_args.frame_width
        )
        agent.load_state_dict(state)
    except Exception as e:  # a file of another version, another frame size, or not a model at all: say which
        raise ppo.RunFileError(f"{model_path} is not a model of this run ({ppo.first_line(e)})") from None
    return run_args, agent.eval()


def check(args):
    """The figure's own flags, before the minutes of play."""
    if args.frames < 1:
        raise ValueError(f"--frames must be at least 1, got {args.frames}")
    if not 0.0 <= args.tau < 1.0:
        raise ValueError(f"--tau must lie in [0, 1), got {args.tau}")
    out = args.out if args.out is not None else "figure11.png"
    if not out or os.path.isdir(out):
        raise ValueError(f"--out {out!r}: give the PNG's path")
    folder = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(folder):
        raise ValueError(f"--out {out}: the folder {folder} does not exist")
    if ppo.unwritable(folder):
        raise ValueError(f"--out {out}: {ppo.unwritable(folder)}")


def play(run_args, agent, seed):
    """(stacked frames, masks) of the frames with an object on screen in MAX_STEPS steps of the agent's play."""
    env = ppo.VizDoomEnv(run_args.env, run_args.frame_skip, run_args.frame_height, run_args.frame_width)
    size = (run_args.frame_height, run_args.frame_width)
    torch.manual_seed(seed)
    frames, masks = [], []
    obs, _ = env.reset(seed=seed)
    stack, first = torch.zeros((1, run_args.frame_stack) + size, dtype=torch.uint8), torch.ones(1, dtype=torch.bool)
    try:
        for _ in range(MAX_STEPS):
            stack = ppo.stack_frames(stack, torch.from_numpy(obs["frame"])[None], first)
            if obs["mask"].any() and not obs["mask"].all():
                frames.append(stack[0])
                masks.append(torch.from_numpy(obs["mask"]).bool())
            with torch.no_grad():
                action = agent.get_action_and_value(stack)[0]
            obs, _, term, trunc, _ = env.step(int(action))
            first[:] = bool(term or trunc)
            if term or trunc:
                obs, _ = env.reset()
    finally:
        env.close()
    if not frames:
        raise ValueError(f"no frame of {run_args.env} showed an object in {MAX_STEPS} steps")
    return torch.stack(frames), torch.stack(masks)


def fixed_map_ious(cams, masks, tau):
    """Mean IoU over frames of each frame's own CAM, of one fixed map (the CAMs' mean over the frames, scaled to [0, 1])
    and of the masks' mean as a map: a CAM that only marks where objects usually are scores the fixed maps' IoU."""

    def iou(maps):
        return ppo.attention_iou(maps.expand_as(masks).contiguous(), masks, tau)[0].mean().item()

    def scaled(m):
        return (m - m.min()) / (m.max() - m.min()).clamp_min(1e-12)

    return iou(cams), iou(scaled(cams.mean(0, keepdim=True))), iou(scaled(masks.float().mean(0, keepdim=True)))


def draw(args):
    """Play, pick the frames, draw frame | mask | each run's CAM; the PNG's path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    check(args)
    (args_a, agent_a), (args_b, agent_b) = (load_saved_agent(d) for d in args.runs)
    for name in ("env", "frame_height", "frame_width", "frame_stack", "frame_skip"):
        if getattr(args_a, name) != getattr(args_b, name):
            raise ValueError(f"the runs differ in {name} ({getattr(args_a, name)} and {getattr(args_b, name)})")
    frames, masks = play(args_a, agent_a, args.seed)
    every = []  # each agent's CAM of every played frame, in batches: the figure's rows are some of them
    for a, agent in ((args_a, agent_a), (args_b, agent_b)):
        cam = torch.cat([agent.critic_cam(frames[i : i + 256], a.cam).detach() for i in range(0, len(frames), 256)])
        own, fixed, prior = fixed_map_ious(cam, masks, args.tau)
        print(
            f"{a.method} ({a.cam} CAM), mean IoU over all {len(frames)} frames with an object: its own maps {own:.3f}, "
            f"their mean as one fixed map {fixed:.3f}; the masks' mean as a fixed map {prior:.3f}"
        )
        every.append(cam)
    pick = np.linspace(0, len(frames) - 1, min(args.frames, len(frames))).round().astype(int)
    obs, mask = frames[pick], masks[pick]
    cams = [cam[pick] for cam in every]
    size = (args_a.frame_height, args_a.frame_width)
    fig, axes = plt.subplots(len(pick), 4, figsize=(4 * 2.6, len(pick) * 2.6 * size[0] / size[1] + 0.6), squeeze=False)
    for row in range(len(pick)):
        frame = obs[row, -1].numpy()
        axes[row, 0].imshow(frame, cmap="gray")
        axes[row, 1].imshow(frame, cmap="gray")
        axes[row, 1].imshow(np.ma.masked_where(~mask[row].numpy(), mask[row].numpy()), cmap="autumn", alpha=0.7)
        for col, cam in enumerate(cams, start=2):
            axes[row, col].imshow(frame, cmap="gray")
            axes[row, col].imshow(cam[row].numpy(), cmap="jet", alpha=0.5, vmin=0, vmax=1)
            iou, _ = ppo.attention_iou(cam[row : row + 1], mask[row : row + 1], args.tau)
            empty = " (CAM empty)" if cam[row].max() <= 0 else ""
            axes[row, col].set_xlabel(f"IoU {iou.item():.2f}{empty}", fontsize=8)
    for col, title in enumerate(["frame", "mask"] + [f"{a.method} ({a.cam} CAM)" for a in (args_a, args_b)]):
        axes[0, col].set_title(title, fontsize=9)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    title = f"{args_a.env}: frames played by the {args_a.method} agent; each agent's critic CAM (IoU at tau {args.tau})"
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    out = args.out or f"figure11_{args_a.env}.png"
    ppo.atomic_write(out, lambda f: fig.savefig(f, dpi=100, format="png"))
    plt.close(fig)
    return out


if __name__ == "__main__":
    try:
        print(f"figure written to {draw(tyro.cli(Args))}")
    except ValueError as e:  # RunFileError is a ValueError
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
