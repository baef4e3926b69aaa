"""Real ViZDoom runs of the whole script with tiny settings: every env, both methods."""

import json

import pytest

from conftest import read_events

TRAIN_TAGS = {
    "charts/episodic_return",
    "charts/episodic_length",
    "charts/SPS",
    "charts/learning_rate",
    "losses/value_loss",
    "losses/policy_loss",
    "losses/entropy",
    "losses/old_approx_kl",
    "losses/approx_kl",
    "losses/clipfrac",
    "losses/explained_variance",
    "losses/camal_loss",
    "charts/mask_valid_fraction",
    "charts/cam_empty_fraction",
}
ATTENTION_TAGS = {"charts/alpha", "charts/beta", "charts/attention_iou"}


@pytest.mark.slow
@pytest.mark.parametrize("method", ["camal", "vanilla"])
@pytest.mark.parametrize("env", ["Basic", "DefendLine", "DefendCenter", "TakeCover"])
def test_smoke(ppo_smoke_run, env, method):
    proc, tmp_path = ppo_smoke_run(env, method)
    extra = (env, method) == ("Basic", "camal")  # that run also saved its model and videos
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert run_dir.name.startswith(f"{env}__ppo_camal_vizdoom__{method}__2__")

    acc = read_events(run_dir)
    tags = acc.Tags()
    scalars = set(tags["scalars"])
    episodes_ended = "charts/episodic_return" in scalars
    expected = TRAIN_TAGS - ({"charts/episodic_return", "charts/episodic_length"} if not episodes_ended else set())
    assert expected <= scalars, expected - scalars
    assert {"eval/episodic_return"} <= scalars
    # attention is measured in vanilla runs too; objects are on screen in every scenario's start
    assert ATTENTION_TAGS <= scalars, ATTENTION_TAGS - scalars
    for tag in ATTENTION_TAGS | {"losses/camal_loss"}:
        for ev in acc.Scalars(tag):
            assert ev.value == ev.value, f"{tag} is NaN"
    assert [ev.step for ev in acc.Scalars("charts/SPS")] == [64, 128]
    # where each iteration's time went (benchmarks/gpu_check.py reads these): env stepping is part of the rollout
    perf = {t: [ev.value for ev in acc.Scalars(f"perf/{t}_seconds")] for t in ("env", "rollout", "update")}
    assert all(len(v) == 2 and min(v) > 0 for v in perf.values()), perf
    assert all(e < r for e, r in zip(perf["env"], perf["rollout"])), perf
    alpha = [ev.value for ev in acc.Scalars("charts/alpha")]
    assert all(0.0 <= a <= 1.0 for a in alpha)
    assert "attention/frame_mask_cam" in tags["images"]
    image = acc.Images("attention/frame_mask_cam")[0]
    assert image.width == 3 * 80 and image.height % 60 == 0
    assert any("hyperparameters" in t for t in tags["tensors"])

    # the collapse warning (patience 1 in these runs) comes exactly when over half the CAMs of an iteration were empty
    empty = [ev.value for ev in acc.Scalars("charts/cam_empty_fraction")]
    assert all(0.0 <= v <= 1.0 for v in empty)
    assert ("warning: the critic's CAM has been empty" in proc.stderr) == any(v > 0.5 for v in empty), (
        empty,
        proc.stderr[-2000:],
    )
    # the paper's CAM at seed 2: every critic map is empty (docs/ppo_camal_vizdoom.md, --cam)
    if (env, method) == ("Basic", "vanilla"):
        assert empty == [1.0, 1.0]
    else:  # the default |.| CAM is never empty
        assert empty == [0.0, 0.0]

    result = json.loads((run_dir / "eval.json").read_text())
    assert result["env"] == env and result["method"] == method and result["seed"] == 2
    assert result["cam"] == ("paper" if (env, method) == ("Basic", "vanilla") else "abs")
    assert result["cam_empty_fraction"] == (1.0 if (env, method) == ("Basic", "vanilla") else 0.0)
    assert result["total_timesteps"] == 128
    assert len(result["episodic_returns"]) == 2 == len(result["episodic_iou"]) == len(result["episodic_lengths"])
    assert result["mean_return"] == pytest.approx(sum(result["episodic_returns"]) / 2)
    ious = [v for v in result["episodic_iou"] if v is not None]
    if ious:
        assert result["mean_iou"] == pytest.approx(sum(ious) / len(ious))
        assert all(0.0 <= v <= 1.0 for v in ious)
    # the same policy measured under every --cam (the baseline of each formulation); the run's own is mean_iou
    by_cam = result["by_cam"]
    assert set(by_cam) == {"abs", "paper", "abs-target"} and result["reward_scale"] == 1.0
    assert by_cam[result["cam"]] == {"mean_iou": result["mean_iou"], "cam_empty_fraction": result["cam_empty_fraction"]}
    assert by_cam["abs"]["cam_empty_fraction"] == 0.0 <= by_cam["paper"]["cam_empty_fraction"] <= 1.0
    if (env, method) == ("Basic", "vanilla"):
        assert by_cam["paper"]["cam_empty_fraction"] == 1.0 and by_cam["paper"]["mean_iou"] in (0.0, None)
    # a random policy over the same episodes: what "learned" is measured against
    assert len(result["random_returns"]) == 2 and result["random_mean_return"] == pytest.approx(
        sum(result["random_returns"]) / 2
    )
    assert result["eval_max_steps"] == 5000 and len(result["episodic_truncated"]) == 2
    assert all(isinstance(t, bool) for t in result["episodic_truncated"])

    if extra:
        assert (run_dir / "ppo_camal_vizdoom.cleanrl_model").is_file()
        videos = sorted(p.name for p in (tmp_path / "videos" / run_dir.name).iterdir())
        assert "train-iter-000001.mp4" in videos and "eval-episode-0.mp4" in videos
        import cv2

        cap = cv2.VideoCapture(str(tmp_path / "videos" / run_dir.name / "train-iter-000001.mp4"))
        assert int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) == 32  # env 0's whole rollout
        assert cap.get(cv2.CAP_PROP_FRAME_WIDTH) == 3 * cap.get(cv2.CAP_PROP_FRAME_HEIGHT) * 80 / 60


