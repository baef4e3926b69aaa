"""The frame stack built where the model runs (each game sends only its newest frame) is the stack the games build."""

import json

import numpy as np
import pytest
import torch

from conftest import read_events


@pytest.mark.slow
def test_stack_frames_matches_the_games_own_stack(ppo):
    """Real Basic games stepped with the same actions: the stack made from the newest frames equals the stack the games
    sent, at every step, across episode ends (Basic's episodes are short under random play, and each env resets itself)."""
    args = [ppo.Args(env="Basic", num_envs=2, frame_height=60, frame_width=80, vector_env="sync", frame_stack_on=on) for on in ("env", "device")]
    whole, newest = (ppo.make_envs(a) for a in args)
    try:
        assert whole.single_observation_space["frames"].shape == (4, 60, 80)
        assert newest.single_observation_space["frames"].shape == (1, 60, 80)
        obs_w, _ = whole.reset(seed=5)
        obs_n, _ = newest.reset(seed=5)
        stack = ppo.stack_frames(torch.zeros((2, 4, 60, 80), dtype=torch.uint8), torch.from_numpy(obs_n["frames"]), torch.ones(2, dtype=torch.bool))
        rng, ends = np.random.default_rng(0), 0
        for _ in range(200):
            assert torch.equal(stack, torch.from_numpy(obs_w["frames"]))
            assert np.array_equal(obs_w["mask"], obs_n["mask"])
            action = rng.integers(0, whole.single_action_space.n, 2)
            obs_w, r_w, term, trunc, _ = whole.step(action)
            obs_n, r_n, term_n, trunc_n, _ = newest.step(action)
            assert np.array_equal(r_w, r_n) and np.array_equal(term, term_n) and np.array_equal(trunc, trunc_n)
            first = np.logical_or(term, trunc)
            ends += first.sum()
            stack = ppo.stack_frames(stack, torch.from_numpy(obs_n["frames"]), torch.from_numpy(first))
        assert ends >= 2  # the resets were exercised
        # a new tensor, never a view of the vector env's buffer (which the next step overwrites)
        assert stack.data_ptr() != torch.from_numpy(obs_n["frames"]).data_ptr()
    finally:
        whole.close()
        newest.close()


@pytest.mark.slow
def test_training_is_the_same_either_way(ppo_smoke_run):
    """The whole script with the stack built in the games (the older way) trains the same agent, bit for bit, and
    evaluates it to the same returns and IoUs as the default."""
    runs = []
    for more in ((), ("--frame-stack-on", "env")):
        proc, cwd = ppo_smoke_run("Basic", "camal", more)
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs.append(next((cwd / "runs").iterdir()))
    models = [torch.load(r / "ppo_camal_vizdoom.cleanrl_model", weights_only=True) for r in runs]
    assert models[0].keys() == models[1].keys()
    assert all(torch.equal(models[0][k], models[1][k]) for k in models[0])
    a, b = (json.loads((r / "eval.json").read_text()) for r in runs)
    assert a["episodic_returns"] == b["episodic_returns"] and a["episodic_iou"] == b["episodic_iou"]
    losses = [[e.value for e in read_events(r).Scalars("losses/camal_loss")] for r in runs]
    assert losses[0] == losses[1]
