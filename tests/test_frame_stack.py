"""The frame stack the agent sees: each game sends only its newest frame, and stack_frames builds the stack where the
model runs."""

from collections import deque

import numpy as np
import pytest
import torch


@pytest.mark.slow
def test_stack_frames_is_each_games_last_four_frames(ppo):
    """Real Basic games under random play: at every step, across episode ends, the stack equals each game's last four
    frames, oldest first, with an episode's first frame filling the stack (a reference built apart, frame by frame)."""
    args = ppo.Args(env="Basic", num_envs=2, frame_height=60, frame_width=80, vector_env="sync", num_steps=8)
    envs = ppo.make_envs(args)
    try:
        assert envs.single_observation_space["frame"].shape == (60, 80)
        obs, _ = envs.reset(seed=5)
        first = np.ones(2, dtype=bool)
        stack = torch.zeros((2, 4, 60, 80), dtype=torch.uint8)
        reference = [deque(maxlen=4) for _ in range(2)]
        rng, ends = np.random.default_rng(0), 0
        for _ in range(200):
            stack = ppo.stack_frames(stack, torch.from_numpy(obs["frame"]), torch.from_numpy(first))
            for i in range(2):
                reference[i].extend([obs["frame"][i].copy()] * (4 if first[i] else 1))
                assert np.array_equal(stack[i].numpy(), np.stack(reference[i]))
            # a new tensor, never a view of the vector env's buffer (which the next step overwrites)
            assert stack.data_ptr() != torch.from_numpy(obs["frame"]).data_ptr()
            obs, _, term, trunc, _ = envs.step(rng.integers(0, envs.single_action_space.n, 2))
            first = np.logical_or(term, trunc)
            ends += first.sum()
        assert ends >= 2  # the resets were exercised
    finally:
        envs.close()