@pytest.mark.slow
def test_attention_figure(ppo_smoke_run, tmp_path):
    """The paper's Figure 11 from two saved runs: frame | mask | each agent's CAM on the same frames; the IoU of fixed
    maps beside the agents' own."""
    import torch
    from PIL import Image

    from conftest import load_script, run_script

    runs = [next((ppo_smoke_run("Basic", m)[1] / "runs").iterdir()) for m in ("camal", "vanilla")]
    proc = run_script("drl_attention_figure", [*map(str, runs), "--frames", "2", "--out", "fig.png"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with Image.open(tmp_path / "fig.png") as im:
        assert im.size[0] > 2 * im.size[1] > 0  # two rows of four panels
    lines = [line for line in proc.stdout.splitlines() if "mean IoU over all" in line]
    assert [line.split(" (")[0] for line in lines] == ["camal", "vanilla"]
    assert "the masks' mean as a fixed map 0." in lines[0]
    # the fixed maps' IoUs against cases with a known answer: maps that never change score their mean's IoU, and masks
    # that never change are their own mean (IoU 1)
    fig = load_script("drl_attention_figure")
    masks = torch.zeros(3, 6, 8, dtype=torch.bool)
    masks[:, 1:3, 2:5] = True
    cam = torch.rand(1, 6, 8)
    cams = ((cam - cam.min()) / (cam.max() - cam.min())).expand(3, 6, 8)  # scaled to [0, 1], as a CAM is
    own, fixed, prior = fig.fixed_map_ious(cams, masks, 0.7)
    assert own == pytest.approx(fixed) and prior == pytest.approx(1.0)
    # an object elsewhere in one frame: the mean mask misses it, a map on each object does not
    masks[1] = False
    masks[1, 4:6, 6:8] = True
    own, fixed, prior = fig.fixed_map_ious(masks.float(), masks, 0.7)
    assert own == pytest.approx(1.0) and prior == pytest.approx(2 / 3) and fixed == pytest.approx(2 / 3)
    # bad input: a missing folder, a run without a saved model (in-process: the script prints the message, exit 2)
    other = next((ppo_smoke_run("DefendLine", "camal")[1] / "runs").iterdir())
    for runs_given, message in (
        ((str(tmp_path / "nope"), str(runs[1])), "does not exist"),
        ((str(runs[0]), str(other)), "--save-model"),
    ):
        with pytest.raises(ValueError, match=message):
            fig.draw(fig.Args(runs=runs_given))
    bad = run_script("drl_attention_figure", [str(tmp_path / "nope"), str(runs[1])], cwd=tmp_path)
    assert bad.returncode == 2 and "does not exist" in bad.stderr and "Traceback" not in bad.stderr


@pytest.mark.slow
def test_evaluation_episodes_end_at_the_time_limit(tmp_path):
    """TakeCover has no timeout: --eval-max-steps ends its evaluation episodes (truncated, at exactly the limit), for
    the trained policy and the random one alike; an episode that ends by death first is not truncated."""
    from conftest import PPO_TINY, run_script

    args = ["--env", "TakeCover", *PPO_TINY, "--eval-episodes", "6", "--eval-max-steps", "30", "--image-every", "0"]
    proc = run_script("ppo_camal_vizdoom", args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run_dir,) = (tmp_path / "runs").iterdir()
    result = json.loads((run_dir / "eval.json").read_text())
    lengths, truncated, returns = result["episodic_lengths"], result["episodic_truncated"], result["episodic_returns"]
    assert len(lengths) == 6 and max(lengths) == 30 and any(truncated)
    # TakeCover pays one point per tic alive: a truncated episode lasted the limit's 120 tics, one that was not died
    # sooner
    for n, t, r in zip(lengths, truncated, returns):
        assert (n, r) == (30, 120) if t else r < 120, (lengths, truncated, returns)
    assert max(result["random_returns"]) <= 30 * 4
    assert "(a random policy: " in proc.stdout
