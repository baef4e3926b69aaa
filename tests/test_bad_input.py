"""Bad input to every script gets a clear message and a non-zero exit code, with no traceback."""
import pytest

from conftest import run_script


def test_unknown_env_lists_the_four(tmp_path):
    proc = run_script("ppo_camal_vizdoom", ["--env", "Doom2"], cwd=tmp_path)
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    for name in ("Basic", "DefendLine", "DefendCenter", "TakeCover"):
        assert name in out
    assert not (tmp_path / "runs").exists()


PPO = "ppo_camal_vizdoom"
DL = "train_dl_camal"


@pytest.mark.parametrize(
    "script, args, message",
    [
        (PPO, ["--frame-height", "30", "--frame-width", "80"], "too small for the Nature CNN"),
        (PPO, ["--total-timesteps", "-100"], "--total-timesteps must be positive"),
        (PPO, ["--total-timesteps", "100"], "less than one rollout"),
        (PPO, ["--num-envs", "3", "--num-steps", "5"], "does not split into 4 minibatches"),
        (PPO, ["--method", "gradcam"], "camal"),
        (PPO, ["--resume", "no/such/run"], "no checkpoint.pt"),
        (PPO, ["--tau", "1.5"], "--tau"),
        (DL, ["--model", "resnet50"], "resnet18"),
        (DL, ["--dataset", "imagenet"], "shapes"),
        (DL, ["--dataset", "pets"], "--data-dir"),
        (DL, ["--dataset", "pets", "--data-dir", "no/such/dir"], "is not a folder"),
        (DL, ["--dataset", "busi", "--data-dir", "."], "Dataset_BUSI_with_GT"),
        (DL, ["--dataset", "shapes", "--pretrained"], "put resnet18-"),
        (DL, ["--fold", "10"], "--fold must be 0 to 9"),
        (DL, ["--method", "gradcam"], "prior"),
        (DL, ["--method", "prior"], "--prior-weights"),
        (DL, ["--weights", "nope.pth"], "no such file"),
        (DL, ["--resume", "no/such/run"], "no checkpoint.pt"),
    ],
)
def test_bad_settings(tmp_path, script, args, message):
    proc = run_script(script, args, cwd=tmp_path)
    assert proc.returncode != 0
    assert message in proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "runs").exists()
