"""The CAMAL helpers against hand-made cases and a slow per-sample Grad-CAM reference."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F


# ----- camal_terms / camal_loss / attention_iou on hand-made maps --------------------------------
def test_camal_terms_hand_made(ppo):
    cam = torch.tensor([[[1.0, 0.5], [0.0, 0.25]]])
    mask = torch.tensor([[[True, True], [False, False]]])
    alpha, beta, valid = ppo.camal_terms(cam, mask)
    assert valid.tolist() == [True]
    assert alpha.item() == pytest.approx(0.75)  # (1 + 0.5) / 2
    assert beta.item() == pytest.approx(0.125)  # (0 + 0.25) / 2
    assert ppo.camal_loss(cam, mask).item() == pytest.approx(0.125 - 0.75)


def test_camal_terms_unequal_areas(ppo):
    # Eq. 1 divides by each region's own area, not by H x W
    cam = torch.zeros(1, 3, 3)
    cam[0, 0, 0] = 0.9
    cam[0, 2, 2] = 0.3
    mask = torch.zeros(1, 3, 3, dtype=torch.bool)
    mask[0, 0, 0] = True
    alpha, beta, valid = ppo.camal_terms(cam, mask)
    assert alpha.item() == pytest.approx(0.9)
    assert beta.item() == pytest.approx(0.3 / 8)


def test_empty_and_full_masks_are_left_out(ppo):
    cam = torch.rand(4, 5, 6)
    mask = torch.zeros(4, 5, 6, dtype=torch.bool)
    mask[1] = True  # full
    mask[2, :2, :3] = True  # valid
    mask[3, 4, 5] = True  # valid, one pixel
    alpha, beta, valid = ppo.camal_terms(cam, mask)
    assert valid.tolist() == [False, False, True, True]
    assert alpha[:2].tolist() == [0.0, 0.0] and beta[:2].tolist() == [0.0, 0.0]
    expected = np.mean([(beta[i] - alpha[i]).item() for i in (2, 3)])
    assert ppo.camal_loss(cam, mask).item() == pytest.approx(expected)
    iou, iou_valid = ppo.attention_iou(cam, mask)
    assert iou_valid.tolist() == [False, False, True, True]
    assert torch.isfinite(iou).all()


def test_no_valid_sample_adds_zero_and_keeps_graph(ppo):
    cam = torch.rand(3, 4, 4, requires_grad=True)
    for mask in (torch.zeros(3, 4, 4, dtype=torch.bool), torch.ones(3, 4, 4, dtype=torch.bool)):
        loss = ppo.camal_loss(cam, mask)
        assert loss.item() == 0.0
        (grad,) = torch.autograd.grad(loss, cam)
        assert torch.isfinite(grad).all() and grad.abs().sum() == 0


def test_attention_iou_hand_made(ppo):
    cam = torch.tensor([[[0.9, 0.8, 0.1], [0.71, 0.7, 0.0]]])  # > 0.7: (0,0), (0,1), (1,0)
    mask = torch.tensor([[[True, False, False], [True, True, False]]])
    iou, valid = ppo.attention_iou(cam, mask, tau=0.7)
    # intersection {(0,0), (1,0)} = 2; union {(0,0), (0,1), (1,0), (1,1)} = 4
    assert valid.item() and iou.item() == pytest.approx(0.5)
    iou, _ = ppo.attention_iou(cam, mask, tau=0.85)  # only (0,0): 1 / 3
    assert iou.item() == pytest.approx(1 / 3)


def test_attention_iou_nothing_above_threshold(ppo):
    cam = torch.full((1, 4, 4), 0.5)
    mask = torch.zeros(1, 4, 4, dtype=torch.bool)
    mask[0, 0] = True
    iou, valid = ppo.attention_iou(cam, mask)
    assert valid.item() and iou.item() == 0.0


# ----- grad_cam against a slow per-sample reference (Proposition 1) ------------------------------
def reference_cam(agent, obs_one, size):
    """Textbook Grad-CAM for one sample: its own forward, its own backward of V(s)."""
    feats = agent.get_features(obs_one)
    feats.retain_grad()
    agent.critic(agent.head(feats)).sum().backward()
    w = feats.grad.mean(dim=(2, 3))[0]  # K
    cam = torch.relu(sum(w[k] * feats[0, k] for k in range(len(w))) / len(w))
    cam = cam / (cam.max() + 1e-8)
    return F.interpolate(cam[None, None], size=size, mode="bilinear", align_corners=False)[0, 0].detach()


@pytest.fixture
def agent_and_batch(ppo):
    torch.manual_seed(0)
    agent = ppo.Agent(3, 4, 60, 80)
    gen = torch.Generator().manual_seed(1)
    obs = torch.randint(0, 256, (6, 4, 60, 80), dtype=torch.uint8, generator=gen)
    masks = torch.zeros(6, 60, 80, dtype=torch.bool)
    for b in range(6):
        masks[b, 5 * b : 5 * b + 20, 10 * b : 10 * b + 25] = True
    return agent, obs, masks


def test_batch_grad_cam_equals_per_sample(ppo, agent_and_batch):
    agent, obs, _ = agent_and_batch
    _, _, _, value, feats = agent.get_action_and_value(obs)
    cam = ppo.grad_cam(feats, value, (60, 80), create_graph=True)
    assert cam.shape == (6, 60, 80)
    assert cam.min() >= 0 and cam.max() <= 1
    assert (cam.amax(dim=(1, 2)) > 0.99).sum() >= 3, "most maps should be non-trivial, or the test proves nothing"
    for b in range(6):
        agent.zero_grad()
        ref = reference_cam(agent, obs[b : b + 1], (60, 80))
        torch.testing.assert_close(cam[b].detach(), ref, atol=1e-5, rtol=0)


def test_camal_loss_gradient_equals_per_sample(ppo, agent_and_batch):
    """The double-backward through the batch CAM gives the same parameter gradient as B separate CAMs."""
    agent, obs, masks = agent_and_batch
    params = list(agent.parameters())
    _, _, _, value, feats = agent.get_action_and_value(obs)
    batch_loss = ppo.camal_loss(ppo.grad_cam(feats, value, (60, 80), create_graph=True), masks)
    batch_grads = torch.autograd.grad(batch_loss, params, allow_unused=True)

    per_sample = []
    for b in range(6):
        _, _, _, v_b, f_b = agent.get_action_and_value(obs[b : b + 1])
        alpha, beta, valid = ppo.camal_terms(ppo.grad_cam(f_b, v_b, (60, 80), create_graph=True), masks[b : b + 1])
        assert valid.item()
        per_sample.append(beta - alpha)
    ref_grads = torch.autograd.grad(torch.cat(per_sample).mean(), params, allow_unused=True)

    first_conv = batch_grads[0]
    assert first_conv.abs().sum() > 0, "the CAMAL gradient must reach the first conv layer"
    for g, r in zip(batch_grads, ref_grads):
        # the actor (and the critic's bias) never enter dV/dA: None in both or in neither
        assert (g is None) == (r is None)
        if g is not None:
            torch.testing.assert_close(g, r, atol=1e-6, rtol=1e-4)


def test_grad_cam_without_create_graph_is_a_measurement(ppo, agent_and_batch):
    """Differentiability is the caller's explicit choice, whatever the ambient grad mode."""
    agent, obs, _ = agent_and_batch
    _, _, _, value, feats = agent.get_action_and_value(obs)
    with torch.no_grad():  # the ambient mode does not decide: the argument does
        differentiable = ppo.grad_cam(feats, value, (60, 80), create_graph=True)
    measured = ppo.grad_cam(feats, value, (60, 80), create_graph=False)
    assert differentiable.requires_grad and not measured.requires_grad
    torch.testing.assert_close(measured, differentiable.detach())
    # the forward graph survives, so PPO's own backward can follow
    value.sum().backward()
    assert agent.features[0].weight.grad is not None


