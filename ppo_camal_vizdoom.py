# PPO with CAMAL (Class Activation Map Attention Learning) on ViZDoom.
# The critic's Grad-CAM is pulled onto the game objects that ViZDoom's labels buffer marks
# on screen and pushed off everything else: L = L_PPO + lambda * mean_b(beta_b - alpha_b).
# Single-file in CleanRL's style (cleanrl/ppo_atari.py); hyperparameters follow the paper's Table 8.
import errno
import json
import math
import os
import pickle
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from importlib import metadata
from typing import Literal, Optional, Tuple

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

FRAME_TITLES = ("frame", "mask", "CAM")  # the labels of the attention images
CAM_KINDS = ("abs", "paper", "abs-target")  # --cam's choices; the evaluation measures IoU under each
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
    """if toggled, this experiment will be tracked with Weights and Biases (pip install -r requirements-cluster.txt)"""
    wandb_project_name: str = "camal"
    """the wandb's project name"""
    wandb_entity: Optional[str] = None
    """the entity (team) of wandb's project"""
    capture_video: bool = False
    """write mp4s of frame | mask | CAM to videos/{run_name}/ (env 0's rollout at the image cadence, and every evaluation episode)"""
    save_model: bool = False
    """save the trained agent to runs/{run_name}/{exp_name}.cleanrl_model"""

    # Environment
    env: Literal["Basic", "DefendLine", "DefendCenter", "TakeCover"] = "TakeCover"
    """the ViZDoom scenario: Basic, DefendLine, DefendCenter or TakeCover"""
    frame_skip: int = 4
    """how many game tics each action is repeated for"""
    frame_height: int = 240
    """observation height in pixels (240 x 320 is the paper's; 60 x 80 makes quick CPU runs)"""
    frame_width: int = 320
    """observation width in pixels"""
    frame_stack: int = 4
    """how many frames the agent sees, the newest included"""
    frame_stack_on: Literal["device", "env"] = "device"
    """where the stack is built: device = each game sends only its newest frame and the stack is kept where the model runs (a quarter of the copies); env = each game sends its whole stack (the older way, kept to measure the change: benchmarks/gpu_check.py). The agent sees the same frames either way"""
    num_envs: int = 8
    """the number of parallel game environments"""
    vector_env: Literal["auto", "async", "sync"] = "auto"
    """async: games step in worker processes; sync: in this process; auto: async when the machine has more than 2 cores (docs/ppo_camal_vizdoom.md)"""

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
    """rewards are multiplied by this before Table 8's [-1, 1] clip (1: the paper's); 0.01 is ViZDoom's and Sample Factory's scale, under which a kill is worth more than a step: on Basic both methods learn 2-3 times sooner, to the same final return (docs/results.md)"""

    # CAMAL
    method: Literal["camal", "vanilla"] = "camal"
    """camal: PPO plus the CAMAL loss; vanilla: plain PPO (attention is still measured)"""
    camal_coef: float = 1.0
    """lambda, the weight of the CAMAL loss (Eq. 2)"""
    tau: float = 0.7
    """the threshold on H for the attention IoU"""
    cam: Literal["abs", "paper", "abs-target"] = "abs"
    """the critic's CAM: abs = |mean_k w_k A_k| of V(s) (default: never empty, docs/ppo_camal_vizdoom.md); paper = ReLU(mean_k w_k A_k) of V(s), Eq. 3 exactly; abs-target = the paper's CAM of |V(s)|"""
    collapse_patience: int = 5
    """warn when over half the CAMs are empty (all zero) for this many iterations in a row"""

    # Logging, evaluation, checkpoints
    image_every: int = 50
    """log a frame | mask | CAM image to TensorBoard every this many iterations (0: never)"""
    eval_episodes: int = 10
    """episodes played with the trained policy at the end (0: no evaluation)"""
    checkpoint_every: int = 0
    """save a checkpoint every this many iterations (0: only when interrupted)"""
    resume: Optional[str] = None
    """a run folder (runs/{run_name}) to continue from its last checkpoint"""
    figure: Optional[Tuple[str, str]] = None
    """train nothing: draw the paper's Figure 11 from two run folders saved with --save-model (e.g. camal, then vanilla); the first run's policy plays, both agents' CAMs are drawn on the same frames"""
    figure_frames: int = 4
    """--figure: how many frames (with an object on screen) to draw, spread over the play"""
    figure_out: Optional[str] = None
    """--figure: the PNG to write (default: figure11_{env}.png)"""

    # to be filled in runtime
    batch_size: int = 0
    """the batch size (computed in runtime)"""
    minibatch_size: int = 0
    """the mini-batch size (computed in runtime)"""
    num_iterations: int = 0
    """the number of iterations (computed in runtime)"""


# ---------------------------------------------------------------------------------------------
# CAMAL: the attention map and the loss (Eq. 2-4). Copied unchanged into the other scripts;
# tests/test_shared_helpers.py keeps the copies identical.
# ---------------------------------------------------------------------------------------------
def grad_cam(activations, score, size, *, create_graph, to_nchw=None, rectify="relu"):
    """Grad-CAM of every sample in a batch from one backward pass (the paper's Eq. 3 and 4).

    activations: the feature map in the graph that `score` was computed from.
    score: one target per sample (B or B x 1), e.g. the ground-truth logit or V(s).
    size: (H, W) of the returned maps. to_nchw: maps activations and gradients to B x K x h x w
    when the model's layout differs. rectify: "relu" is Grad-CAM (Eq. 3); "abs" keeps the evidence that
    lowers the score too, |sum_k w_k A_k|, so a map is empty only where no feature moves the score.
    create_graph: True for a map a loss will be differentiated through (CAMAL's double backward); False for a measurement,
    which keeps no graph. Returns B x H x W in [0, 1].
    """
    # d(sum_b score_b)/dA: one backward gives every sample's gradient (Proposition 1).
    grads = torch.autograd.grad(score, activations, grad_outputs=torch.ones_like(score), create_graph=create_graph, retain_graph=True)[0]
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


