# PPO with CAMAL (Class Activation Map Attention Learning) on ViZDoom, in CleanRL's single-file style
# (cleanrl/ppo_atari.py); hyperparameters follow the paper's Table 8. The critic's Grad-CAM is pulled onto the game
# objects that ViZDoom's labels buffer marks on screen and pushed off everything else:
#     L = L_PPO + lambda * mean_b(beta_b - alpha_b)
# Read top to bottom: Args, the CAMAL core, the games, the agent, evaluation, the training loop. Below one banner,
# the run's plumbing (files, checkpoints, signals, progress, pictures), which the loop reaches through a `Run`.
import errno
import json
import math
import multiprocessing
import os
import pickle
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from dataclasses import asdict, dataclass
from importlib import metadata
from typing import Literal, Optional, Union, get_args, get_origin, get_type_hints

import cv2
import gymnasium as gym
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.optim as optim
import tyro
import vizdoom as vzd
from torch.distributions.categorical import Categorical
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

CAM_KINDS = ("abs", "paper", "abs-target")  # --cam's choices; every evaluation measures IoU under each
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)  # a terminal's and a scheduler's
SCENARIOS = {
    "Basic": "basic.cfg",
    "DefendLine": "defend_the_line.cfg",
    "DefendCenter": "defend_the_center.cfg",
    "TakeCover": "take_cover.cfg",
}


@dataclass
class Args:
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """the name of this experiment"""
    seed: int = 1
    """seed of the experiment"""
    torch_deterministic: bool = True
    """if toggled, `torch.backends.cudnn.deterministic=True`"""
    cuda: bool = True
    """use the GPU when there is one (the CPU otherwise)"""
    track: bool = False
    """track the run with Weights and Biases (pip install -r requirements-cluster.txt)"""
    wandb_project_name: str = "camal"
    """the wandb's project name"""
    wandb_entity: Optional[str] = None
    """the entity (team) of wandb's project"""
    capture_video: bool = False
    """write frame | mask | CAM videos of rollouts and evaluation episodes to videos/{run_name}/"""
    save_model: bool = False
    """save the trained agent to runs/{run_name}/{exp_name}.cleanrl_model"""

    # Environment
    env: Literal[tuple(SCENARIOS)] = "TakeCover"
    """the ViZDoom scenario"""
    frame_skip: int = 4
    """how many game tics each action is repeated for"""
    frame_height: int = 240
    """observation height in pixels (240 x 320 is the paper's; 60 x 80 makes quick CPU runs)"""
    frame_width: int = 320
    """observation width in pixels"""
    frame_stack: int = 4
    """how many frames the agent sees, the newest included"""
    num_envs: int = 8
    """the number of parallel game environments"""
    vector_env: Literal["auto", "async", "sync"] = "auto"
    """async: games in worker processes; sync: in this process; auto: async on more than 2 cores"""

    # PPO (the paper's Table 8)
    total_timesteps: int = 10_000_000
    """total timesteps of the experiment"""
    learning_rate: float = 2.5e-4
    """the learning rate of the optimizer"""
    num_steps: int = 128
    """the number of steps to run in each environment per policy rollout"""
    anneal_lr: bool = True
    """anneal the learning rate linearly to 0"""
    gamma: float = 0.99
    """the discount factor gamma"""
    gae_lambda: float = 0.95
    """the lambda for the general advantage estimation"""
    num_minibatches: int = 4
    """the number of mini-batches"""
    update_epochs: int = 4
    """the K epochs to update the policy"""
    norm_adv: bool = True
    """normalize advantages per minibatch"""
    clip_coef: float = 0.1
    """the surrogate clipping coefficient"""
    clip_vloss: bool = True
    """use a clipped loss for the value function"""
    ent_coef: float = 0.01
    """coefficient of the entropy"""
    vf_coef: float = 0.5
    """coefficient of the value function"""
    max_grad_norm: float = 0.5
    """the maximum norm for the gradient clipping"""
    target_kl: Optional[float] = None
    """the target KL divergence threshold (None: no early stopping)"""
    reward_scale: float = 1.0
    """rewards are multiplied by this before Table 8's [-1, 1] clip (1: the paper's)"""

    # CAMAL
    method: Literal["camal", "vanilla"] = "camal"
    """camal: PPO plus the CAMAL loss; vanilla: plain PPO (attention is still measured)"""
    camal_coef: float = 1.0
    """lambda, the weight of the CAMAL loss (Eq. 2)"""
    tau: float = 0.7
    """the threshold on H for the attention IoU"""
    cam: Literal[CAM_KINDS] = "abs"
    """the critic's CAM: abs = |mean_k w_k A_k| of V(s); paper = Eq. 3 of V(s); abs-target = Eq. 3 of |V(s)|"""
    collapse_patience: int = 5
    """warn when over half the CAMs are empty for this many iterations in a row"""

    # Logging, evaluation, checkpoints
    image_every: int = 50
    """log frame | mask | CAM images every this many iterations (0: never)"""
    eval_episodes: int = 10
    """episodes played with the trained policy at the end (0: no evaluation)"""
    eval_max_steps: int = 5000
    """an evaluation episode ends after this many steps (0: only by the scenario's own limit)"""
    checkpoint_every: int = 0
    """save a checkpoint every this many iterations (0: only when stopped)"""
    resume: Optional[str] = None
    """a run folder (runs/{run_name}) to continue from its last checkpoint"""

    # to be filled in runtime
    batch_size: int = 0
    """the batch size (computed in runtime)"""
    minibatch_size: int = 0
    """the mini-batch size (computed in runtime)"""
    num_iterations: int = 0
    """the number of iterations (computed in runtime)"""


# ---------------------------------------------------------------------------------------------
# CAMAL: the attention map and the loss (Eq. 1-4). Copied unchanged into the other scripts;
# tests/test_shared_helpers.py keeps the copies identical.
# ---------------------------------------------------------------------------------------------
def grad_cam(activations, score, size, *, create_graph, to_nchw=None, rectify="relu"):
    """Grad-CAM of every sample in a batch from one backward pass (the paper's Eq. 3 and 4).

    activations: the feature map in the graph that `score` was computed from.
    score: one target per sample (B or B x 1), e.g. the ground-truth logit or V(s).
    size: (H, W) of the returned maps. to_nchw: maps activations and gradients to B x K x h x w
    when the model's layout differs. rectify: "relu" is Grad-CAM (Eq. 3); "abs" keeps the evidence that
    lowers the score too, |sum_k w_k A_k|, so a map is empty only where no feature moves the score.
    create_graph: True for a map a loss will be differentiated through (CAMAL's double backward); False for a
    measurement, which keeps no graph. Returns B x H x W in [0, 1].
    """
    # d(sum_b score_b)/dA: one backward gives every sample's gradient (Proposition 1).
    ones = torch.ones_like(score)
    grads = torch.autograd.grad(score, activations, grad_outputs=ones, create_graph=create_graph, retain_graph=True)[0]
    # the arithmetic joins the graph only for a map a loss will differentiate, whatever the ambient grad mode
    with torch.set_grad_enabled(create_graph):
        if to_nchw is not None:
            activations, grads = to_nchw(activations), to_nchw(grads)
        activations, grads = activations.float(), grads.float()
        weights = grads.mean(dim=(2, 3), keepdim=True)  # w_k: spatial mean of the gradient
        cam = (weights * activations).mean(dim=1)  # mean over k, as in Appendix C
        cam = torch.relu(cam) if rectify == "relu" else cam.abs()
        cam = cam / (cam.amax(dim=(1, 2), keepdim=True) + 1e-8)  # each map scaled to [0, 1]
        # Bilinear upsampling (align_corners=False) is separable and linear: R_y @ cam @ R_x^T with PyTorch's own
        # weights gives F.interpolate's numbers, and its backward is two matmuls (faster: docs/benchmarks.md).
        h, w = cam.shape[1:]
        eye = lambda n: torch.eye(n, device=cam.device, dtype=cam.dtype)[None]  # noqa: E731
        r_y = F.interpolate(eye(h), size=size[0], mode="linear", align_corners=False)[0].T  # H x h
        r_x = F.interpolate(eye(w), size=size[1], mode="linear", align_corners=False)[0].T  # W x w
        return r_y @ cam @ r_x.T


def camal_terms(cam, mask):
    """alpha (mean of H inside the mask) and beta (mean outside) per sample, Eq. 1.

    A sample whose mask is empty or covers the whole map has neither: valid is False there and its
    alpha and beta are 0 (never NaN).
    """
    mask = mask.to(cam.dtype)
    n_in = mask.sum(dim=(1, 2))
    n_out = mask[0].numel() - n_in
    valid = (n_in > 0) & (n_out > 0)
    alpha = (cam * mask).sum(dim=(1, 2)) / n_in.clamp(min=1)
    beta = (cam * (1 - mask)).sum(dim=(1, 2)) / n_out.clamp(min=1)
    zero = torch.zeros_like(alpha)
    return torch.where(valid, alpha, zero), torch.where(valid, beta, zero), valid


def camal_loss(cam, mask):
    """mean over valid samples of (beta - alpha), the CAMAL term of Eq. 2 before lambda; 0 if none is valid."""
    alpha, beta, valid = camal_terms(cam, mask)
    return ((beta - alpha) * valid).sum() / valid.sum().clamp(min=1)


def attention_iou(cam, mask, tau=0.7):
    """IoU of (H > tau) with the mask per sample (Eq. 8); valid as in camal_terms."""
    mask = mask.bool()
    pred = cam > tau
    inter = (pred & mask).sum(dim=(1, 2)).float()
    union = (pred | mask).sum(dim=(1, 2)).float()
    n_in = mask.sum(dim=(1, 2))
    valid = (n_in > 0) & (n_in < mask[0].numel())
    return torch.where(valid, inter / union.clamp(min=1), torch.zeros_like(inter)), valid


def empty_cams(cam):
    """Per sample, True where the CAM is zero everywhere: CAMAL has no gradient there and IoU says nothing."""
    return cam.flatten(1).amax(1) <= 0


def critic_cam(feats, value, size, cam_kind, create_graph):
    """The critic's attention under cam_kind (Args.cam), from one forward's last feature map and its V(s)."""
    target = value
    if cam_kind == "abs-target":
        with torch.enable_grad():  # in the graph also when the map is only measured (under no_grad)
            target = value.abs()
    return grad_cam(feats, target, size, create_graph=create_graph, rectify="abs" if cam_kind == "abs" else "relu")


# ---------------------------------------------------------------------------------------------
# The games: ViZDoom, the object masks, the frame stack
# ---------------------------------------------------------------------------------------------
def labels_to_mask(labels_buffer, labels):
    """Boolean H x W mask of the pixels that show a game object.

    The object values come from `state.labels` (they change with how many objects are on screen);
    the player's own weapon sprite (DoomPlayer), walls (0) and floors/ceilings (1) are never in it.
    """
    lut = np.zeros(256, dtype=bool)
    for label in labels:
        if label.object_name != "DoomPlayer" and label.value > 1:
            lut[label.value] = True
    return lut[labels_buffer]


