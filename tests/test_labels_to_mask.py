"""labels_to_mask on real ViZDoom frames of every scenario."""

import cv2
import numpy as np
import pytest


def frame_with_objects(env, max_steps=300):
    """Step a real game with a fixed action cycle until a frame shows at least one game object."""
    env.reset(seed=3)
    for t in range(max_steps):
        state = env.game.get_state()
        objects = [label for label in state.labels if label.object_name != "DoomPlayer"]
        if objects and any((state.labels_buffer == label.value).any() for label in objects):
            return state
        _, _, term, trunc, _ = env.step(t % env.action_space.n)
        if term or trunc:
            env.reset()
    pytest.fail(f"no game object on screen in {max_steps} steps")


@pytest.mark.parametrize("name", ["Basic", "DefendLine", "DefendCenter", "TakeCover"])
def test_labels_to_mask_real_frames(ppo, name):
    env = ppo.VizDoomEnv(name, frame_skip=4, frame_height=240, frame_width=320)
    try:
        state = frame_with_objects(env)
        lb = state.labels_buffer
        mask = ppo.labels_to_mask(lb, state.labels)
        assert mask.dtype == np.bool_ and mask.shape == lb.shape == (240, 320)

        objects = {label.value for label in state.labels if label.object_name != "DoomPlayer"}
        player = {label.value for label in state.labels if label.object_name == "DoomPlayer"}
        assert mask.any()
        for v in objects:  # every object pixel is in
            assert mask[lb == v].all(), f"object value {v} not in the mask"
        assert not mask[np.isin(lb, [0, 1])].any(), "walls or floors in the mask"
        for v in player:  # the weapon sprite is out
            assert not mask[lb == v].any()
        assert set(np.unique(lb[mask]).tolist()) <= objects
        if name != "TakeCover":  # the weapon is rendered in these three: make sure the test saw it
            assert (lb == 255).any() and 255 in player

        # the env's observation: the newest frame's mask, resized with nearest neighbour
        small = ppo.VizDoomEnv(name, frame_skip=4, frame_height=60, frame_width=80)
        try:
            obs, _ = small.reset(seed=3)
            s = small.game.get_state()
            lb_small = cv2.resize(s.labels_buffer, (80, 60), interpolation=cv2.INTER_NEAREST)
            assert obs["mask"].shape == (60, 80) and obs["frame"].shape == (60, 80)
            np.testing.assert_array_equal(obs["mask"].astype(bool), ppo.labels_to_mask(lb_small, s.labels))
        finally:
            small.close()
    finally:
        env.close()


def test_labels_values_are_read_not_hard_coded(ppo):
    """The same value means different things in different frames: only state.labels decides."""

    class L:
        def __init__(self, value, name):
            self.value, self.object_name = value, name

    lb = np.array([[0, 1, 63, 127], [191, 255, 127, 63]], dtype=np.uint8)
    m = ppo.labels_to_mask(lb, [L(63, "DoomImp"), L(255, "DoomPlayer")])
    assert m.tolist() == [[False, False, True, False], [False, False, False, True]]
    m = ppo.labels_to_mask(lb, [L(127, "Demon"), L(191, "DoomImp")])
    assert m.tolist() == [[False, False, False, True], [True, False, True, False]]