# ---------------------------------------------------------------------------------------------
# Environment: ViZDoom games, their object masks, the frame stack
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
    """One ViZDoom game: stacked grayscale frames plus the object mask of the newest frame."""

    metadata = {"render_modes": []}

    def __init__(self, env, frame_skip, frame_height, frame_width, frame_stack):
        self.game = vzd.DoomGame()
        self.game.load_config(os.path.join(vzd.scenarios_path, SCENARIOS[env]))
        self.game.set_window_visible(False)
        self.game.set_mode(vzd.Mode.PLAYER)
        self.game.set_screen_format(vzd.ScreenFormat.GRAY8)
        self.game.set_screen_resolution(render_resolution(frame_height, frame_width))
        self.game.set_labels_buffer_enabled(True)
        self.game.init()
        n = self.game.get_available_buttons_size()
        self.buttons = np.eye(n, dtype=bool).tolist()  # one button per action, as in ViZDoom's examples
        self.frame_skip, self.size = frame_skip, (frame_height, frame_width)
        self.action_space = gym.spaces.Discrete(n)
        self.observation_space = gym.spaces.Dict(
            {
                "frames": gym.spaces.Box(0, 255, (frame_stack, frame_height, frame_width), np.uint8),
                "mask": gym.spaces.Box(0, 1, (frame_height, frame_width), np.uint8),
            }
        )
        self.frames = np.zeros((frame_stack, frame_height, frame_width), np.uint8)
        self.mask = np.zeros((frame_height, frame_width), np.uint8)

    def _observe(self, reset):
        state = self.game.get_state()
        h, w = self.size
        frame, labels_buffer = state.screen_buffer, state.labels_buffer
        if frame.shape != (h, w):
            frame = cv2.resize(frame, (w, h), interpolation=cv2.INTER_AREA)
            labels_buffer = cv2.resize(labels_buffer, (w, h), interpolation=cv2.INTER_NEAREST)
        if reset:
            self.frames[:] = frame
        else:
            self.frames[:-1] = self.frames[1:]
            self.frames[-1] = frame
        self.mask = labels_to_mask(labels_buffer, state.labels).astype(np.uint8)
        return {"frames": self.frames.copy(), "mask": self.mask.copy()}

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        if seed is not None:
            self.game.set_seed(seed)
        self.game.new_episode()
        return self._observe(reset=True), {}

    def step(self, action):
        reward = self.game.make_action(self.buttons[int(action)], self.frame_skip)
        if self.game.is_episode_finished():
            timeout = self.game.get_episode_timeout()
            truncated = bool(timeout) and self.game.get_episode_time() >= timeout and not self.game.is_player_dead()
            # no state after the end: the autoreset replaces this observation anyway
            return {"frames": self.frames.copy(), "mask": self.mask.copy()}, reward, not truncated, truncated, {}
        return self._observe(reset=False), reward, False, False, {}

    def close(self):
        self.game.close()


def make_env(args):
    def thunk():
        # Ctrl-C reaches the whole process group: the learner handles it, the games must not die first.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        sent = args.frame_stack if args.frame_stack_on == "env" else 1
        return VizDoomEnv(args.env, args.frame_skip, args.frame_height, args.frame_width, sent)

    return thunk


def make_envs(args):
    fns = [make_env(args) for _ in range(args.num_envs)]
    # SAME_STEP: the step that ends an episode already returns the next episode's first observation,
    # as in gymnasium 0.29 that CleanRL was written against.
    mode = gym.vector.AutoresetMode.SAME_STEP
    use_async = args.vector_env == "async" or (args.vector_env == "auto" and (os.cpu_count() or 1) > 2)
    # copy=False: observations come back as views of the vector env's own buffers, which the next step overwrites;
    # every reader copies them first (to the device, or with copy=True on the CPU), so a second copy here is waste.
    if use_async:
        return gym.vector.AsyncVectorEnv(fns, shared_memory=True, copy=False, autoreset_mode=mode)
    return gym.vector.SyncVectorEnv(fns, copy=False, autoreset_mode=mode)


def stack_frames(stack, frames, first):
    """The agent's input after a step: each game's last stack.shape[1] frames, newest last.

    `frames` (uint8, N x k x H x W) is what the games sent: their newest frame (k = 1) or their whole stack
    (--frame-stack-on env). A game that (re)starts (`first`) has no past, so its first frame fills its stack, as
    VizDoomEnv's own stack does; the result is a new tensor, never a view of the vector env's buffers.
    """
    frames = frames.to(stack.device)
    stacked = torch.cat((stack, frames), dim=1)[:, -stack.shape[1] :]
    return torch.where(first.to(stack.device).view(-1, 1, 1, 1), frames[:, -1:].expand_as(stacked), stacked)