def test_grad_cam_to_nchw(ppo):
    """A channels-last feature map (as Swin's B x H x W x C) gives the same CAM through to_nchw."""
    torch.manual_seed(0)
    x = torch.randn(3, 8, 5, 7, requires_grad=True)
    w = torch.randn(8)
    nchw = torch.relu(x)
    score = (nchw * w[None, :, None, None]).sum(dim=(1, 2, 3)) ** 2
    expected = ppo.grad_cam(nchw, score, (10, 14), create_graph=False)
    nhwc = torch.relu(x).permute(0, 2, 3, 1)
    score = (nhwc * w).sum(dim=(1, 2, 3)) ** 2
    got = ppo.grad_cam(nhwc, score, (10, 14), create_graph=False, to_nchw=lambda t: t.permute(0, 3, 1, 2))
    torch.testing.assert_close(got, expected)


def test_all_zero_cam_is_zero_not_nan(ppo):
    feats = torch.rand(2, 3, 4, 4, requires_grad=True)
    score = -(feats.sum(dim=(1, 2, 3)))  # every w_k < 0: ReLU leaves nothing
    cam = ppo.grad_cam(feats, score, (8, 8), create_graph=True)
    assert torch.isfinite(cam).all() and cam.abs().max() == 0
    assert math.isfinite(ppo.camal_loss(cam, torch.rand(2, 8, 8) > 0.5).item())