def render_resolution(frame_height, frame_width):
    """The smallest ViZDoom screen resolution that covers the frame: rendering less is faster."""
    best = None
    for name in dir(vzd.ScreenResolution):
        if not name.startswith("RES_"):
            continue
        w, h = (int(v) for v in name[4:].split("X"))
        if w >= frame_width and h >= frame_height and (best is None or w * h < best[0]):
            best = (w * h, getattr(vzd.ScreenResolution, name))
    if best is None:
        raise ValueError(f"frame {frame_height} x {frame_width} is larger than any ViZDoom screen resolution")
    return best[1]


class VizDoomEnv(gym.Env):
    """One ViZDoom game: its newest grayscale frame and the object mask of that frame (the agent stacks frames)."""

    metadata = {"render_modes": []}

    def __init__(self, env, frame_skip, frame_height, frame_width):
        self.game = vzd.DoomGame()
        self.game.load_config(os.path.join(vzd.scenarios_path, SCENARIOS[env]))
        self.game.set_window_visible(False)
        self.game.set_mode(vzd.Mode.PLAYER)
        self.game.set_screen_format(vzd.ScreenFormat.GRAY8)
        self.game.set_screen_resolution(render_resolution(frame_height, frame_width))
        self.game.set_labels_buffer_enabled(True)
        # The engine reads its settings file at start and rewrites it at close: by default _vizdoom.ini in the working
        # directory, shared by every game there. One cut short (an engine killed while writing it) changed what every
        # later game drew (movebob=0. stills the weapon), so a resumed run's games could never be put back. Each game
        # has a file of its own, from the engine's defaults.
        self.config_dir = tempfile.mkdtemp(prefix="vizdoom-")
        self.game.set_doom_config_path(os.path.join(self.config_dir, "_vizdoom.ini"))
        # The engine starts with a terminal's and a scheduler's stop signals blocked (it inherits the mask): they reach
        # the whole process group, and the learner stops the run and closes the games (a watchdog, if it cannot). A
        # signal that comes meanwhile waits, and reaches this process's handler when the mask is lifted.
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            self.game.init()
        except BaseException:
            shutil.rmtree(self.config_dir, ignore_errors=True)
            raise
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        n = self.game.get_available_buttons_size()
        self.buttons = np.eye(n, dtype=bool).tolist()  # one button per action, as in ViZDoom's examples
        self.frame_skip, self.size = frame_skip, (frame_height, frame_width)
        self.action_space = gym.spaces.Discrete(n)
        self.observation_space = gym.spaces.Dict(
            {
                "frame": gym.spaces.Box(0, 255, (frame_height, frame_width), np.uint8),
                "mask": gym.spaces.Box(0, 1, (frame_height, frame_width), np.uint8),
            }
        )
        self.last = {"frame": np.zeros((frame_height, frame_width), np.uint8), "mask": np.zeros(self.size, np.uint8)}
        self.seed_value, self.episodes, self.actions = None, 0, []  # where the game is (position, put_back)

    def _observe(self):
        state = self.game.get_state()
        h, w = self.size
        frame, labels_buffer = state.screen_buffer, state.labels_buffer
        if frame.shape != (h, w):
            frame = cv2.resize(frame, (w, h), interpolation=cv2.INTER_AREA)
            labels_buffer = cv2.resize(labels_buffer, (w, h), interpolation=cv2.INTER_NEAREST)
        self.last = {"frame": frame, "mask": labels_to_mask(labels_buffer, state.labels).astype(np.uint8)}
        return {k: v.copy() for k, v in self.last.items()}

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        if seed is not None:
            self.game.set_seed(seed)
            self.seed_value, self.episodes = seed, 0
        self.game.new_episode()
        self.episodes, self.actions = self.episodes + 1, []
        return self._observe(), {}

    def step(self, action):
        self.actions.append(int(action))
        reward = self.game.make_action(self.buttons[int(action)], self.frame_skip)
        if self.game.is_episode_finished():
            timeout = self.game.get_episode_timeout()
            truncated = bool(timeout) and self.game.get_episode_time() >= timeout and not self.game.is_player_dead()
            # no state after the end: the autoreset replaces this observation anyway
            return {k: v.copy() for k, v in self.last.items()}, reward, not truncated, truncated, {}
        return self._observe(), reward, False, False, {}

    def position(self):
        """Where this game is: its seed, the episodes begun since, this episode's actions, and digests of the newest
        frame and mask. The engine draws episode k after a seed the same whatever was played before, and plays the same
        actions the same way, so this is enough to put a new game where this one is (put_back)."""
        return {
            "seed": self.seed_value,
            "episodes": self.episodes,
            "actions": list(self.actions),
            "digest": self.digest(),
        }

    def digest(self):
        return [zlib.crc32(self.last[k].tobytes()) for k in ("frame", "mask")]

    def put_back(self, keep):
        """Replay the position() set_attr gave this new game as `saved_position`; returns the last `keep` frames of the
        episode (oldest first) and the newest mask, or why the replay did not reach the same frame (a string: an error
        raised in an async env's worker would leave the env unusable)."""
        position = self.saved_position
        self.game.set_seed(position["seed"])
        for _ in range(position["episodes"]):
            self.game.new_episode()
        frames, actions = [self._observe()["frame"]], position["actions"]
        for i, a in enumerate(actions):
            self.game.make_action(self.buttons[a], self.frame_skip)
            if self.game.is_episode_finished():
                return f"the episode ended after {i + 1} of its {len(actions)} replayed actions"
            if i >= len(actions) - keep:  # only the frames the stack keeps
                frames.append(self._observe()["frame"])
        self.seed_value, self.episodes, self.actions = position["seed"], position["episodes"], list(actions)
        if self.digest() != list(position["digest"]):
            return "the replayed game shows another frame than the saved one"
        return frames[-keep:], self.last["mask"].copy()

    def limit_episodes(self, tics):
        """From the next episode on, end episodes after `tics` game tics too (truncated), or at the scenario's limit."""
        own = self.game.get_episode_timeout()
        self.game.set_episode_timeout(min(t for t in (own, tics) if t) if (own or tics) else 0)

    def close(self):
        self.game.close()
        shutil.rmtree(self.config_dir, ignore_errors=True)


def make_envs(args):
    use_async = args.vector_env == "async" or (args.vector_env == "auto" and (os.cpu_count() or 1) > 2)

    def thunk():
        # a worker process (not the learner, where gymnasium makes one env to read the spaces): the learner closes
        # it, whatever stop signal the process group gets
        if use_async and multiprocessing.parent_process() is not None:
            for s in STOP_SIGNALS:
                signal.signal(s, signal.SIG_IGN)
        return VizDoomEnv(args.env, args.frame_skip, args.frame_height, args.frame_width)

    fns = [thunk for _ in range(args.num_envs)]
    # SAME_STEP: the step that ends an episode already returns the next episode's first observation,
    # as in gymnasium 0.29 that CleanRL was written against.
    mode = gym.vector.AutoresetMode.SAME_STEP
    # copy=False: observations come back as views of the vector env's own buffers, which the next step overwrites;
    # every reader copies them first (to the device), so a second copy here is waste.
    if use_async:
        envs = gym.vector.AsyncVectorEnv(fns, shared_memory=True, copy=False, autoreset_mode=mode)
    else:
        envs = gym.vector.SyncVectorEnv(fns, copy=False, autoreset_mode=mode)
    return EnvMeter(gym.wrappers.vector.RecordEpisodeStatistics(envs, buffer_length=args.num_envs * args.num_steps))


def stack_frames(stack, frame, first):
    """The agent's input after a step: each game's last stack.shape[1] frames, newest last.

    frame (uint8, N x H x W) is each game's newest frame. A game that (re)starts (`first`) has no past, so its first
    frame fills its stack. The result is a new tensor, never a view of the vector env's buffers.
    """
    frame = frame.to(stack.device)[:, None]
    stacked = torch.cat((stack[:, 1:], frame), dim=1)
    return torch.where(first.to(stack.device).view(-1, 1, 1, 1), frame.expand_as(stacked), stacked)