# ---------------------------------------------------------------------------------------------
# Agent: CleanRL's Nature CNN, and the critic's attention
# ---------------------------------------------------------------------------------------------
def nature_cnn_output_size(frame_height, frame_width):
    """Spatial size of the Nature CNN's last feature map; a clear error if the frame is too small."""
    size = [frame_height, frame_width]
    for kernel, stride in ((8, 4), (4, 2), (3, 1)):
        if min(size) < kernel:
            raise ValueError(
                f"frame {frame_height} x {frame_width} is too small for the Nature CNN (8/4, 4/2, 3/1 convolutions): use at least 36 x 36"
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
        # CleanRL's Nature CNN; `features` ends at the last conv's ReLU, the layer Grad-CAM reads.
        self.features = nn.Sequential(
            layer_init(nn.Conv2d(frame_stack, 32, 8, stride=4)),
            nn.ReLU(),
            layer_init(nn.Conv2d(32, 64, 4, stride=2)),
            nn.ReLU(),
            layer_init(nn.Conv2d(64, 64, 3, stride=1)),
            nn.ReLU(),
        )
        # channels-last: the 8x8/4 conv's backward is much faster on a CPU (measured: docs/benchmarks.md, PPO)
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


def critic_cam(feats, value, size, cam_kind, create_graph):
    """The critic's attention under cam_kind, one of CAM_KINDS (see Args.cam); create_graph as in grad_cam."""
    target = value
    if cam_kind == "abs-target":
        with torch.enable_grad():  # in the graph also when the map is only measured (under no_grad)
            target = value.abs()
    return grad_cam(feats, target, size, create_graph=create_graph, rectify="abs" if cam_kind == "abs" else "relu")


def value_cam(agent, obs, size, cam_kind):
    """The critic's CAM for a batch of observations, as a measurement (no graph kept)."""
    with torch.enable_grad():
        feats = agent.get_features(obs)
        value = agent.critic(agent.head(feats))
        return critic_cam(feats, value, size, cam_kind, create_graph=False)


# ---------------------------------------------------------------------------------------------
# The update's pieces: advantages, and the attention figures of an iteration
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


ATTENTION_SUMS = ("camal_loss", "alpha", "beta", "iou", "valid", "empty")  # summed over an iteration's first epoch


def add_attention(attention_sums, cam, camal_l, masks, tau):
    """Add one minibatch's attention figures to the sums in `attention_sums` (on the device: no sync per minibatch)."""
    with torch.no_grad():
        cam = cam.detach()
        alpha, beta, valid = camal_terms(cam, masks)
        iou, _ = attention_iou(cam, masks, tau)
        for k, v in zip(ATTENTION_SUMS, (camal_l.detach(), alpha.sum(), beta.sum(), (iou * valid).sum(), valid.sum(), empty_cams(cam).sum())):
            attention_sums[k] += v


def attention_figures(attention_sums, n_measured, batch_size):
    """TensorBoard's attention figures from the first epoch's sums (ATTENTION_SUMS): alpha, beta and IoU are means over
    the samples with an object on screen, left out when there was none (never NaN)."""
    sums = dict(zip(attention_sums, torch.stack(list(attention_sums.values())).tolist()))  # one device sync per iteration
    figures = {
        "losses/camal_loss": sums["camal_loss"] / n_measured,
        "charts/mask_valid_fraction": sums["valid"] / batch_size,
        "charts/cam_empty_fraction": sums["empty"] / batch_size,
    }
    if sums["valid"]:
        for name, key in (("alpha", "alpha"), ("beta", "beta"), ("attention_iou", "iou")):
            figures[f"charts/{name}"] = sums[key] / sums["valid"]
    return figures


# ---------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------
def evaluate(agent, envs, args, device, video_dir=None, stop=None):
    """Play `eval_episodes` episodes with the trained policy (sampled actions) on the vector env; None when `stop` (a
    StopRequest) is set during the play, so the run can save its state and a resume evaluates again.

    Env i plays a fixed quota of episodes (eval_episodes split over the envs) so that short episodes
    are not favoured. Returns per-episode returns, lengths, mean attention IoU (None where no
    frame of the episode had a valid mask) and the share of its frames whose CAM was empty, under the run's --cam;
    `by_cam` has the last two under every CAM kind, so a run can serve as the baseline of each formulation.
    """
    size = (args.frame_height, args.frame_width)
    quota = [args.eval_episodes // args.num_envs + (i < args.eval_episodes % args.num_envs) for i in range(args.num_envs)]
    done_count = [0] * args.num_envs
    ret, length = np.zeros(args.num_envs), np.zeros(args.num_envs, dtype=int)
    iou_sum, iou_n = np.zeros((len(CAM_KINDS), args.num_envs)), np.zeros(args.num_envs, dtype=int)
    empty_n = np.zeros((len(CAM_KINDS), args.num_envs), dtype=int)
    own = CAM_KINDS.index(args.cam)
    episodes, panels = [], []
    obs, _ = envs.reset(seed=args.seed + 1_000_003)
    frames = torch.zeros((args.num_envs, args.frame_stack) + size, dtype=torch.uint8, device=device)
    first = np.ones(args.num_envs, dtype=bool)  # every game starts an episode
    while sum(done_count) < args.eval_episodes:
        if stop:
            return None
        frames = stack_frames(frames, torch.from_numpy(obs["frames"]), torch.from_numpy(first))
        mask = torch.from_numpy(obs["mask"]).to(device).bool()
        with torch.enable_grad():
            action, _, _, value, feats = agent.get_action_and_value(frames)
            cams = [critic_cam(feats, value, size, kind, create_graph=False) for kind in CAM_KINDS]
        ious = [attention_iou(cam, mask, args.tau) for cam in cams]
        valid = ious[0][1].cpu().numpy()  # the mask decides validity, whatever the map
        iou = torch.stack([i for i, _ in ious]).cpu().numpy()
        empty = torch.stack([empty_cams(cam) for cam in cams]).cpu().numpy()
        if video_dir is not None and done_count[0] < quota[0]:
            panels.append(attention_panel(obs["frames"][0, -1], obs["mask"][0], cams[own][0].cpu().numpy(), titles=FRAME_TITLES))
        try:
            obs, reward, term, trunc, _ = envs.step(action.cpu().numpy())
        except Exception:  # a scheduler's signal reaches the games too: they may die of it before this process stops
            if stop:
                return None
            raise
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
                episodes.append({"return": float(ret[i]), "length": int(length[i]), **by_cam[args.cam], "by_cam": by_cam})
                if i == 0 and video_dir is not None:
                    write_video(os.path.join(video_dir, f"eval-episode-{done_count[0]}.mp4"), panels, 35 / args.frame_skip)
                    panels = []
                done_count[i] += 1
            ret[i], length[i], iou_sum[:, i], iou_n[i], empty_n[:, i] = 0.0, 0, 0.0, 0, 0
    return episodes


# ---------------------------------------------------------------------------------------------
# Run plumbing: everything below serves the run, not the method (files, checkpoints, resume, stop signals,
# progress, tracking, pictures, videos, the paper's Figure 11). The method is all above this line.
# ---------------------------------------------------------------------------------------------
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
        raise ValueError(f"--frame-height and --frame-width must be positive, got {args.frame_height} x {args.frame_width}")
    nature_cnn_output_size(args.frame_height, args.frame_width)
    render_resolution(args.frame_height, args.frame_width)
    for name in ("num_envs", "num_steps", "num_minibatches", "update_epochs", "frame_skip", "frame_stack"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    for name in ("eval_episodes", "image_every", "checkpoint_every", "collapse_patience"):
        if getattr(args, name) < 0:
            raise ValueError(f"--{name.replace('_', '-')} must not be negative, got {getattr(args, name)}")
    if args.total_timesteps <= 0:
        raise ValueError(f"--total-timesteps must be positive, got {args.total_timesteps}")
    batch_size = args.num_envs * args.num_steps
    if args.total_timesteps < batch_size:
        raise ValueError(f"--total-timesteps {args.total_timesteps} is less than one rollout (num-envs x num-steps = {batch_size})")
    if batch_size % args.num_minibatches:
        raise ValueError(f"num-envs x num-steps = {batch_size} does not split into {args.num_minibatches} minibatches")
    if not 0.0 <= args.tau < 1.0:
        raise ValueError(f"--tau must lie in [0, 1), got {args.tau}")
    if not 0 <= args.seed < 2**31:
        raise ValueError(f"--seed must lie in 0 .. 2**31 - 1 (the games' and numpy's seeds), got {args.seed}")
    for name, low, high, low_allowed in NUMBERS:  # nan fails every comparison, so it is refused here too
        v = getattr(args, name)
        if v is not None and not (isinstance(v, (int, float)) and math.isfinite(v) and (v >= low if low_allowed else v > low) and v <= high):
            bound = f"{'at least' if low_allowed else 'above'} {low:g}" + (f" and at most {high:g}" if high < math.inf else "")
            raise ValueError(f"--{name.replace('_', '-')} must be a number {bound}, got {v}")


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
            cv2.putText(part, title, (2, 2 + int(22 * scale)), cv2.FONT_HERSHEY_SIMPLEX, scale, colour, thickness, cv2.LINE_AA)
    return np.concatenate(parts, axis=1)


def write_video(path, panels, fps):
    """panels: list of H x W x 3 RGB frames; upscaled (nearest) to at least 240 rows so small runs are watchable."""
    scale = max(1, 240 // panels[0].shape[0])
    h, w = panels[0].shape[0] * scale, panels[0].shape[1] * scale
    writer = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*"mp4v"), fps, (w, h))
    for p in panels:
        writer.write(cv2.cvtColor(cv2.resize(p, (w, h), interpolation=cv2.INTER_NEAREST), cv2.COLOR_RGB2BGR))
    writer.release()


def report_evaluation(episodes, args, writer, run_dir, global_step):
    """The evaluation's episodes in TensorBoard and in eval.json (stats.py reads it), and its line."""
    for idx, ep in enumerate(episodes):
        writer.add_scalar("eval/episodic_return", ep["return"], idx)
        if ep["attention_iou"] is not None:
            writer.add_scalar("eval/attention_iou", ep["attention_iou"], idx)
    # the same policy's attention under every --cam: vanilla trains without a CAM, so it is the baseline of each formulation
    by_cam = {}
    for kind in CAM_KINDS:
        ious = [ep["by_cam"][kind]["attention_iou"] for ep in episodes if ep["by_cam"][kind]["attention_iou"] is not None]
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
        "run_name": os.path.basename(run_dir),
    }
    write_json(os.path.join(run_dir, "eval.json"), result, indent=2)
    print(f"eval: mean_return={result['mean_return']:.2f} mean_iou={result['mean_iou']} over {len(episodes)} episodes")


def log_attention(writer, agent, args, b_obs, b_masks, global_step):
    """TensorBoard: frame | mask | CAM for up to 4 frames with objects on screen, spread over the rollout."""
    has_obj = torch.nonzero(b_masks.flatten(1).any(1)).flatten().cpu()
    pick = has_obj if len(has_obj) else torch.arange(args.batch_size)
    pick = pick[torch.linspace(0, len(pick) - 1, min(4, len(pick))).long()].to(b_obs.device)
    cams = value_cam(agent, b_obs[pick], (args.frame_height, args.frame_width), args.cam).cpu().numpy()
    panels = [attention_panel(b_obs[j, -1].cpu().numpy(), b_masks[j].cpu().numpy(), c, titles=FRAME_TITLES) for j, c in zip(pick, cams)]
    writer.add_image("attention/frame_mask_cam", np.concatenate(panels, axis=0), global_step, dataformats="HWC")


def write_rollout_video(path, agent, args, frames, masks):
    """--capture-video: one env's rollout (frames T x stack x H x W, masks T x H x W) as frame | mask | CAM, an mp4."""
    cams = value_cam(agent, frames, (args.frame_height, args.frame_width), args.cam).cpu().numpy()
    clip = [attention_panel(frames[t, -1].cpu().numpy(), masks[t].cpu().numpy(), cams[t], titles=FRAME_TITLES) for t in range(len(frames))]
    write_video(path, clip, 35 / args.frame_skip)


# Files: every file a run writes goes through atomic_write, every file it reads through read_json or read_torch.
# Copied unchanged into the other scripts; tests/test_shared_helpers.py keeps the copies identical.
class RunFileError(ValueError):
    """A file that cannot be written or read as it should be; the message names the file and says what is wrong."""


def first_line(e):
    """An exception's first line, or its type's name when it has no message (an EOFError from an empty file)."""
    text = str(e).strip()
    return text.splitlines()[0][:160] if text else type(e).__name__


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
        why = WRITE_FAILURES.get(getattr(e, "errno", None)) or ("the disk is full" if free is not None and free < 2**20 else first_line(e))
        raise RunFileError(f"cannot write {path}: {why}" + (f" ({free / 2**20:.0f} MB free there)" if free is not None else "")) from None
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
                f"{path} holds pickled Python objects, not only tensors (an older version of this script wrote it, or something "
                "else did); loading it could run code, so it is refused"
            ) from None
        raise RunFileError(f"{path} is not a file torch.save wrote (random or corrupt bytes)") from None
    except Exception as e:  # truncated or corrupt: zip, pickle, storage and OS errors of every kind (a cut zip gives EINVAL)
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