def test_collapsed_cam_has_no_gradient_and_the_abs_cam_does(ppo, agent_and_batch):
    """A critic whose features all lower V (the collapse of issue 10): the paper's ReLU map is empty in every sample and
    CAMAL's loss has no gradient, so it can never recover; the |.| map is the same evidence with its sign kept,
    alive."""
    agent, obs, masks = agent_and_batch
    with torch.no_grad():  # make every feature lower V: V = -sum(hidden) with non-negative weights into the head
        agent.head[1].weight.abs_()
        agent.critic.weight.copy_(-agent.critic.weight.abs())
    params = list(agent.parameters())
    _, _, _, value, feats = agent.get_action_and_value(obs)
    paper = ppo.critic_cam(feats, value, (60, 80), "paper", create_graph=True)
    assert ppo.empty_cams(paper).all()
    grads = torch.autograd.grad(ppo.camal_loss(paper, masks), params, allow_unused=True, retain_graph=True)
    assert all(g is None or g.abs().max() == 0 for g in grads)

    for cam in ("abs", "abs-target"):
        alive = ppo.critic_cam(feats, value, (60, 80), cam, create_graph=True)
        assert not ppo.empty_cams(alive).any() and alive.amax(dim=(1, 2)).min() > 0.99
        first_conv = torch.autograd.grad(ppo.camal_loss(alive, masks), params[0], retain_graph=True)[0]
        assert first_conv.abs().sum() > 0
    # the |.| map is the paper's map of -V here: the same evidence, sign kept
    torch.testing.assert_close(
        ppo.critic_cam(feats, value, (60, 80), "abs", create_graph=False),
        ppo.critic_cam(feats, -value, (60, 80), "paper", create_graph=False),
    )


def test_abs_target_cam_equals_per_sample(ppo, agent_and_batch):
    """The CAM of |V| stays exact per sample (Proposition 1 holds for any per-sample target), also as a measurement."""
    agent, obs, _ = agent_and_batch
    _, _, _, value, feats = agent.get_action_and_value(obs)
    with torch.no_grad():
        cam = ppo.critic_cam(feats, value, (60, 80), "abs-target", create_graph=False)
    for b in range(6):
        _, _, _, v_b, f_b = agent.get_action_and_value(obs[b : b + 1])
        ref = ppo.grad_cam(f_b, v_b.abs(), (60, 80), create_graph=False)
        torch.testing.assert_close(cam[b], ref[0].detach(), atol=1e-5, rtol=0)


def test_attention_panel_is_labelled_and_marks_the_mask(ppo):
    """The TensorBoard and video panels name their parts (frame, mask, CAM) in white in each part's corner."""
    frame, mask, cam = np.zeros((60, 80), np.uint8), np.zeros((60, 80), np.uint8), np.zeros((60, 80))
    mask[40:, 50:] = 1
    panel = ppo.attention_panel(frame, mask, cam, titles=("frame", "mask", "CAM"))
    assert panel.shape == (60, 240, 3) and panel.dtype == np.uint8
    white = panel.min(axis=-1) > 200  # anti-aliased white text
    for k in range(3):
        assert white[:15, 80 * k : 80 * k + 45].any(), f"part {k} has no label"
        assert not white[20:, 80 * k : 80 * (k + 1)].any()  # the label stays in the corner
    assert (panel[50, 80 + 60] == (127, 0, 0)).all() and (panel[10, 80 + 60] == 0).all()  # red inside the mask only
    unlabelled = ppo.attention_panel(frame, mask, cam, titles=("", "", ""))
    assert not (unlabelled.min(axis=-1) > 200).any()


# ----- PPO's advantages against the definition ----------------------------------------------------
def test_gae_matches_the_discounted_sum_of_td_errors(ppo):
    # A_t = sum_l (gamma lambda)^l delta_{t+l}, cut where an episode ends; dones[t] marks obs[t] as a new episode's
    # first
    gen = torch.Generator().manual_seed(0)
    steps, envs, gamma, lam = 7, 3, 0.99, 0.95
    rewards, values = torch.randn(steps, envs, generator=gen), torch.randn(steps, envs, generator=gen)
    dones = (torch.rand(steps, envs, generator=gen) < 0.3).float()
    next_value, next_done = torch.randn(1, envs, generator=gen), torch.tensor([0.0, 1.0, 0.0])
    got = ppo.gae(rewards, values, dones, next_value, next_done, gamma, lam)
    want = torch.zeros(steps, envs)
    for e in range(envs):
        following_done = torch.cat([dones[1:, e], next_done[e : e + 1]])  # does obs[t + 1] start a new episode?
        following_value = torch.cat([values[1:, e], next_value[0, e : e + 1]])
        delta = rewards[:, e] + gamma * following_value * (1 - following_done) - values[:, e]
        for t in range(steps):
            total, discount = 0.0, 1.0
            for u in range(t, steps):
                total += discount * delta[u]
                if following_done[u]:
                    break
                discount *= gamma * lam
            want[t, e] = total
    torch.testing.assert_close(got, want)
