"""Bad input gets a clear message and a non-zero exit code."""
import pytest

from conftest import run_script


def test_unknown_env_lists_the_four(tmp_path):
    proc = run_script("ppo_camal_vizdoom", ["--env", "Doom2"], cwd=tmp_path)
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    for name in ("Basic", "DefendLine", "DefendCenter", "TakeCover"):
        assert name in out
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--frame-height", "30", "--frame-width", "80"], "too small for the Nature CNN"),
        (["--total-timesteps", "-100"], "--total-timesteps must be positive"),
        (["--total-timesteps", "100"], "less than one rollout"),
        (["--num-envs", "3", "--num-steps", "5"], "does not split into 4 minibatches"),
        (["--method", "gradcam"], "camal"),
        (["--resume", "no/such/run"], "no checkpoint.pt"),
        (["--tau", "1.5"], "--tau"),
    ],
)
def test_bad_settings(tmp_path, args, message):
    proc = run_script("ppo_camal_vizdoom", args, cwd=tmp_path)
    assert proc.returncode != 0
    assert message in proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "runs").exists()