# Checkpoints, resume and tracking
def start_tracking(args, run_name, run_dir):
    """CleanRL's --track: a Weights and Biases run that mirrors the TensorBoard events (scalars, images). Its id comes from
    the run's name, so a resumed run continues the same W&B run. WANDB_MODE=offline keeps it on disk."""
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


def ignored_flags(cli, saved, keep):
    """The flags given with --resume that the run does not take (it continues with its own settings), as text."""
    default = type(cli)()
    return [
        f"--{k.replace('_', '-')} {getattr(cli, k)} (the run's: {saved.get(k)})"
        for k in cli.__dataclass_fields__
        if k not in keep and getattr(cli, k) != getattr(default, k) and getattr(cli, k) != saved.get(k)
    ]


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
            print(
                f"warning: {problems[-1] if problems else path + ' is missing'}; resuming from the previous checkpoint {p}: {lost} will be redone",
                file=sys.stderr,
                flush=True,
            )
        return state
    raise RunFileError(
        "; ".join(problems)
        or f"no checkpoint in {os.path.dirname(path) or '.'} (neither {os.path.basename(path)} nor {os.path.basename(previous_checkpoint(path))})"
    )


PPO_CHECKPOINT_KEYS = ("args", "agent", "optimizer", "iteration", "global_step", "episodes_seen", "rng")


def save_checkpoint(path, agent, optimizer, args, iteration, global_step, episodes_seen):
    write_checkpoint(
        path,
        {
            "args": asdict(args),
            "agent": agent.state_dict(),
            "optimizer": optimizer.state_dict(),
            "iteration": iteration,
            "global_step": global_step,
            "episodes_seen": episodes_seen,
            "rng": rng_state(),
        },
    )
    # where a resume would start, for readers without torch (stats.py): events past this step are redone, not kept
    write_json(os.path.splitext(path)[0] + ".json", {"iteration": iteration, "global_step": global_step})


def read_resume(args, finished, keys, keep):
    """(the run's own Args, its checkpoint) for --resume RUN; the flags given beside it, other than `keep`, are ignored
    with a warning. finished: (the file a finished run has, a hint). Raises FileNotFoundError, ValueError or
    RunFileError with a message that says why the run cannot resume."""
    if not os.path.isdir(args.resume):
        raise FileNotFoundError(
            f"--resume {args.resume} is a file, not a run folder" if os.path.exists(args.resume) else f"--resume {args.resume} does not exist"
        )
    try:
        entries = set(os.listdir(args.resume))
    except OSError as e:
        raise RunFileError(f"--resume {args.resume} cannot be read: {e.strerror}") from None
    if finished[0] in entries:
        raise ValueError(f"--resume {args.resume}: this run finished (its {finished[0]} is there); there is nothing to resume{finished[1]}")
    if not entries & {"checkpoint.pt", "checkpoint.prev.pt"}:  # the previous one alone is a whole state (a crash between renames)
        raise FileNotFoundError(f"--resume {args.resume}: no checkpoint.pt there (a run saves one every --checkpoint-every and when it is stopped)")
    try:
        checkpoint = read_checkpoint(os.path.join(args.resume, "checkpoint.pt"), keys)
    except RunFileError as e:
        raise RunFileError(f"--resume {args.resume}: {e}") from None
    # the run continues with the settings it was started with
    saved = checkpoint["args"]
    ignored = ignored_flags(args, saved, keep=keep)
    if ignored:
        print(f"warning: --resume continues with the run's own settings; ignored: {', '.join(ignored)}", file=sys.stderr)
    saved.update({k: getattr(args, k) for k in keep})
    unknown = set(saved) - set(type(args).__dataclass_fields__)
    if unknown:
        raise ValueError(f"--resume {args.resume}: the checkpoint has settings this version does not know: {sorted(unknown)}")
    return type(args)(**saved), checkpoint


def resume_from(args):
    """(the run's own Args, its checkpoint) for --resume RUN; a clear message and exit code 2 when it cannot resume."""
    try:
        args, checkpoint = read_resume(args, ("eval.json", ""), PPO_CHECKPOINT_KEYS, keep=("resume", "cuda"))
    except (FileNotFoundError, ValueError) as e:  # RunFileError is a ValueError
        fail(str(e))
    trained = checkpoint["iteration"] >= args.total_timesteps // (args.num_envs * args.num_steps)
    model_missing = args.save_model and not os.path.isfile(os.path.join(args.resume, f"{args.exp_name}.cleanrl_model"))
    if trained and not args.eval_episodes and not model_missing:  # with an evaluation, eval.json marks the end (read_resume)
        fail(f"--resume {args.resume}: this run finished (its checkpoint is at the last iteration); there is nothing to resume")
    return args, checkpoint