# ---------------------------------------------------------------------------------------------
# The agent: CleanRL's Nature CNN, whose last conv layer the critic's Grad-CAM reads
# ---------------------------------------------------------------------------------------------
def nature_cnn_output_size(frame_height, frame_width):
    """Spatial size of the Nature CNN's last feature map; a clear error if the frame is too small."""
    size = [frame_height, frame_width]
    for kernel, stride in ((8, 4), (4, 2), (3, 1)):
        if min(size) < kernel:
            raise ValueError(
                f"frame {frame_height} x {frame_width} is too small for the Nature CNN (8/4, 4/2, 3/1 convolutions): "
                "use at least 36 x 36"
            )
        size = [(s - kernel) // stride + 1 for s in size]
    return tuple(size)


def layer_init(layer, std=np.sqrt(2), bias_const=0.0):
    torch.nn.init.orthogonal_(layer.weight, std)
    torch.nn.init.constant_(layer.bias, bias_const)
    return layer


class Agent(nn.Module):
    def __init__(self, num_actions, frame_stack, frame_height, frame_width):
        super().__init__()
        self.size = (frame_height, frame_width)
        # `features` ends at the last conv's ReLU, the layer Grad-CAM reads
        self.features = nn.Sequential(
            layer_init(nn.Conv2d(frame_stack, 32, 8, stride=4)),
            nn.ReLU(),
            layer_init(nn.Conv2d(32, 64, 4, stride=2)),
            nn.ReLU(),
            layer_init(nn.Conv2d(64, 64, 3, stride=1)),
            nn.ReLU(),
        )
        # channels-last: the 8x8/4 conv's backward is much faster on a CPU (docs/benchmarks.md)
        self.features.to(memory_format=torch.channels_last)
        h, w = nature_cnn_output_size(frame_height, frame_width)
        self.head = nn.Sequential(nn.Flatten(), layer_init(nn.Linear(64 * h * w, 512)), nn.ReLU())
        self.actor = layer_init(nn.Linear(512, num_actions), std=0.01)
        self.critic = layer_init(nn.Linear(512, 1), std=1)

    def get_features(self, x):
        # reorder while still uint8: a quarter of the bytes of the float copy
        return self.features(x.contiguous(memory_format=torch.channels_last).float().div_(255.0))

    def get_value(self, x):
        return self.critic(self.head(self.get_features(x)))

    def get_action_and_value(self, x, action=None):
        """Also returns the last conv feature map A, so V(s)'s Grad-CAM comes from the same forward."""
        feats = self.get_features(x)
        hidden = self.head(feats)
        probs = Categorical(logits=self.actor(hidden))
        if action is None:
            action = probs.sample()
        return action, probs.log_prob(action), probs.entropy(), self.critic(hidden), feats

    def critic_cam(self, x, cam_kind):
        """The critic's CAM of observations x, measured (no graph kept): for pictures and figures."""
        with torch.enable_grad():
            feats = self.get_features(x)
            return critic_cam(feats, self.critic(self.head(feats)), self.size, cam_kind, create_graph=False)


# ---------------------------------------------------------------------------------------------
# Advantages, the attention figures of an update, and the evaluation of a trained agent
# ---------------------------------------------------------------------------------------------
def gae(rewards, values, dones, next_value, next_done, gamma, gae_lambda):
    """Generalized advantage estimates over a rollout (num_steps x num_envs), as in CleanRL's PPO."""
    advantages = torch.zeros_like(rewards)
    lastgaelam = 0
    num_steps = rewards.shape[0]
    for t in reversed(range(num_steps)):
        if t == num_steps - 1:
            nextnonterminal = 1.0 - next_done
            nextvalues = next_value
        else:
            nextnonterminal = 1.0 - dones[t + 1]
            nextvalues = values[t + 1]
        delta = rewards[t] + gamma * nextvalues * nextnonterminal - values[t]
        advantages[t] = lastgaelam = delta + gamma * gae_lambda * nextnonterminal * lastgaelam
    return advantages


class AttentionSums:
    """An update's attention figures, summed over its first epoch's minibatches on the device (no sync each)."""

    KEYS = ("camal_loss", "alpha", "beta", "iou", "valid", "empty")

    def __init__(self, device):
        self.sums = dict.fromkeys(self.KEYS, torch.zeros((), device=device))
        self.minibatches = 0

    def add(self, cam, camal_l, masks, tau):
        with torch.no_grad():
            cam = cam.detach()
            alpha, beta, valid = camal_terms(cam, masks)
            iou, _ = attention_iou(cam, masks, tau)
            added = (camal_l.detach(), alpha.sum(), beta.sum(), (iou * valid).sum(), valid.sum(), empty_cams(cam).sum())
            self.sums = {k: self.sums[k] + v for k, v in zip(self.KEYS, added)}
        self.minibatches += 1

    def scalars(self, batch_size):
        """TensorBoard's figures: alpha, beta and IoU are means over the samples with an object on screen, left out
        when there was none (never NaN)."""
        sums = dict(zip(self.KEYS, torch.stack(list(self.sums.values())).tolist()))  # one device sync per update
        scalars = {
            "losses/camal_loss": sums["camal_loss"] / self.minibatches,
            "charts/mask_valid_fraction": sums["valid"] / batch_size,
            "charts/cam_empty_fraction": sums["empty"] / batch_size,
        }
        if sums["valid"]:
            for name, key in (("alpha", "alpha"), ("beta", "beta"), ("attention_iou", "iou")):
                scalars[f"charts/{name}"] = sums[key] / sums["valid"]
        return scalars


def evaluate(agent, envs, args, device, stop=None, video=None):
    """Play `eval_episodes` episodes with the trained policy (sampled actions); None if `stop` is set meanwhile.

    Env i plays a fixed quota of episodes (eval_episodes split over the envs) so that short episodes are not
    favoured. Per episode: its return, its length, its mean attention IoU (None where no frame had an object on
    screen) and the share of its frames whose CAM was empty, under the run's --cam; `by_cam` has the last two under
    every CAM kind, so a vanilla run is the baseline of each formulation. video: env 0's episodes as mp4s.
    """
    size = (args.frame_height, args.frame_width)
    n = args.num_envs
    quota = [args.eval_episodes // n + (i < args.eval_episodes % n) for i in range(n)]
    done_count = [0] * n
    ret, length = np.zeros(n), np.zeros(n, dtype=int)
    iou_sum, iou_n, empty_n = np.zeros((len(CAM_KINDS), n)), np.zeros(n, dtype=int), np.zeros((len(CAM_KINDS), n))
    own = CAM_KINDS.index(args.cam)
    episodes = []
    envs.unwrapped.call("limit_episodes", args.eval_max_steps * args.frame_skip)  # scenarios with no timeout end too
    obs, _ = envs.reset(seed=args.seed + 1_000_003)
    frames = torch.zeros((n, args.frame_stack) + size, dtype=torch.uint8, device=device)
    first = np.ones(n, dtype=bool)  # every game starts an episode
    while sum(done_count) < args.eval_episodes:
        if stop:
            return None
        frames = stack_frames(frames, torch.from_numpy(obs["frame"]), torch.from_numpy(first))
        mask = torch.from_numpy(obs["mask"]).to(device).bool()
        with torch.enable_grad():
            action, _, _, value, feats = agent.get_action_and_value(frames)
            cams = [critic_cam(feats, value, size, kind, create_graph=False) for kind in CAM_KINDS]
        ious = [attention_iou(cam, mask, args.tau) for cam in cams]
        valid = ious[0][1].cpu().numpy()  # the mask decides validity, whatever the map
        iou = torch.stack([i for i, _ in ious]).cpu().numpy()
        empty = torch.stack([empty_cams(cam) for cam in cams]).cpu().numpy()
        if video is not None and done_count[0] < quota[0]:
            video.add(obs["frame"][0], obs["mask"][0], cams[own][0].cpu().numpy())
        obs, reward, term, trunc, _ = envs.step(action.cpu().numpy())
        first = np.logical_or(term, trunc)
        ret += reward
        length += 1
        iou_sum += np.where(valid, iou, 0.0)
        iou_n += valid
        empty_n += empty
        for i in np.flatnonzero(first):
            if done_count[i] < quota[i]:
                by_cam = {
                    kind: {
                        "attention_iou": float(iou_sum[k, i] / iou_n[i]) if iou_n[i] else None,
                        "cam_empty_fraction": float(empty_n[k, i] / length[i]),
                    }
                    for k, kind in enumerate(CAM_KINDS)
                }
                ep = {"return": float(ret[i]), "length": int(length[i]), "truncated": bool(trunc[i])}
                episodes.append({**ep, **by_cam[args.cam], "by_cam": by_cam})
                if i == 0 and video is not None:
                    video.write(f"eval-episode-{done_count[0]}.mp4")
                done_count[i] += 1
            ret[i], length[i], iou_sum[:, i], iou_n[i], empty_n[:, i] = 0.0, 0, 0.0, 0, 0
    return episodes


def random_returns(envs, args, stop=None):
    """The returns of a uniformly random policy over the evaluation's episodes (the same seeds, quotas and limit):
    what a trained agent's return is measured against. Its own generator, so nothing else draws differently. None if
    stopped."""
    rng, n = np.random.default_rng(args.seed), args.num_envs
    quota = [args.eval_episodes // n + (i < args.eval_episodes % n) for i in range(n)]
    returns, ret = [[] for _ in range(n)], np.zeros(n)
    envs.reset(seed=args.seed + 1_000_003)
    while any(len(r) < q for r, q in zip(returns, quota)):
        if stop:
            return None
        _, reward, term, trunc, _ = envs.step(rng.integers(0, envs.single_action_space.n, n))
        ret += reward
        for i in np.flatnonzero(np.logical_or(term, trunc)):
            if len(returns[i]) < quota[i]:
                returns[i].append(float(ret[i]))
            ret[i] = 0.0
    return [r for env_returns in returns for r in env_returns]


# ---------------------------------------------------------------------------------------------
# The training loop: CleanRL's PPO, with the CAMAL term added to its loss
# ---------------------------------------------------------------------------------------------
def main(args, checkpoint=None, stop=None):
    """Train an agent (or continue a resumed run from its `checkpoint`), evaluate it, write eval.json. stop: the
    StopRequest the signals set from the start (see the command line below)."""
    args.batch_size = int(args.num_envs * args.num_steps)
    args.minibatch_size = int(args.batch_size // args.num_minibatches)
    args.num_iterations = args.total_timesteps // args.batch_size

    # TRY NOT TO MODIFY: seeding
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")

    # env setup
    envs = make_envs(args)
    H, W = args.frame_height, args.frame_width
    agent = Agent(envs.single_action_space.n, args.frame_stack, H, W).to(device)
    optimizer = optim.Adam(agent.parameters(), lr=args.learning_rate, eps=1e-5)
    run = Run(args, checkpoint, envs, agent, optimizer, device, stop)  # folder, logs, progress (below the banner)
    writer = run.writer
    camal = args.method == "camal"  # vanilla measures the CAM but does not train on it

    # ALGO Logic: Storage setup (frames as uint8: a quarter of float32's memory at 240 x 320)
    obs = torch.zeros((args.num_steps, args.num_envs, args.frame_stack, H, W), dtype=torch.uint8, device=device)
    masks = torch.zeros((args.num_steps, args.num_envs, H, W), dtype=torch.bool, device=device)
    actions = torch.zeros((args.num_steps, args.num_envs), dtype=torch.long, device=device)
    logprobs = torch.zeros((args.num_steps, args.num_envs), device=device)
    rewards = torch.zeros((args.num_steps, args.num_envs), device=device)
    dones = torch.zeros((args.num_steps, args.num_envs), device=device)
    values = torch.zeros((args.num_steps, args.num_envs), device=device)

    # TRY NOT TO MODIFY: start the game (a resumed run's games are played back to where its checkpoint left them)
    global_step = run.global_step
    start_time = time.time()
    next_obs, next_mask, next_done = run.start_games()

    for iteration in range(run.start_iteration, args.num_iterations + 1):
        # Annealing the rate if instructed to do so.
        if args.anneal_lr:
            frac = 1.0 - (iteration - 1.0) / args.num_iterations
            lrnow = frac * args.learning_rate
            optimizer.param_groups[0]["lr"] = lrnow

        for step in range(0, args.num_steps):
            run.stop_in_rollout()  # a stop asked for now saves the state of the last update and exits
            global_step += args.num_envs
            obs[step] = next_obs
            masks[step] = next_mask
            dones[step] = next_done

            # ALGO LOGIC: action logic
            with torch.no_grad():
                action, logprob, _, value, _ = agent.get_action_and_value(next_obs)
                values[step] = value.flatten()
            actions[step] = action
            logprobs[step] = logprob

            # TRY NOT TO MODIFY: execute the game and log data.
            next_obs_np, reward, terminations, truncations, infos = envs.step(action.cpu().numpy())
            next_done = np.logical_or(terminations, truncations)
            # clamp, not sign: keeps the size of small rewards (Table 8's [-1, 1] clip), after --reward-scale
            rewards[step] = torch.tensor(np.clip(reward * args.reward_scale, -1.0, 1.0), dtype=torch.float32).to(device)
            next_done = torch.Tensor(next_done).to(device)
            next_obs = stack_frames(next_obs, torch.from_numpy(next_obs_np["frame"]), next_done.bool())
            next_mask = torch.from_numpy(next_obs_np["mask"]).to(device).bool()

            if "episode" in infos:  # the game's own reward, unscaled and unclipped
                for i in np.flatnonzero(infos["_episode"]):
                    writer.add_scalar("charts/episodic_return", infos["episode"]["r"][i], global_step)
                    writer.add_scalar("charts/episodic_length", infos["episode"]["l"][i], global_step)

        # bootstrap value if not done
        with torch.no_grad():
            next_value = agent.get_value(next_obs).reshape(1, -1)
            advantages = gae(rewards, values, dones, next_value, next_done, args.gamma, args.gae_lambda)
            returns = advantages + values

        # flatten the batch
        b_obs = obs.reshape((-1,) + obs.shape[2:])
        b_masks = masks.reshape((-1, H, W))
        b_logprobs = logprobs.reshape(-1)
        b_actions = actions.reshape(-1)
        b_advantages = advantages.reshape(-1)
        b_returns = returns.reshape(-1)
        b_values = values.reshape(-1)

        # Optimizing the policy and value network
        b_inds = np.arange(args.batch_size)
        clipfracs = []
        attention = AttentionSums(device)
        for epoch in range(args.update_epochs):
            np.random.shuffle(b_inds)
            for start in range(0, args.batch_size, args.minibatch_size):
                end = start + args.minibatch_size
                mb_inds = b_inds[start:end]

                _, newlogprob, entropy, newvalue, feats = agent.get_action_and_value(b_obs[mb_inds], b_actions[mb_inds])
                logratio = newlogprob - b_logprobs[mb_inds]
                ratio = logratio.exp()

                with torch.no_grad():
                    # calculate approx_kl http://joschu.net/blog/kl-approx.html
                    old_approx_kl = (-logratio).mean()
                    approx_kl = ((ratio - 1) - logratio).mean()
                    clipfracs += [((ratio - 1.0).abs() > args.clip_coef).float().mean()]  # on the device: no sync

                mb_advantages = b_advantages[mb_inds]
                if args.norm_adv:
                    mb_advantages = (mb_advantages - mb_advantages.mean()) / (mb_advantages.std() + 1e-8)

                # Policy loss
                pg_loss1 = -mb_advantages * ratio
                pg_loss2 = -mb_advantages * torch.clamp(ratio, 1 - args.clip_coef, 1 + args.clip_coef)
                pg_loss = torch.max(pg_loss1, pg_loss2).mean()

                # Value loss
                newvalue = newvalue.view(-1)
                if args.clip_vloss:
                    v_loss_unclipped = (newvalue - b_returns[mb_inds]) ** 2
                    v_clipped = b_values[mb_inds] + torch.clamp(
                        newvalue - b_values[mb_inds],
                        -args.clip_coef,
                        args.clip_coef,
                    )
                    v_loss_clipped = (v_clipped - b_returns[mb_inds]) ** 2
                    v_loss_max = torch.max(v_loss_unclipped, v_loss_clipped)
                    v_loss = 0.5 * v_loss_max.mean()
                else:
                    v_loss = 0.5 * ((newvalue - b_returns[mb_inds]) ** 2).mean()

                entropy_loss = entropy.mean()
                loss = pg_loss - args.ent_coef * entropy_loss + v_loss * args.vf_coef

                # CAMAL: the critic's Grad-CAM at the last conv layer, one backward for the whole minibatch (Eq. 4).
                # Attention is measured in the first epoch, which visits every sample once; vanilla makes the map
                # only then, without the double-backward graph.
                if camal or epoch == 0:
                    cam = critic_cam(feats, newvalue, (H, W), args.cam, create_graph=camal)
                    camal_l = camal_loss(cam, b_masks[mb_inds])
                if camal:
                    loss = loss + args.camal_coef * camal_l

                optimizer.zero_grad()
                loss.backward()
                nn.utils.clip_grad_norm_(agent.parameters(), args.max_grad_norm)
                optimizer.step()
                if epoch == 0:
                    attention.add(cam, camal_l, b_masks[mb_inds], args.tau)

            if args.target_kl is not None and approx_kl > args.target_kl:
                break

        y_pred, y_true = b_values.cpu().numpy(), b_returns.cpu().numpy()
        var_y = np.var(y_true)
        explained_var = np.nan if var_y == 0 else 1 - np.var(y_true - y_pred) / var_y

        # TRY NOT TO MODIFY: record rewards for plotting purposes
        writer.add_scalar("charts/learning_rate", optimizer.param_groups[0]["lr"], global_step)
        writer.add_scalar("losses/value_loss", v_loss.item(), global_step)
        writer.add_scalar("losses/policy_loss", pg_loss.item(), global_step)
        writer.add_scalar("losses/entropy", entropy_loss.item(), global_step)
        writer.add_scalar("losses/old_approx_kl", old_approx_kl.item(), global_step)
        writer.add_scalar("losses/approx_kl", approx_kl.item(), global_step)
        writer.add_scalar("losses/clipfrac", torch.stack(clipfracs).mean().item(), global_step)
        writer.add_scalar("losses/explained_variance", explained_var, global_step)
        attention_scalars = attention.scalars(args.batch_size)  # alpha, beta, IoU of the first epoch's CAMs
        for tag, value in attention_scalars.items():
            writer.add_scalar(tag, value, global_step)
        writer.add_scalar("charts/SPS", int((global_step - run.global_step) / (time.time() - start_time)), global_step)
        # progress, images and videos, checkpoints, and a stop asked for during the update
        run.end_iteration(iteration, global_step, attention_scalars, obs, masks)

    # the trained policy, then a random one on the same games: what "learned" is measured against
    episodes = by_chance = None
    if args.eval_episodes:
        episodes = evaluate(agent, envs, args, device, run.stop, run.eval_video)
        by_chance = random_returns(envs, args, run.stop)
    run.finish(episodes, by_chance)  # eval.json; a stop during the evaluation saves the trained state instead


# ---------------------------------------------------------------------------------------------
# Run plumbing: everything below serves the run, not the method (files, checkpoints, resume, stop signals,
# progress, tracking, pictures, videos). The method and its loop are all above this line.
# ---------------------------------------------------------------------------------------------
class Run:
    """One training run around the loop: its folder and logs, a resumed run's state, the stop signals, progress,
    pictures, checkpoints and the evaluation's report. The loop calls it four times: to open it, to ask during a
    rollout whether to stop, at the end of each iteration, and to finish with the evaluation."""

    active = None  # the run of this process, which the command line's error handler closes

    def __init__(self, args, checkpoint, envs, agent, optimizer, device, stop=None):
        self.args, self.envs, self.agent, self.optimizer, self.device = args, envs, agent, optimizer, device
        self.writer = self.tracked = None
        if checkpoint is not None:
            self.run_dir = args.resume.rstrip("/")
            self.run_name = os.path.basename(self.run_dir)
        else:
            self.run_name = f"{args.env}__{args.exp_name}__{args.method}__{args.seed}__{int(time.time())}"
            self.run_dir = f"runs/{self.run_name}"
        self.video_dir = f"videos/{self.run_name}" if args.capture_video else None
        self.eval_video = self.video()  # env 0's evaluation episodes (--capture-video)
        Run.active = self
        try:
            for folder in filter(None, (self.run_dir, self.video_dir)):
                make_folder(folder)
            write_json(os.path.join(self.run_dir, "args.json"), asdict(args), indent=2)  # what the run is
            self.start_iteration, self.global_step, self.games, self.games_lost = 1, 0, None, ""
            if checkpoint is not None:  # the state after the checkpoint's iteration, generators included
                agent.load_state_dict(checkpoint["agent"])
                optimizer.load_state_dict(checkpoint["optimizer"])
                restore_rng(checkpoint["rng"])
                self.start_iteration, self.global_step = checkpoint["iteration"] + 1, checkpoint["global_step"]
                self.games = checkpoint.get("games")
                if self.games is None and self.start_iteration <= args.num_iterations:  # why the games start anew
                    self.games_lost = (
                        "this checkpoint does not hold where its games were (it was saved by an older version)"
                    )
            # purge_step: the events after the checkpoint's step are the ones a resumed run redoes
            purge = None if checkpoint is None else self.global_step + 1
            self.writer, self.tracked = open_logs(args, self.run_name, self.run_dir, purge_step=purge)
            record_environment(self.run_dir, device)  # which code and packages made this run (stats.py compares)
        except (RunFileError, ValueError) as e:  # ValueError: --track without wandb or without a W&B key
            self.close()
            if checkpoint is None:  # a run that could not start leaves no folder (only what this script put there)
                ours = ("args.json", "environment.json", "wandb")
                for folder in filter(os.path.isdir, (self.run_dir, self.video_dir or "")):
                    if all(n in ours or n.startswith("events.out.tfevents.") for n in os.listdir(folder)):
                        shutil.rmtree(folder, ignore_errors=True)
            exit_error(str(e))
        self.stop = stop if stop is not None else StopRequest(TRAINING_STOP, "iteration").catch()
        self.at_last_update = (self.start_iteration - 1, self.global_step)  # what a stop during a rollout saves
        self.start_time, self.collapsed_for, self.rollout_start = time.time(), 0, None
        kind = "async" if isinstance(envs.unwrapped, gym.vector.AsyncVectorEnv) else "sync"
        print(
            f"{self.run_name}: {describe_device(device)}, {args.num_envs} {kind} envs at {args.frame_height} x "
            f"{args.frame_width}, {args.num_iterations} iterations of {args.batch_size} steps\n  run folder: "
            f"{self.run_dir}   watch: tensorboard --logdir {os.path.dirname(self.run_dir) or '.'}   stop: Ctrl-C "
            f"(saves a checkpoint; --resume {self.run_dir} continues)",
            flush=True,
        )
        if checkpoint is not None and self.start_iteration > args.num_iterations:
            print(
                f"resuming {self.run_name}: its training is done (global_step={self.global_step}); completing its "
                "outputs"
            )
        elif checkpoint is not None:
            print(
                f"resuming {self.run_name} at iteration {self.start_iteration}/{args.num_iterations}, "
                f"global_step={self.global_step}"
            )
        # a bar on a terminal (none in logs, where each iteration's line carries the ETA)
        total = args.num_iterations * args.batch_size
        kw = dict(unit="step", unit_scale=True, disable=None, dynamic_ncols=True, leave=False)
        self.bar = tqdm(total=total, initial=self.global_step, **kw)
        if self.start_iteration > args.num_iterations:  # resumed after its training: the outputs are what is left
            self.trained()

    def start_games(self):
        """The loop's first (next_obs, next_mask, next_done): new episodes (seeded with --seed), or a resumed run's
        games played back to where its checkpoint left them, so that it goes on as the uninterrupted run would."""
        args, n, device = self.args, self.args.num_envs, self.device
        stack = torch.zeros((n, args.frame_stack, args.frame_height, args.frame_width), dtype=torch.uint8)
        games = self.games if self.start_iteration <= args.num_iterations else None
        if games is None:
            if self.games_lost:  # resumed on episodes the run had not played
                warn(
                    f"{self.games_lost}: they start new episodes, so the resumed run is not the one an uninterrupted "
                    "run would have made"
                )
            obs, _ = self.envs.reset(seed=args.seed + (self.start_iteration - 1) * n if self.games_lost else args.seed)
            next_obs = stack_frames(stack.to(device), torch.from_numpy(obs["frame"]), torch.ones(n, dtype=torch.bool))
            next_mask, next_done = torch.from_numpy(obs["mask"]).to(device).bool(), torch.zeros(n, device=device)
        else:
            started, why = time.perf_counter(), games_damage(games, n, self.envs.single_action_space.n)
            if why:
                self.close()
                exit_error(f"--resume {self.run_dir}: its games cannot be put back where they were: {why}")
            replayed = put_back_games(self.envs, games["games"], args.frame_stack)
            failed = [r for r in replayed if isinstance(r, str)]
            if failed:  # a run that can never resume is worse than one resumed on new episodes, said loudly
                self.games, self.games_lost = None, f"its games could not be put back where they were ({failed[0]})"
                return self.start_games()
            for i, (frames, _) in enumerate(replayed):
                frames = [frames[0]] * (args.frame_stack - len(frames)) + frames  # a new episode's stack repeats
                stack[i] = torch.from_numpy(np.stack(frames))
            next_obs = stack.to(device)
            next_mask = torch.from_numpy(np.stack([m for _, m in replayed])).to(device).bool()
            # the step before the checkpoint ended an episode where a later one has no action yet
            ended = [g["episodes"] > 1 and not g["actions"] for g in games["games"]]
            next_done = torch.tensor(ended, dtype=torch.float32, device=device)
            stats = self.envs.env  # RecordEpisodeStatistics: the returns of the episodes under way
            stats.episode_returns[:] = games["episode_returns"]
            stats.episode_lengths[:] = games["episode_lengths"]
            steps = sum(len(g["actions"]) for g in games["games"])
            print(
                f"the games are where the checkpoint left them ({sum(g['episodes'] for g in games['games'])} episodes "
                f"begun, {steps} steps replayed, {time.perf_counter() - started:.1f} s)",
                flush=True,
            )
        self.snapshot()
        return next_obs, next_mask, next_done

    def snapshot(self):
        """What a checkpoint of the state after this update holds besides the model: the generators and the games."""
        stats = self.envs.env
        self.saved_state = {
            "rng": rng_state(),
            "games": {
                "games": self.envs.unwrapped.call("position"),
                "episode_returns": stats.episode_returns.tolist(),
                "episode_lengths": stats.episode_lengths.tolist(),
            },
        }

    def save(self, iteration, global_step):
        path = os.path.join(self.run_dir, "checkpoint.pt")
        save_checkpoint(path, self.agent, self.optimizer, self.args, iteration, global_step, **self.saved_state)

    def stop_in_rollout(self):
        """A stop asked for during a rollout: the model is as the last update left it, so that state is saved at once,
        not after this update, and the run exits."""
        if self.rollout_start is None:
            self.rollout_start = time.perf_counter()
        if self.stop:
            iteration, global_step = self.at_last_update
            self.save(iteration, global_step)
            tqdm.write(
                f"stopped in iteration {iteration + 1}'s rollout; saved the state after iteration {iteration}. "
                f"Continue with: python {os.path.basename(__file__)} --resume {self.run_dir}"
            )
            sys.exit(self.stop.exit_code())

    def end_iteration(self, iteration, global_step, attention, obs, masks):
        """After an update: where its time went, progress, pictures, checkpoints, and a stop asked for meanwhile."""
        args, writer, now = self.args, self.writer, time.perf_counter()
        # perf/: the games' stepping, the rest of the rollout (policy, copies), the update (after its syncs)
        writer.add_scalar("perf/env_seconds", self.envs.seconds, global_step)
        writer.add_scalar("perf/rollout_seconds", self.envs.last_step_end - self.rollout_start, global_step)
        writer.add_scalar("perf/update_seconds", now - self.envs.last_step_end, global_step)
        writer.flush()  # a crash loses at most this iteration's curves
        self.stop.last_pass_seconds = now - self.rollout_start
        self.rollout_start, self.envs.seconds = None, 0.0

        sps = int((global_step - self.global_step) / (time.time() - self.start_time))
        eta = (args.num_iterations - iteration) * args.batch_size / max(sps, 1)
        returns, self.envs.returns = self.envs.returns, []
        mean_return = f"{np.mean(returns):.2f}" if returns else "-"
        alpha, beta, iou = (attention.get(f"charts/{k}", 0.0) for k in ("alpha", "beta", "attention_iou"))
        cam_empty = attention["charts/cam_empty_fraction"]
        self.bar.update(args.batch_size)
        self.bar.set_postfix(SPS=sps, refresh=False)
        tqdm.write(
            f"iter {iteration}/{args.num_iterations} global_step={global_step} SPS={sps} eta={duration(eta)} "
            f"episodes={len(returns)} mean_return={mean_return} alpha={alpha:.3f} beta={beta:.3f} iou={iou:.3f} "
            f"cam_empty={cam_empty:.2f}"
        )
        sys.stdout.flush()
        if iteration == self.start_iteration and eta > 86400:
            tqdm.write(
                f"warning: at {sps} SPS this run needs about {duration(eta)} more (the paper's 10M steps at 240 x 320 "
                "want a GPU). A CPU run that trains a Basic agent in about 5 min: "
                f"python {os.path.basename(__file__)} --env Basic --frame-height 60 --frame-width 80 "
                "--reward-scale 0.01 --total-timesteps 102400"
                + (  # measured in docs/results.md: both methods learn these at 60 x 80 in 1,024,000 steps
                    f"; {args.env} at 60 x 80 in about 40 min: python {os.path.basename(__file__)} --env {args.env} "
                    "--frame-height 60 --frame-width 80 --total-timesteps 1024000"
                    if args.env in ("TakeCover", "DefendCenter")
                    else ""
                ),
                file=sys.stderr,
            )
        self.collapsed_for = self.collapsed_for + 1 if cam_empty > 0.5 else 0
        if self.collapsed_for == args.collapse_patience:  # CAMAL has no gradient where the map is all zero
            warn(
                f"the critic's CAM has been empty for over half the samples for {self.collapsed_for} iterations "
                f"({cam_empty:.0%} now): CAMAL has no gradient there and attention IoU measures nothing. "
                "See docs/ppo_camal_vizdoom.md (--cam): --cam abs keeps the map alive."
            )

        # the first image after the first update, then every --image-every iterations, and the trained agent's
        last = iteration == args.num_iterations
        if args.image_every and (iteration == 1 or iteration % args.image_every == 0 or last):
            log_attention(
                writer, self.agent, args, obs.reshape((-1,) + obs.shape[2:]), masks.flatten(0, 1), global_step
            )
            if self.video_dir is not None:  # env 0's whole rollout of this iteration
                cams = self.agent.critic_cam(obs[:, 0], args.cam).cpu().numpy()
                clip = self.video()
                for t in range(args.num_steps):
                    clip.add(obs[t, 0, -1].cpu().numpy(), masks[t, 0].cpu().numpy(), cams[t])
                clip.write(f"train-iter-{iteration:06d}.mp4")
        self.at_last_update = (iteration, global_step)
        self.snapshot()
        if (args.checkpoint_every and iteration % args.checkpoint_every == 0) or (self.stop and not last):
            self.save(iteration, global_step)
        if self.stop and not last:
            tqdm.write(
                f"stopped at iteration {iteration}; continue with: python {os.path.basename(__file__)} "
                f"--resume {self.run_dir}"
            )
            sys.exit(self.stop.exit_code())
        if last:
            self.trained()

    def trained(self):
        """The training is done: the model file, and what a stop during the evaluation saves."""
        self.bar.close()  # before the evaluation's own output
        self.stop.point = "the training is done; saving its state and stopping (--resume completes the evaluation)"
        self.stop.last_pass_seconds = None  # the last iteration's time says nothing about the evaluation's
        if self.args.save_model:
            model_path = f"{self.run_dir}/{self.args.exp_name}.cleanrl_model"
            state = self.agent.state_dict()
            atomic_write(model_path, lambda f: torch.save(state, f))
            print(f"model saved to {model_path}")
        if self.args.eval_episodes:
            print(f"evaluating the trained policy over {self.args.eval_episodes} episodes", flush=True)

    def video(self):
        return Video(self.video_dir, 35 / self.args.frame_skip) if self.video_dir is not None else None

    def finish(self, episodes, by_chance):
        """eval.json from the evaluation's episodes and the random policy's returns; a stop during them saves the
        trained state (with the generators as the evaluation found them) and exits, so that --resume evaluates as this
        run would have."""
        if self.args.eval_episodes and (episodes is None or by_chance is None):
            # the last snapshot holds the generators as the last update left them: those the evaluation started from
            self.save(*self.at_last_update)
            tqdm.write(
                f"stopped during the final evaluation; complete it with: python {os.path.basename(__file__)} "
                f"--resume {self.run_dir}"
            )
            sys.exit(self.stop.exit_code())
        if episodes is not None:
            report_evaluation(episodes, by_chance, self.args, self.writer, self.run_dir, self.at_last_update[1])
        self.close()

    def close(self):
        if getattr(self, "bar", None) is not None:
            self.bar.close()
        self.envs.close()
        if self.tracked is not None and self.video_dir is not None:  # the mp4s go with the W&B run (monitor_gym)
            for name in sorted(os.listdir(self.video_dir)):
                self.tracked.save(os.path.join(self.video_dir, name), base_path="videos", policy="now")
        close_logs(self.writer, self.tracked)
        self.writer = self.tracked = None
        Run.active = None


class EnvMeter(gym.vector.VectorWrapper):
    """What the run reports of the games: the seconds spent stepping them (perf/env_seconds) and when the last step
    returned, and the returns of the episodes that ended (RecordEpisodeStatistics's, for the progress line). It also
    starts the games' watchdog the moment they exist, and closes it with them."""

    def __init__(self, env):
        super().__init__(env)
        self.seconds, self.last_step_end, self.returns = 0.0, None, []
        self.watchdog = guard_games()

    def close(self, **kwargs):
        super().close(**kwargs)
        if self.watchdog is not None:
            self.watchdog.stdin.close()  # its cue: the games are closed, nothing is left to end
            self.watchdog = None

    def step(self, actions):
        start = time.perf_counter()
        out = self.env.step(actions)
        self.last_step_end = time.perf_counter()
        self.seconds += self.last_step_end - start
        if "episode" in out[4]:
            self.returns += list(out[4]["episode"]["r"][out[4]["_episode"]])
        return out


# The watchdog: it waits until the trainer's end of its stdin closes (the trainer closed its games, or died), then
# ends the processes it was given that are still the same processes (a reused pid has another start time).
WATCHDOG = """import os, signal, sys
for s in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2):
    signal.signal(s, signal.SIG_IGN)  # the stop signals are for the trainer; this only cleans up after it
sys.stdin.read()
for pid, start in (a.split(":") for a in sys.argv[1:]):
    try:
        with open(f"/proc/{pid}/stat") as f:
            same = f.read().rsplit(")", 1)[1].split()[19] == start
        if same:
            os.kill(int(pid), signal.SIGKILL)
    except (OSError, IndexError):
        pass
"""


def games_damage(games, num_envs, num_actions):
    """What is wrong with a checkpoint's games (Run.snapshot) for num_envs games of num_actions actions, or None."""
    try:
        lists = (games["games"], games["episode_returns"], games["episode_lengths"])
        if any(len(v) != num_envs for v in lists):
            return f"they are not {num_envs} games"
        if not all(type(v) in (int, float) for v in [*lists[1], *lists[2]]):
            return "their record is damaged"
        for g in games["games"]:
            ints = [g["seed"], g["episodes"], *g["actions"]]
            if not all(type(v) is int for v in ints) or g["episodes"] < 1 or len(g["digest"]) != 2:
                return "their record is damaged"
            if not all(0 <= a < num_actions for a in g["actions"]):
                return f"they hold actions outside this scenario's {num_actions}"
    except (TypeError, KeyError):
        return "their record is damaged"
    return None


def put_back_games(envs, positions, keep):
    """A resumed run's games played back to their saved positions (VizDoomEnv.put_back), in the workers when async:
    [(the last `keep` frames, the newest mask)] per game."""
    envs.unwrapped.set_attr("saved_position", positions)
    return envs.unwrapped.call("put_back", keep)


def guard_games():
    """A watchdog process that ends this trainer's game engines and env workers if it dies without closing them (a
    SIGKILL, the OOM killer): they ignore the stop signals, so nothing else would. Linux only (/proc)."""
    if not os.path.isdir("/proc"):
        return None
    procs = {}  # pid: (parent, start time)
    for d in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{d}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            procs[int(d)] = (int(fields[1]), fields[19])
        except (OSError, IndexError, ValueError):
            pass
    games, parents = [], [os.getpid()]
    while parents:  # every descendant: the engines of a sync env, the workers of an async one and their engines
        children = [p for p, (parent, _) in procs.items() if parent == parents[-1]]
        parents = parents[:-1] + children
        games += [f"{p}:{procs[p][1]}" for p in children]
    return subprocess.Popen([sys.executable, "-c", WATCHDOG, *games], stdin=subprocess.PIPE, start_new_session=True)


class Video:
    """frame | mask | CAM panels of one clip, written as an mp4 (upscaled to at least 240 rows)."""

    def __init__(self, folder, fps):
        self.folder, self.fps, self.panels = folder, fps, []

    def add(self, frame, mask, cam):
        self.panels.append(attention_panel(frame, mask, cam, titles=("frame", "mask", "CAM")))

    def write(self, name):
        scale = max(1, 240 // self.panels[0].shape[0])
        h, w = self.panels[0].shape[0] * scale, self.panels[0].shape[1] * scale
        out = cv2.VideoWriter(os.path.join(self.folder, name), cv2.VideoWriter_fourcc(*"mp4v"), self.fps, (w, h))
        for p in self.panels:
            out.write(cv2.cvtColor(cv2.resize(p, (w, h), interpolation=cv2.INTER_NEAREST), cv2.COLOR_RGB2BGR))
        out.release()
        self.panels = []


def attention_panel(image, mask, cam, titles=("image", "mask", "CAM")):
    """H x 3W x 3 uint8 RGB, each part labelled: the image, the mask in red over it, the CAM as a jet overlay.
    image: H x W (gray) or H x W x 3 uint8; mask: H x W, non-zero inside; cam: H x W in [0, 1]."""
    rgb = np.repeat(image[..., None], 3, axis=2) if image.ndim == 2 else np.ascontiguousarray(image)
    inside = np.asarray(mask).astype(bool)
    masked = rgb.copy()
    masked[inside] = (0.5 * masked[inside] + 0.5 * np.array([255, 0, 0])).astype(np.uint8)
    heat = cv2.cvtColor(cv2.applyColorMap(np.uint8(255 * np.clip(cam, 0, 1)), cv2.COLORMAP_JET), cv2.COLOR_BGR2RGB)
    parts = [rgb.copy(), masked, np.uint8(0.5 * rgb + 0.5 * heat)]
    scale = max(0.3, rgb.shape[0] / 400)  # readable at 60 x 80 and at 224 x 224
    for part, title in zip(parts, titles):
        for colour, thickness in (((0, 0, 0), 2), ((255, 255, 255), 1)):  # white on a dark edge: readable on any image
            org, font = (2, 2 + int(22 * scale)), cv2.FONT_HERSHEY_SIMPLEX
            cv2.putText(part, title, org, font, scale, colour, thickness, cv2.LINE_AA)
    return np.concatenate(parts, axis=1)


def log_attention(writer, agent, args, b_obs, b_masks, global_step):
    """TensorBoard: frame | mask | CAM for up to 4 frames with objects on screen, spread over the rollout."""
    has_obj = torch.nonzero(b_masks.flatten(1).any(1)).flatten().cpu()
    pick = has_obj if len(has_obj) else torch.arange(args.batch_size)
    pick = pick[torch.linspace(0, len(pick) - 1, min(4, len(pick))).long()].to(b_obs.device)
    cams = agent.critic_cam(b_obs[pick], args.cam).cpu().numpy()
    panels = [
        attention_panel(b_obs[j, -1].cpu().numpy(), b_masks[j].cpu().numpy(), c, titles=("frame", "mask", "CAM"))
        for j, c in zip(pick, cams)
    ]
    writer.add_image("attention/frame_mask_cam", np.concatenate(panels, axis=0), global_step, dataformats="HWC")


def report_evaluation(episodes, by_chance, args, writer, run_dir, global_step):
    """The evaluation's episodes in TensorBoard and in eval.json (stats.py reads it), and its line."""
    for idx, ep in enumerate(episodes):
        writer.add_scalar("eval/episodic_return", ep["return"], idx)
        if ep["attention_iou"] is not None:
            writer.add_scalar("eval/attention_iou", ep["attention_iou"], idx)
    # the same policy's attention under every --cam: vanilla trains without a CAM, so it is every formulation's baseline
    by_cam = {}
    for kind in CAM_KINDS:
        ious = [
            ep["by_cam"][kind]["attention_iou"] for ep in episodes if ep["by_cam"][kind]["attention_iou"] is not None
        ]
        empty = [ep["by_cam"][kind]["cam_empty_fraction"] for ep in episodes]
        by_cam[kind] = {"mean_iou": float(np.mean(ious)) if ious else None, "cam_empty_fraction": float(np.mean(empty))}
    result = {
        "env": args.env,
        "method": args.method,
        "seed": args.seed,
        "total_timesteps": global_step,
        "mean_return": float(np.mean([ep["return"] for ep in episodes])),
        "mean_iou": by_cam[args.cam]["mean_iou"],
        "episodic_returns": [ep["return"] for ep in episodes],
        "episodic_lengths": [ep["length"] for ep in episodes],
        "episodic_iou": [ep["attention_iou"] for ep in episodes],
        "cam_empty_fraction": by_cam[args.cam]["cam_empty_fraction"],
        "cam": args.cam,
        "tau": args.tau,
        "camal_coef": args.camal_coef,
        "reward_scale": args.reward_scale,
        "by_cam": by_cam,
        "episodic_truncated": [ep["truncated"] for ep in episodes],  # ended by a time limit, not by the game
        "eval_max_steps": args.eval_max_steps,
        "random_returns": by_chance,  # a random policy's, over the same seeds and episodes
        "random_mean_return": float(np.mean(by_chance)),
        "run_name": os.path.basename(run_dir),
    }
    write_json(os.path.join(run_dir, "eval.json"), result, indent=2)
    print(
        f"eval: mean_return={result['mean_return']:.2f} mean_iou={result['mean_iou']} over {len(episodes)} episodes "
        f"(a random policy: {result['random_mean_return']:.2f})"
    )


# Files: every file a run writes goes through atomic_write, every file it reads through read_json or read_torch.
# Copied unchanged into the other scripts; tests/test_shared_helpers.py keeps the copies identical.
class RunFileError(ValueError):
    """A file that cannot be written or read as it should be; the message names the file and says what is wrong."""


def first_line(e):
    """An exception's first line, whole (a cut one once ended "Last error: An err"), or its type's name when it has no
    message (an EOFError from an empty file)."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


WRITE_FAILURES = {
    errno.ENOSPC: "the disk is full",
    errno.EDQUOT: "the disk quota is used up",
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "its folder is not writable",
    errno.EPERM: "its folder is not writable",
}


def atomic_write(path, write, previous=None):
    """Write `path` all at once: write(f) into `path`.tmp beside it (binary), fsync, rename. A crash, a full disk or a
    read-only folder leaves what was there whole and no .tmp behind, and raises RunFileError saying which file and why.
    previous: where the file it replaces is kept (checkpoint.prev.pt), so a whole copy exists at every moment."""
    tmp = f"{path}.tmp"
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())  # on disk before it replaces anything
        if previous is not None and os.path.isfile(path):
            os.replace(path, previous)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # RuntimeError: torch.save's zip writer when the disk fills
        try:
            free = shutil.disk_usage(os.path.dirname(os.path.abspath(path))).free
        except OSError:
            free = None
        full = free is not None and free < 2**20
        why = WRITE_FAILURES.get(getattr(e, "errno", None)) or ("the disk is full" if full else first_line(e))
        room = f" ({free / 2**20:.0f} MB free there)" if free is not None else ""
        raise RunFileError(f"cannot write {path}: {why}{room}") from None
    finally:
        if os.path.lexists(tmp):  # whatever stopped the write: no half file is left behind
            try:
                os.remove(tmp)
            except OSError:
                pass


def write_json(path, obj, **kw):
    """JSON through atomic_write: a reader never sees half a file, a crash never leaves one."""
    atomic_write(path, lambda f: f.write(json.dumps(obj, **kw).encode()))


def read_json(path, kind=dict):
    """A JSON file that should hold a `kind` (dict or list); RunFileError naming the file and what is wrong with it."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise RunFileError(f"cannot read {path}: {e.strerror or first_line(e)}") from None
    if not data.strip():
        raise RunFileError(f"{path} is empty (a write that was cut short?)")
    try:
        obj = json.loads(data)
    except ValueError as e:  # not JSON, cut short, or not text at all
        raise RunFileError(f"{path} is not whole JSON, truncated or corrupt ({first_line(e)})") from None
    if not isinstance(obj, kind):
        raise RunFileError(f"{path} holds a JSON {type(obj).__name__}, where a {kind.__name__} belongs")
    return obj


def read_torch(path):
    """torch.load with weights only (tensors and plain values: a file from elsewhere cannot run code); RunFileError
    naming the file and what is wrong: missing, unreadable, empty, truncated, random bytes or pickled code."""
    try:
        with open(path, "rb") as f:  # missing, a folder, no permission: said as such, before torch sees the file
            empty = not f.read(1)
    except OSError as e:
        raise RunFileError(f"cannot read {path}: {e.strerror or first_line(e)}") from None
    if empty:
        raise RunFileError(f"{path} is empty (a write that was cut short?)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "Unsupported global" in str(e):
            raise RunFileError(
                f"{path} holds pickled Python objects, not only tensors (an older version of this script wrote it, or "
                "something else did); loading it could run code, so it is refused"
            ) from None
        raise RunFileError(f"{path} is not a file torch.save wrote (random or corrupt bytes)") from None
    except Exception as e:  # truncated or corrupt: zip, pickle, storage and OS errors of every kind (a cut zip: EINVAL)
        raise RunFileError(f"{path} is truncated or corrupt ({type(e).__name__}: {first_line(e)})") from None


def make_folder(path):
    """os.makedirs, or a RunFileError that says why not: a file in the way, a folder that is not writable."""
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        parts = os.path.normpath(path).split(os.sep)
        files = [p for p in (os.sep.join(parts[:i]) for i in range(1, len(parts) + 1)) if os.path.isfile(p)]
        why = f"{files[0]} is a file" if files else WRITE_FAILURES.get(e.errno) or e.strerror or first_line(e)
        raise RunFileError(f"cannot make the folder {path}: {why}") from None


def unwritable(path):
    """Why the folder `path` could not be made or written in (a file in the way, no permission), or None. Checked before
    any work, so an output never fails once the work is done; nothing is created."""
    here = os.path.abspath(path)
    while not os.path.exists(here):
        here = os.path.dirname(here)
    if not os.path.isdir(here):
        return f"{here} is a file"
    return None if os.access(here, os.W_OK) else f"{here} is not writable"


def state_bytes(obj):
    """The bytes of the tensors in a (nested) state: about what torch.save writes."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(state_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(state_bytes(v) for v in obj)
    return 0


# Checkpoints and resume: copied unchanged into train_dl_camal.py (tests/test_shared_helpers.py)
def rng_state():
    """Every random generator's state, in types torch.load(weights_only=True) accepts (numpy's as plain lists)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": [kind, keys.tolist(), pos, has_gauss, cached],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def restore_rng(state):
    """Put back the generators saved by rng_state()."""
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def write_checkpoint(path, state):
    """Save `state` to path atomically and keep the one before as checkpoint.prev.pt beside it: a crash, a full disk or
    a copy cut short leaves at least one whole checkpoint. A save briefly holds three checkpoints, so the room for one
    more is checked first: RunFileError, before anything is written, when it is not there."""
    need, folder = state_bytes(state) + 2**20, os.path.dirname(os.path.abspath(path))
    free = shutil.disk_usage(folder).free
    if free < need:
        raise RunFileError(
            f"no room for a checkpoint in {folder}: it needs about {need / 2**20:.0f} MB beside the two kept "
            f"(checkpoint.pt and checkpoint.prev.pt), and {free / 2**20:.0f} MB are free"
        )
    atomic_write(path, lambda f: torch.save(state, f), previous=previous_checkpoint(path))


def previous_checkpoint(path):
    root, ext = os.path.splitext(path)
    return f"{root}.prev{ext}"  # checkpoint.pt -> checkpoint.prev.pt


def read_checkpoint(path, keys):
    """The checkpoint at path, or the previous one (checkpoint.prev.pt) when path is missing or unreadable (with a
    warning); RunFileError if neither is whole. Loaded through read_torch: a file from elsewhere cannot run code.
    `keys`: the entries a checkpoint of this script holds."""
    problems = []
    for p in (path, previous_checkpoint(path)):
        if not os.path.lexists(p):
            continue
        try:
            state = read_torch(p)
        except RunFileError as e:
            problems.append(str(e))
            continue
        if not isinstance(state, dict) or not set(keys) <= set(state) or not isinstance(state["args"], dict):
            problems.append(f"{p} is not a checkpoint of this script (it needs {sorted(keys)})")
            continue
        if p != path:
            every = state["args"].get("checkpoint_every")
            lost = f"up to {every} iterations or epochs of progress" if every else "the progress since the one before"
            why = problems[-1] if problems else f"{path} is missing"
            warn(f"{why}; resuming from the previous checkpoint {p}: {lost} will be redone")
        return state
    names = f"neither {os.path.basename(path)} nor {os.path.basename(previous_checkpoint(path))}"
    raise RunFileError("; ".join(problems) or f"no checkpoint in {os.path.dirname(path) or '.'} ({names})")


def ignored_flags(cli, saved, keep):
    """The flags given with --resume that the run does not take (it continues with its own settings), as text."""
    default = type(cli)()
    return [
        f"--{k.replace('_', '-')} {getattr(cli, k)} (the run's: {saved.get(k)})"
        for k in cli.__dataclass_fields__
        if k not in keep and getattr(cli, k) != getattr(default, k) and getattr(cli, k) != saved.get(k)
    ]


def read_resume(args, finished, keys, keep, retired=()):
    """(the run's own Args, its checkpoint) for --resume RUN; the flags given beside it, other than `keep`, are ignored
    with a warning. finished: (the file a finished run has, a hint). retired: settings of older versions that did not
    change what was computed, dropped. Raises FileNotFoundError, ValueError or RunFileError with a message that says
    why the run cannot resume."""
    if not os.path.isdir(args.resume):
        exists = os.path.exists(args.resume)
        raise FileNotFoundError(
            f"--resume {args.resume} " + ("is a file, not a run folder" if exists else "does not exist")
        )
    try:
        entries = set(os.listdir(args.resume))
    except OSError as e:
        raise RunFileError(f"--resume {args.resume} cannot be read: {e.strerror}") from None
    if finished[0] in entries:
        raise ValueError(
            f"--resume {args.resume}: this run finished (its {finished[0]} is there); there is nothing to "
            f"resume{finished[1]}"
        )
    if not entries & {
        "checkpoint.pt",
        "checkpoint.prev.pt",
    }:  # the previous one alone is whole (a crash between renames)
        raise FileNotFoundError(
            f"--resume {args.resume}: no checkpoint.pt there (a run saves one every --checkpoint-every and when it is "
            "stopped)"
        )
    try:
        checkpoint = read_checkpoint(os.path.join(args.resume, "checkpoint.pt"), keys)
    except RunFileError as e:
        raise RunFileError(f"--resume {args.resume}: {e}") from None
    # the run continues with the settings it was started with
    saved = {k: v for k, v in checkpoint["args"].items() if k not in retired}
    ignored = ignored_flags(args, saved, keep=keep)
    if ignored:
        warn(f"--resume continues with the run's own settings; ignored: {', '.join(ignored)}")
    saved.update({k: getattr(args, k) for k in keep})
    unknown = set(saved) - set(type(args).__dataclass_fields__)
    if unknown:
        raise ValueError(
            f"--resume {args.resume}: the checkpoint has settings this version does not know: {sorted(unknown)}"
        )
    hints = get_type_hints(type(args))
    wrong = [f"{k}={v!r}" for k, v in saved.items() if not fits_type(v, hints[k])]
    if wrong:
        raise RunFileError(f"--resume {args.resume}: the checkpoint's settings are damaged: {', '.join(wrong)}")
    return type(args)(**saved), checkpoint


def fits_type(value, hint):
    """Whether a saved setting is a value of its Args field's type (bool, int, float, str, Optional, Literal)."""
    if get_origin(hint) is Literal:
        return value in get_args(hint)
    if get_origin(hint) is Union:
        return any(fits_type(value, h) for h in get_args(hint))
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


PPO_CHECKPOINT_KEYS = ("args", "agent", "optimizer", "iteration", "global_step", "rng")
# settings older versions recorded that did not change what was computed (the frame stack was built in the games, or
# on the device: the same agent; the paper's Figure 11 is drawn by drl_attention_figure.py)
RETIRED_SETTINGS = ("frame_stack_on", "figure", "figure_frames", "figure_out")


def save_checkpoint(path, agent, optimizer, args, iteration, global_step, rng=None, games=None):
    """rng and games: the generators and the games' positions as the update at `iteration` left them (Run.snapshot;
    rng None: the generators now; games None: a checkpoint whose resumed run starts new episodes)."""
    rng = rng_state() if rng is None else rng
    state = {"args": asdict(args), "agent": agent.state_dict(), "optimizer": optimizer.state_dict(), "rng": rng}
    write_checkpoint(path, {**state, "iteration": iteration, "global_step": global_step, "games": games})
    # where a resume would start, for readers without torch (stats.py): events past this step are redone, not kept
    write_json(os.path.splitext(path)[0] + ".json", {"iteration": iteration, "global_step": global_step})


def resume_from(args):
    """(the run's own Args, its checkpoint) for --resume RUN; a clear message and exit code 2 when it cannot resume.
    A run trained to its last iteration resumes when its eval.json (or its --save-model file) is missing."""
    try:
        finished = ("eval.json", "")
        args, checkpoint = read_resume(args, finished, PPO_CHECKPOINT_KEYS, ("resume", "cuda"), RETIRED_SETTINGS)
    except (FileNotFoundError, ValueError) as e:  # RunFileError is a ValueError
        exit_error(str(e))
    trained = checkpoint["iteration"] >= args.total_timesteps // (args.num_envs * args.num_steps)
    model_missing = args.save_model and not os.path.isfile(os.path.join(args.resume, f"{args.exp_name}.cleanrl_model"))
    if trained and not args.eval_episodes and not model_missing:  # with an evaluation, eval.json marks the end
        exit_error(
            f"--resume {args.resume}: this run finished (its checkpoint is at the last iteration); there is nothing to "
            "resume"
        )
    return args, checkpoint


# Stops, logs, the record of the environment: copied unchanged into train_dl_camal.py (tests/test_shared_helpers.py)
class StopRequest:
    """The stop the signals ask for, as one object: the handler sets it, the training loop reads it (no globals).

    Ctrl-C, SIGTERM, or SIGUSR1/SIGUSR2 (what SLURM and submitit send before pre-empting or timing out a job) ask for
    a stop at the next safe point, which `point` describes. Only a second Ctrl-C stops at once: schedulers repeat their
    signal (SLURM signals every process of the job, and benchmark.py forwards one more), and that is still one stop.
    """

    def __init__(self, point, unit):
        self.point, self.unit = (
            point,
            unit,
        )  # what the run does when asked, and what it calls one pass (for the message)
        self.signum = None  # the signal that asked, once one has
        self.last_pass_seconds = None  # how long the last pass took, set by the loop

    def __bool__(self):
        return self.signum is not None

    def exit_code(self):
        return 128 + (self.signum or signal.SIGTERM)  # SIGTERM: another DDP process was asked

    def handle(self, signum, frame):
        if self.signum is not None:
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            return
        self.signum = signum
        pace = f" (the last {self.unit} took {self.last_pass_seconds:.0f} s)" if self.last_pass_seconds else ""
        name = signal.Signals(signum).name
        print(f"\n{name}: {self.point}{pace}; Ctrl-C again stops at once, without saving", flush=True)

    def catch(self):
        # the stops of a terminal, a scheduler
        for s in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2):
            signal.signal(s, self.handle)
        return self


def start_tracking(args, run_name, run_dir):
    """CleanRL's --track: a Weights and Biases run that mirrors the TensorBoard events (scalars, images). Its id comes
    from the run's name, so a resumed run continues the same W&B run. WANDB_MODE=offline keeps it on disk."""
    try:
        import wandb
    except ImportError:
        raise ValueError("--track needs wandb: pip install -r requirements-cluster.txt") from None
    import hashlib

    try:
        return wandb.init(
            project=args.wandb_project_name,
            entity=args.wandb_entity,
            sync_tensorboard=True,
            config=vars(args),
            name=run_name,
            id=hashlib.sha1(run_name.encode()).hexdigest()[:16],
            resume="allow",
            save_code=True,
            dir=run_dir,
        )
    except Exception as e:  # no API key, no network, a bad entity: W&B's own errors
        raise ValueError(
            f"--track: Weights and Biases did not start ({first_line(e)}); run `wandb login` or set WANDB_API_KEY, "
            "or WANDB_MODE=offline to keep the run on disk"
        ) from None


def open_logs(args, run_name, run_dir, purge_step):
    """(TensorBoard writer, W&B run or None). purge_step: where a resumed run's curves restart, so events a stopped or
    crashed run logged from there on are dropped, not doubled; None for a new run, which also logs its
    hyperparameters."""
    tracked = start_tracking(args, run_name, run_dir) if args.track else None  # first, so W&B mirrors the events
    # TensorBoard writes from a thread: its OSError (a full disk) comes back at the next write, where the run says why
    threading.excepthook = lambda a: None if issubclass(a.exc_type, OSError) else threading.__excepthook__(a)
    writer = SummaryWriter(run_dir, purge_step=purge_step)
    if purge_step is None:
        table = "\n".join(f"|{k}|{v}|" for k, v in vars(args).items())
        writer.add_text("hyperparameters", f"|param|value|\n|-|-|\n{table}")
    return writer, tracked


def close_logs(writer, tracked):
    if writer is not None:
        try:
            writer.close()
        except OSError:  # a full disk: the events written so far stay readable, and the run has said why it stopped
            pass
    if tracked is not None:
        tracked.finish()


def describe_device(device):
    if device.type == "cuda":
        return f"GPU {torch.cuda.get_device_name(device)}"
    return f"CPU ({torch.get_num_threads()} threads; --cuda uses a GPU where there is one)"


ENVIRONMENT_PACKAGES = ("torch", "torchvision", "vizdoom", "gymnasium", "numpy", "scipy", "rliable")


def package_version(name):
    """The installed version of a distribution, or None where it is not installed."""
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def record_environment(run_dir, device):
    """Append to run_dir/environment.json what this process trains with: package versions, the git commit (and whether
    tracked files were changed), the device. One entry per start or resume, so a run resumed under other versions says
    so."""

    def git(*cmd):
        here = os.path.dirname(os.path.abspath(__file__))
        try:
            done = subprocess.run(["git", "-C", here, *cmd], capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):  # no git here
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    entry = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "script": os.path.basename(__file__),
        "python": sys.version.split()[0],
        "packages": {name: package_version(name) for name in ENVIRONMENT_PACKAGES},
        "git": None if commit is None else {"commit": commit, "dirty": bool(git("status", "--porcelain", "-uno"))},
        "device": describe_device(device),
        "cuda": torch.version.cuda,
    }
    path = os.path.join(run_dir, "environment.json")
    try:
        entries = read_json(path, kind=list) if os.path.exists(path) else []
    except RunFileError as e:  # not a reason to stop the run; kept aside, and the new record says what it lost
        kept = path + ".damaged"
        try:
            os.replace(path, kept)
        except OSError:
            kept = None
        warn(
            f"{first_line(e)}: which code and packages made this run before now is unknown; "
            f"{f'kept as {kept}, and ' if kept else ''}the new record says so (stats.py warns)"
        )
        entries, entry["earlier_record_lost"] = [], True
    write_json(path, entries + [entry], indent=2)


def duration(seconds):
    """3d 4h, 2h 05m, 4m 10s: an ETA a reader takes in at a glance."""
    seconds = int(seconds)
    if seconds >= 86400:
        return f"{seconds // 86400}d {seconds % 86400 // 3600}h"
    if seconds >= 3600:
        return f"{seconds // 3600}h {seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m {seconds % 60:02d}s"


def warn(message):
    print(f"warning: {message}", file=sys.stderr, flush=True)


def exit_error(message):
    """Bad input, or a file that cannot be used: one line on stderr and exit code 2, no traceback."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


# The command line: the flags checked at the door
# (flag, lowest, highest, whether the lowest is allowed) of the real-valued flags; target_kl may also be None
NUMBERS = (
    ("learning_rate", 0.0, math.inf, False),
    ("gamma", 0.0, 1.0, True),
    ("gae_lambda", 0.0, 1.0, True),
    ("clip_coef", 0.0, math.inf, False),
    ("ent_coef", 0.0, math.inf, True),
    ("vf_coef", 0.0, math.inf, True),
    ("max_grad_norm", 0.0, math.inf, False),
    ("target_kl", 0.0, math.inf, False),
    ("camal_coef", 0.0, math.inf, True),
    ("reward_scale", 0.0, math.inf, False),
)


def check_args(args):
    """Reject settings that cannot run, with a message that says why."""
    if args.frame_height <= 0 or args.frame_width <= 0:
        raise ValueError(
            f"--frame-height and --frame-width must be positive, got {args.frame_height} x {args.frame_width}"
        )
    nature_cnn_output_size(args.frame_height, args.frame_width)
    render_resolution(args.frame_height, args.frame_width)
    for name in ("num_envs", "num_steps", "num_minibatches", "update_epochs", "frame_skip", "frame_stack"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    for name in ("eval_episodes", "eval_max_steps", "image_every", "checkpoint_every", "collapse_patience"):
        if getattr(args, name) < 0:
            raise ValueError(f"--{name.replace('_', '-')} must not be negative, got {getattr(args, name)}")
    if args.total_timesteps <= 0:
        raise ValueError(f"--total-timesteps must be positive, got {args.total_timesteps}")
    batch_size = args.num_envs * args.num_steps
    if args.total_timesteps < batch_size:
        raise ValueError(
            f"--total-timesteps {args.total_timesteps} is less than one rollout (num-envs x num-steps = {batch_size})"
        )
    if batch_size % args.num_minibatches:
        raise ValueError(f"num-envs x num-steps = {batch_size} does not split into {args.num_minibatches} minibatches")
    # the rollout's frames and masks (uint8, on the device) and the games (about 100 MB each): refused now, with the
    # figure, rather than by the kernel's OOM killer an iteration in
    frames = args.num_steps * args.num_envs * (args.frame_stack + 1) * args.frame_height * args.frame_width
    gpu = args.cuda and torch.cuda.is_available()
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    room = torch.cuda.get_device_properties(0).total_memory if gpu else ram - args.num_envs * 100 * 2**20
    if frames > 0.8 * room:
        where = "the GPU's" if gpu else "this machine's (less the games')"
        raise ValueError(
            f"a rollout of --num-envs {args.num_envs} x --num-steps {args.num_steps} frames of "
            f"{args.frame_stack + 1} x {args.frame_height} x {args.frame_width} bytes needs about "
            f"{frames / 2**30:.1f} GiB, more than 80 % of "
            f"{where} {max(room, 0) / 2**30:.1f} GiB: lower --num-envs, --num-steps or the frame size"
        )
    if not 0.0 <= args.tau < 1.0:
        raise ValueError(f"--tau must lie in [0, 1), got {args.tau}")
    if not 0 <= args.seed < 2**31:
        raise ValueError(f"--seed must lie in 0 .. 2**31 - 1 (the games' and numpy's seeds), got {args.seed}")
    for name, low, high, low_allowed in NUMBERS:  # nan fails every comparison, so it is refused here too
        v = getattr(args, name)
        in_range = (
            isinstance(v, (int, float)) and math.isfinite(v) and (v >= low if low_allowed else v > low) and v <= high
        )
        if v is not None and not in_range:
            bound = f"{'at least' if low_allowed else 'above'} {low:g}" + (
                f" and at most {high:g}" if high < math.inf else ""
            )
            raise ValueError(f"--{name.replace('_', '-')} must be a number {bound}, got {v}")


def parse_args():
    """(Args, the checkpoint of --resume or None), checked; bad input exits with code 2 and a message."""
    args = tyro.cli(Args)
    args, checkpoint = resume_from(args) if args.resume is not None else (args, None)
    try:
        check_args(args)
    except (ValueError, TypeError) as e:  # TypeError: a checkpoint whose settings have the wrong types
        exit_error(str(e))
    return args, checkpoint


# what a stop during training does (the answer to a Ctrl-C or a scheduler's signal)
TRAINING_STOP = (
    "saving a checkpoint and stopping within a step during a rollout (the model has not changed since the last "
    "update), else after this update"
)

if __name__ == "__main__":
    stop = StopRequest(TRAINING_STOP, "iteration").catch()  # from the start: the games are shielded, this process not
    args, checkpoint = parse_args()
    try:
        main(args, checkpoint, stop)
    except KeyboardInterrupt:  # a second Ctrl-C: stop at once, no traceback
        print(
            "\nstopped at once, without a checkpoint; the last saved one (if any) is in the run folder", file=sys.stderr
        )
        sys.exit(128 + signal.SIGINT)
    except (RunFileError, OSError) as e:  # a full disk or a folder made read-only (TensorBoard's writer: OSError)
        run_dir = Run.active.run_dir if Run.active else "runs/"
        why = (
            e
            if isinstance(e, RunFileError)
            else f"cannot write in {run_dir}: {WRITE_FAILURES.get(e.errno) or first_line(e)}"
        )
        kept = [n for n in ("checkpoint.pt", "checkpoint.prev.pt") if os.path.isfile(os.path.join(run_dir, n))]
        last = f"The last whole checkpoint is in {run_dir}: make room, then --resume {run_dir}"
        exit_error(f"{why}. " + (last if kept else "No checkpoint was saved."))
    finally:
        if Run.active is not None:
            Run.active.close()