def restore(agent, optimizer, checkpoint, args, run_name):
    """(start_iteration, global_step, episodes_seen): 1, 0, 0 for a new run; a resumed one gets its weights and RNG back."""
    if checkpoint is None:
        return 1, 0, 0
    agent.load_state_dict(checkpoint["agent"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    restore_rng(checkpoint["rng"])
    if checkpoint["iteration"] >= args.num_iterations:
        print(f"resuming {run_name}: its training is done (global_step={checkpoint['global_step']}); completing its outputs")
    else:
        print(f"resuming {run_name} at iteration {checkpoint['iteration'] + 1}/{args.num_iterations}, global_step={checkpoint['global_step']}")
    return checkpoint["iteration"] + 1, checkpoint["global_step"], checkpoint["episodes_seen"]


# The run around the loop: folders, logs, progress, stopping
class StopRequest:
    """The stop the signals ask for, as one object: the handler sets it, the training loop reads it (no globals).

    Ctrl-C, SIGTERM, or SIGUSR1/SIGUSR2 (what SLURM and submitit send before pre-empting or timing out a job) ask for
    a stop at the next safe point, which `point` describes. Only a second Ctrl-C stops at once: schedulers repeat
    their signal (SLURM signals every process of the job, and benchmark.py forwards one more), and that is still one stop.
    """

    def __init__(self, point, unit):
        self.point, self.unit = point, unit  # what the run does when asked, and what it calls one pass (for the message)
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
        print(f"\n{signal.Signals(signum).name}: {self.point}{pace}; Ctrl-C again stops at once, without saving", flush=True)

    def catch(self):
        for s in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2):
            signal.signal(s, self.handle)
        return self


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
    tracked files were changed), the device. One entry per start or resume, so a run resumed under other versions says so."""

    def git(*cmd):
        try:
            done = subprocess.run(["git", "-C", os.path.dirname(os.path.abspath(__file__)), *cmd], capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):  # no git here
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    entry = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "script": os.path.basename(__file__),
        "python": sys.version.split()[0],
        "packages": {name: package_version(name) for name in ENVIRONMENT_PACKAGES},
        "git": None if commit is None else {"commit": commit, "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))},
        "device": describe_device(device),
        "cuda": torch.version.cuda,
    }
    path = os.path.join(run_dir, "environment.json")
    try:
        entries = read_json(path, kind=list) if os.path.exists(path) else []
    except RunFileError:  # a damaged record is replaced, not a reason to stop the run
        entries = []
    write_json(path, entries + [entry], indent=2)


def duration(seconds):
    """3d 4h, 2h 05m, 4m 10s: an ETA a reader takes in at a glance."""
    seconds = int(seconds)
    if seconds >= 86400:
        return f"{seconds // 86400}d {seconds % 86400 // 3600}h"
    if seconds >= 3600:
        return f"{seconds // 3600}h {seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m {seconds % 60:02d}s"


def start_run(args, checkpoint):
    """(run_name, run_dir, video_dir). A resumed run keeps its own folder; args.json says what the run is (--figure reads it)."""
    if checkpoint is not None:
        run_dir = args.resume.rstrip("/")
        run_name = os.path.basename(run_dir)
    else:
        run_name = f"{args.env}__{args.exp_name}__{args.method}__{args.seed}__{int(time.time())}"
        run_dir = f"runs/{run_name}"
    make_folder(run_dir)
    write_json(os.path.join(run_dir, "args.json"), asdict(args), indent=2)
    video_dir = None
    if args.capture_video:
        video_dir = f"videos/{run_name}"
        make_folder(video_dir)
    return run_name, run_dir, video_dir


def open_logs(args, run_name, run_dir, purge_step):
    """(TensorBoard writer, W&B run or None). purge_step: where a resumed run's curves restart, so events a stopped or
    crashed run logged from there on are dropped, not doubled; None for a new run, which also logs its hyperparameters."""
    tracked = start_tracking(args, run_name, run_dir) if args.track else None  # before the writer, so W&B mirrors its events
    # TensorBoard writes from a thread: its OSError (a full disk) comes back at the next write, where the run says why it stops
    threading.excepthook = lambda a: None if issubclass(a.exc_type, OSError) else threading.__excepthook__(a)
    writer = SummaryWriter(run_dir, purge_step=purge_step)
    if purge_step is None:
        writer.add_text("hyperparameters", "|param|value|\n|-|-|\n%s" % "\n".join(f"|{k}|{v}|" for k, v in vars(args).items()))
    return writer, tracked


def close_logs(writer, tracked):
    if writer is not None:
        try:
            writer.close()
        except OSError:  # a full disk: the events written so far stay readable, and the run has said why it stopped
            pass
    if tracked is not None:
        tracked.finish()


def announce(args, run_name, run_dir, envs, device):
    kind = "async" if isinstance(envs, gym.vector.AsyncVectorEnv) else "sync"
    print(
        f"{run_name}: {describe_device(device)}, {args.num_envs} {kind} envs at {args.frame_height} x {args.frame_width}, "
        f"{args.num_iterations} iterations of {args.batch_size} steps\n  run folder: {run_dir}   watch: tensorboard --logdir "
        f"{os.path.dirname(run_dir) or '.'}   stop: Ctrl-C (saves a checkpoint; --resume {run_dir} continues)",
        flush=True,
    )


def stop_in_rollout(run_dir, agent, optimizer, args, at_start, stop):
    """A stop asked for during a rollout: the model is as the last update left it, so save that state now, not after
    this update, and exit. at_start: (iteration, global_step, episodes_seen) when the rollout began."""
    iteration, global_step, episodes_seen = at_start
    save_checkpoint(os.path.join(run_dir, "checkpoint.pt"), agent, optimizer, args, iteration - 1, global_step, episodes_seen)
    tqdm.write(
        f"stopped in iteration {iteration}'s rollout; saved the state after iteration {iteration - 1}. "
        f"Continue with: python {os.path.basename(__file__)} --resume {run_dir}"
    )
    sys.exit(stop.exit_code())


def summary(recent_returns, attention):
    """The progress line's account of an iteration: its episodes, and the first epoch's attention."""
    alpha, beta, iou = (attention.get(f"charts/{k}", 0.0) for k in ("alpha", "beta", "attention_iou"))
    mean_return = f"{np.mean(recent_returns):.2f}" if recent_returns else "-"
    return (
        f"episodes={len(recent_returns)} mean_return={mean_return} "
        f"alpha={alpha:.3f} beta={beta:.3f} iou={iou:.3f} cam_empty={attention['charts/cam_empty_fraction']:.2f}"
    )


def warn_days(sps, eta):
    tqdm.write(
        f"warning: at {sps} SPS this run needs about {duration(eta)} more (the paper's 10M steps at 240 x 320 want a GPU). "
        f"A CPU run that trains a Basic agent in about 15 min: python {os.path.basename(__file__)} --env Basic --frame-height 60 "
        f"--frame-width 80 --total-timesteps 409600",
        file=sys.stderr,
    )


def warn_collapse(iterations, empty_fraction):
    """An all-zero CAM gives CAMAL no gradient and IoU nothing to measure: say so instead of training on silently."""
    print(
        f"warning: the critic's CAM has been empty for over half the samples for {iterations} iterations "
        f"({empty_fraction:.0%} now): CAMAL has no gradient there and attention IoU measures nothing. "
        f"See docs/ppo_camal_vizdoom.md (--cam): --cam abs keeps the map alive.",
        file=sys.stderr,
        flush=True,
    )


def close_run(bar, envs, writer, tracked, video_dir):
    bar.close()
    envs.close()
    if tracked is not None and video_dir is not None:  # the mp4s go with the W&B run, as CleanRL's monitor_gym does
        for name in sorted(os.listdir(video_dir)):
            tracked.save(os.path.join(video_dir, name), base_path=os.path.dirname(video_dir), policy="now")
    close_logs(writer, tracked)


def parse_args():
    """(Args, the checkpoint of --resume or None), checked; --figure draws Figure 11 and exits; bad input exits with code 2."""
    args = tyro.cli(Args)
    if args.figure is not None:
        try:
            print(f"figure written to {attention_figure(args)}")
        except ValueError as e:
            fail(str(e))
        sys.exit(0)
    args, checkpoint = resume_from(args) if args.resume is not None else (args, None)
    try:
        check_args(args)
    except (ValueError, TypeError) as e:  # TypeError: a checkpoint whose settings have the wrong types
        fail(str(e))
    return args, checkpoint


def fail(message):
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def abandon(run_dir, video_dir, checkpoint):
    """A new run that failed before its first iteration leaves no folder behind (only what this script put there)."""
    if checkpoint is not None:
        return
    for folder in filter(None, (run_dir, video_dir)):
        if os.path.isdir(folder) and all(
            n in ("args.json", "environment.json", "wandb") or n.startswith("events.out.tfevents.") for n in os.listdir(folder)
        ):
            shutil.rmtree(folder, ignore_errors=True)


# The paper's Figure 11: two trained agents' attention on the same frames (--figure)
def load_saved_agent(run_dir):
    """(Args, Agent) of a run saved with --save-model: args.json and the state dict (weights only: no code runs)."""
    if not os.path.isdir(run_dir):
        raise ValueError(f"{run_dir} is a file, not a run folder" if os.path.exists(run_dir) else f"{run_dir} does not exist")
    args_path = os.path.join(run_dir, "args.json")
    if not os.path.lexists(args_path):
        raise ValueError(f"{run_dir} is not a run folder of this script (no args.json)")
    saved = read_json(args_path)
    try:
        run_args = Args(**{k: v for k, v in saved.items() if k in Args.__dataclass_fields__})
        check_args(run_args)
    except (TypeError, ValueError) as e:
        raise RunFileError(f"{args_path} does not hold this script's settings ({first_line(e)})") from None
    model_path = os.path.join(run_dir, f"{run_args.exp_name}.cleanrl_model")
    if not os.path.lexists(model_path):
        raise ValueError(f"{run_dir} has no {os.path.basename(model_path)}: train it with --save-model")
    state = read_torch(model_path)
    try:
        agent = Agent(state["actor.weight"].shape[0], run_args.frame_stack, run_args.frame_height, run_args.frame_width)
        agent.load_state_dict(state)
    except Exception as e:  # a file of another version, another frame size, or not a model at all: say which
        raise RunFileError(f"{model_path} is not a model of this run ({first_line(e)})") from None
    return run_args, agent.eval()


def check_figure(args):
    """--figure's own flags, before the minutes of play: a clear error instead of a traceback at the end."""
    if args.figure_frames < 1:
        raise ValueError(f"--figure-frames must be at least 1, got {args.figure_frames}")
    out = args.figure_out if args.figure_out is not None else "figure11.png"
    if not out or os.path.isdir(out):
        raise ValueError(f"--figure-out {out!r}: give the PNG's path")
    folder = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(folder) or unwritable(folder):
        raise ValueError(f"--figure-out {out}: " + (f"the folder {folder} does not exist" if not os.path.isdir(folder) else unwritable(folder)))


def attention_figure(args):
    """Play the first run's policy, pick frames with objects on screen, and draw frame | mask | each run's CAM."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    check_figure(args)
    (args_a, agent_a), (args_b, agent_b) = (load_saved_agent(d) for d in args.figure)
    for name in ("env", "frame_height", "frame_width", "frame_stack", "frame_skip"):
        if getattr(args_a, name) != getattr(args_b, name):
            raise ValueError(f"--figure: the runs differ in {name} ({getattr(args_a, name)} and {getattr(args_b, name)})")
    size = (args_a.frame_height, args_a.frame_width)
    env = VizDoomEnv(args_a.env, args_a.frame_skip, *size, args_a.frame_stack)
    torch.manual_seed(args.seed)
    frames, masks = [], []
    obs, _ = env.reset(seed=args.seed)
    try:
        for _ in range(2000):  # a few episodes' worth; frames without an object on screen are skipped
            if obs["mask"].any() and not obs["mask"].all():
                frames.append(obs["frames"])
                masks.append(obs["mask"].astype(bool))
            with torch.no_grad():
                action = agent_a.get_action_and_value(torch.from_numpy(obs["frames"])[None])[0]
            obs, _, term, trunc, _ = env.step(int(action))
            if term or trunc:
                obs, _ = env.reset()
    finally:
        env.close()
    if not frames:
        raise ValueError(f"--figure: no frame of {args_a.env} showed an object in 2000 steps")
    pick = np.linspace(0, len(frames) - 1, min(args.figure_frames, len(frames))).round().astype(int)
    obs = torch.from_numpy(np.stack([frames[i] for i in pick]))
    mask = np.stack([masks[i] for i in pick])
    cams = [value_cam(agent, obs, size, a.cam).numpy() for a, agent in ((args_a, agent_a), (args_b, agent_b))]
    titles = ["frame", "mask"] + [f"{a.method} ({a.cam} CAM)" for a in (args_a, args_b)]
    fig, axes = plt.subplots(len(pick), 4, figsize=(4 * 2.6, len(pick) * 2.6 * size[0] / size[1] + 0.6), squeeze=False)
    for row in range(len(pick)):
        frame = obs[row, -1].numpy()
        axes[row, 0].imshow(frame, cmap="gray")
        axes[row, 1].imshow(frame, cmap="gray")
        axes[row, 1].imshow(np.ma.masked_where(~mask[row], mask[row]), cmap="autumn", alpha=0.7)
        for col, cam in enumerate(cams, start=2):
            axes[row, col].imshow(frame, cmap="gray")
            axes[row, col].imshow(cam[row], cmap="jet", alpha=0.5, vmin=0, vmax=1)
            iou, _ = attention_iou(torch.from_numpy(cam[row : row + 1]), torch.from_numpy(mask[row : row + 1]), args.tau)
            axes[row, col].set_xlabel(f"IoU {iou.item():.2f}" + (" (CAM empty)" if cam[row].max() <= 0 else ""), fontsize=8)
    for col, title in enumerate(titles):
        axes[0, col].set_title(title, fontsize=9)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"{args_a.env}: frames played by the {args_a.method} agent; each agent's critic CAM (IoU at tau {args.tau})", fontsize=9)
    fig.tight_layout()
    out = args.figure_out or f"figure11_{args_a.env}.png"
    atomic_write(out, lambda f: fig.savefig(f, dpi=100, format="png"))
    plt.close(fig)
    return out


if __name__ == "__main__":
    args, checkpoint = parse_args()
    args.batch_size = int(args.num_envs * args.num_steps)
    args.minibatch_size = int(args.batch_size // args.num_minibatches)
    args.num_iterations = args.total_timesteps // args.batch_size
    try:
        run_name, run_dir, video_dir = start_run(args, checkpoint)
    except RunFileError as e:  # runs/ is a file, the working folder is read-only, the disk is full
        fail(str(e))

    # TRY NOT TO MODIFY: seeding
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")

    envs = make_envs(args)
    H, W = args.frame_height, args.frame_width
    agent = Agent(envs.single_action_space.n, args.frame_stack, H, W).to(device)
    optimizer = optim.Adam(agent.parameters(), lr=args.learning_rate, eps=1e-5)
    start_iteration, global_step, episodes_seen = restore(agent, optimizer, checkpoint, args, run_name)
    writer = tracked = None
    try:  # purge_step: the events after the checkpoint's step are the ones a resumed run redoes
        writer, tracked = open_logs(args, run_name, run_dir, purge_step=None if checkpoint is None else global_step + 1)
        record_environment(run_dir, device)  # which code and packages made this run (stats.py compares them)
    except (RunFileError, ValueError) as e:  # ValueError: --track without wandb or without a W&B key
        envs.close()
        close_logs(writer, tracked)
        abandon(run_dir, video_dir, checkpoint)
        fail(str(e))
    # a first Ctrl-C or a scheduler's signal: checkpoint and exit at the next safe point
    stop = StopRequest(
        "saving a checkpoint and stopping within a step during a rollout (the model has not changed since the last update), else after this update",
        "iteration",
    ).catch()
    announce(args, run_name, run_dir, envs, device)

    has_attention_term = args.method == "camal"  # what --method means: vanilla measures the CAM but does not train on it

    # ALGO Logic: Storage setup (frames as uint8: a quarter of float32's memory at 240 x 320)
    obs = torch.zeros((args.num_steps, args.num_envs, args.frame_stack, H, W), dtype=torch.uint8, device=device)
    masks = torch.zeros((args.num_steps, args.num_envs, H, W), dtype=torch.bool, device=device)
    actions = torch.zeros((args.num_steps, args.num_envs), dtype=torch.long, device=device)
    logprobs = torch.zeros((args.num_steps, args.num_envs), device=device)
    rewards = torch.zeros((args.num_steps, args.num_envs), device=device)
    dones = torch.zeros((args.num_steps, args.num_envs), device=device)
    values = torch.zeros((args.num_steps, args.num_envs), device=device)

    # a bar on a terminal (none in logs, where each iteration's line carries the ETA)
    bar = tqdm(
        total=args.num_iterations * args.batch_size, initial=global_step, unit="step", unit_scale=True, disable=None, dynamic_ncols=True, leave=False
    )
    try:
        start_time, start_step = time.time(), global_step
        next_obs_np, _ = envs.reset(seed=args.seed + (start_iteration - 1) * args.num_envs)
        next_obs = torch.zeros((args.num_envs, args.frame_stack, H, W), dtype=torch.uint8, device=device)
        next_obs = stack_frames(next_obs, torch.from_numpy(next_obs_np["frames"]), torch.ones(args.num_envs, dtype=torch.bool))
        next_mask = torch.from_numpy(next_obs_np["mask"]).to(device).bool()
        next_done = torch.zeros(args.num_envs, device=device)
        ep_return, ep_length = np.zeros(args.num_envs), np.zeros(args.num_envs, dtype=int)
        recent_returns, collapsed_for = [], 0  # collapsed_for: iterations in a row with over half the CAMs empty

        for iteration in range(start_iteration, args.num_iterations + 1):
            if args.anneal_lr:
                frac = 1.0 - (iteration - 1.0) / args.num_iterations
                optimizer.param_groups[0]["lr"] = frac * args.learning_rate

            rollout_start, env_seconds = time.perf_counter(), 0.0  # where an iteration's time goes: perf/ in TensorBoard
            at_start = (iteration, global_step, episodes_seen)  # what a stop during the rollout saves
            for step in range(0, args.num_steps):
                if stop:
                    stop_in_rollout(run_dir, agent, optimizer, args, at_start, stop)
                global_step += args.num_envs
                obs[step] = next_obs
                masks[step] = next_mask
                dones[step] = next_done

                with torch.no_grad():
                    action, logprob, _, value, _ = agent.get_action_and_value(next_obs)
                    values[step] = value.flatten()
                actions[step] = action
                logprobs[step] = logprob

                action_np = action.cpu().numpy()
                env_start = time.perf_counter()
                try:
                    next_obs_np, reward, terminations, truncations, _ = envs.step(action_np)
                except Exception:
                    # SLURM signals every process of a job it pre-empts: the games may die of that signal before this
                    # process stops; the model is as the last update left it, so that state is still saved
                    if stop:
                        stop_in_rollout(run_dir, agent, optimizer, args, at_start, stop)
                    raise
                env_seconds += time.perf_counter() - env_start
                done = np.logical_or(terminations, truncations)
                # clamp, not sign: keeps the size of small rewards (Table 8's [-1, 1] clip), after --reward-scale
                rewards[step] = torch.as_tensor(np.clip(reward * args.reward_scale, -1.0, 1.0), dtype=torch.float32, device=device)
                next_done = torch.as_tensor(done, dtype=torch.float32, device=device)
                next_obs = stack_frames(next_obs, torch.from_numpy(next_obs_np["frames"]), next_done.bool())
                next_mask = torch.from_numpy(next_obs_np["mask"]).to(device).bool()

                # episode statistics on the unclipped game reward
                ep_return += reward
                ep_length += 1
                for i in np.flatnonzero(done):
                    writer.add_scalar("charts/episodic_return", ep_return[i], global_step)
                    writer.add_scalar("charts/episodic_length", ep_length[i], global_step)
                    recent_returns.append(ep_return[i])
                    episodes_seen += 1
                    ep_return[i], ep_length[i] = 0.0, 0

            update_start = time.perf_counter()
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
            attention_sums, n_measured = {k: torch.zeros((), device=device) for k in ATTENTION_SUMS}, 0
            for epoch in range(args.update_epochs):
                np.random.shuffle(b_inds)
                for start in range(0, args.batch_size, args.minibatch_size):
                    end = start + args.minibatch_size
                    mb_inds = b_inds[start:end]
                    mb_masks = b_masks[mb_inds]

                    _, newlogprob, entropy, newvalue, feats = agent.get_action_and_value(b_obs[mb_inds], b_actions[mb_inds])
                    logratio = newlogprob - b_logprobs[mb_inds]
                    ratio = logratio.exp()

                    with torch.no_grad():
                        # calculate approx_kl http://joschu.net/blog/kl-approx.html
                        old_approx_kl = (-logratio).mean()
                        approx_kl = ((ratio - 1) - logratio).mean()
                        clipfracs.append(((ratio - 1.0).abs() > args.clip_coef).float().mean())  # on the device: no sync per minibatch

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
                        v_clipped = b_values[mb_inds] + torch.clamp(newvalue - b_values[mb_inds], -args.clip_coef, args.clip_coef)
                        v_loss_clipped = (v_clipped - b_returns[mb_inds]) ** 2
                        v_loss = 0.5 * torch.max(v_loss_unclipped, v_loss_clipped).mean()
                    else:
                        v_loss = 0.5 * ((newvalue - b_returns[mb_inds]) ** 2).mean()

                    entropy_loss = entropy.mean()
                    loss = pg_loss - args.ent_coef * entropy_loss + v_loss * args.vf_coef

                    # CAMAL: Grad-CAM of V(s) at the last conv layer, one backward for the whole minibatch.
                    # Attention is measured in the first epoch, which visits every sample once; vanilla
                    # computes the map only then, and without the double-backward graph.
                    measure = epoch == 0
                    if has_attention_term or measure:
                        cam = critic_cam(feats, newvalue, (H, W), args.cam, create_graph=has_attention_term)
                        camal_l = camal_loss(cam, mb_masks)
                    if has_attention_term:
                        loss = loss + args.camal_coef * camal_l

                    optimizer.zero_grad()
                    loss.backward()
                    nn.utils.clip_grad_norm_(agent.parameters(), args.max_grad_norm)
                    optimizer.step()
                    if measure:
                        add_attention(attention_sums, cam, camal_l, mb_masks, args.tau)
                        n_measured += 1

                if args.target_kl is not None and approx_kl > args.target_kl:
                    break

            # TRY NOT TO MODIFY: record rewards for plotting purposes
            y_pred, y_true = b_values.cpu().numpy(), b_returns.cpu().numpy()
            var_y = np.var(y_true)
            explained_var = np.nan if var_y == 0 else 1 - np.var(y_true - y_pred) / var_y
            writer.add_scalar("charts/learning_rate", optimizer.param_groups[0]["lr"], global_step)
            writer.add_scalar("losses/value_loss", v_loss.item(), global_step)
            writer.add_scalar("losses/policy_loss", pg_loss.item(), global_step)
            writer.add_scalar("losses/entropy", entropy_loss.item(), global_step)
            writer.add_scalar("losses/old_approx_kl", old_approx_kl.item(), global_step)
            writer.add_scalar("losses/approx_kl", approx_kl.item(), global_step)
            writer.add_scalar("losses/clipfrac", torch.stack(clipfracs).mean().item(), global_step)
            writer.add_scalar("losses/explained_variance", explained_var, global_step)
            attention = attention_figures(attention_sums, n_measured, args.batch_size)  # the first epoch's CAMs, one device sync
            for tag, value in attention.items():
                writer.add_scalar(tag, value, global_step)
            # where the iteration's time went (after the syncs above: on a GPU the update's queued kernels count)
            writer.add_scalar("perf/env_seconds", env_seconds, global_step)
            writer.add_scalar("perf/rollout_seconds", update_start - rollout_start, global_step)
            writer.add_scalar("perf/update_seconds", time.perf_counter() - update_start, global_step)
            sps = int((global_step - start_step) / (time.time() - start_time))
            writer.add_scalar("charts/SPS", sps, global_step)
            writer.flush()  # a crash loses at most this iteration's curves
            stop.last_pass_seconds = time.perf_counter() - rollout_start

            # progress: a line per iteration (logs have no bar), the bar on a terminal
            eta = (args.num_iterations - iteration) * args.batch_size / max(sps, 1)
            cam_empty = attention["charts/cam_empty_fraction"]
            bar.update(args.batch_size)
            bar.set_postfix(SPS=sps, refresh=False)
            tqdm.write(
                f"iter {iteration}/{args.num_iterations} global_step={global_step} SPS={sps} eta={duration(eta)} "
                + summary(recent_returns, attention)
            )
            sys.stdout.flush()
            if iteration == start_iteration and eta > 86400:
                warn_days(sps, eta)
            recent_returns = []
            collapsed_for = collapsed_for + 1 if cam_empty > 0.5 else 0
            if collapsed_for == args.collapse_patience:
                warn_collapse(collapsed_for, cam_empty)

            # the first image after the first update, then every --image-every iterations, and the trained agent's at the end
            last = iteration == args.num_iterations
            if args.image_every and (iteration == 1 or iteration % args.image_every == 0 or last):
                log_attention(writer, agent, args, b_obs, b_masks, global_step)
                if video_dir is not None:  # env 0's whole rollout of this iteration
                    write_rollout_video(os.path.join(video_dir, f"train-iter-{iteration:06d}.mp4"), agent, args, obs[:, 0], masks[:, 0])
            if (args.checkpoint_every and iteration % args.checkpoint_every == 0) or (stop and not last):
                save_checkpoint(os.path.join(run_dir, "checkpoint.pt"), agent, optimizer, args, iteration, global_step, episodes_seen)
            if stop and not last:
                tqdm.write(f"stopped at iteration {iteration}; continue with: python {os.path.basename(__file__)} --resume {run_dir}")
                sys.exit(stop.exit_code())
        bar.close()  # before the evaluation's own output
        # a stop from here on saves the trained state as it is now; --resume then evaluates it as this run would have
        stop.point = "the training is done; saving its state and stopping (--resume completes the evaluation)"
        stop.last_pass_seconds = None  # the last iteration's time says nothing about the evaluation's
        trained_rng = rng_state()
        if args.save_model:
            model_path = f"{run_dir}/{args.exp_name}.cleanrl_model"
            state = agent.state_dict()
            atomic_write(model_path, lambda f: torch.save(state, f))
            print(f"model saved to {model_path}")
        if args.eval_episodes:
            print(f"evaluating the trained policy over {args.eval_episodes} episodes", flush=True)
            episodes = evaluate(agent, envs, args, device, video_dir, stop)
            if episodes is None:
                restore_rng(trained_rng)  # the checkpoint holds the generators as the evaluation found them
                iteration = args.num_iterations
                save_checkpoint(os.path.join(run_dir, "checkpoint.pt"), agent, optimizer, args, iteration, global_step, episodes_seen)
                tqdm.write(f"stopped during the final evaluation; complete it with: python {os.path.basename(__file__)} --resume {run_dir}")
                sys.exit(stop.exit_code())
            report_evaluation(episodes, args, writer, run_dir, global_step)
    except KeyboardInterrupt:  # a second Ctrl-C: stop at once, no traceback
        print(f"\nstopped at once, without a checkpoint; the last saved one (if any) is in {run_dir}", file=sys.stderr, flush=True)
        sys.exit(128 + signal.SIGINT)
    except (RunFileError, OSError) as e:  # a full disk or a folder made read-only (TensorBoard's writer raises OSError)
        why = e if isinstance(e, RunFileError) else f"cannot write in {run_dir}: {WRITE_FAILURES.get(e.errno) or first_line(e)}"
        kept = [n for n in ("checkpoint.pt", "checkpoint.prev.pt") if os.path.isfile(os.path.join(run_dir, n))]
        fail(f"{why}. " + (f"The last whole checkpoint is in {run_dir}: make room, then --resume {run_dir}" if kept else "No checkpoint was saved."))
    finally:
        close_run(bar, envs, writer, tracked, video_dir)
