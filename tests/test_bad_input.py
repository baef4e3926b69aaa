"""Bad input to every script gets a clear message and a non-zero exit code, with no traceback.

Most settings are checked in-process, through the functions each script runs before any work (tyro's parser, then
ppo_camal_vizdoom's check_args or train_dl_camal's setup). A few cases run the real command line, which turns those
same errors into a message and exit code 2; starting a script costs seconds (torch imports), so only a few do.
"""

import pytest
import tyro

from conftest import run_script

PPO = "ppo_camal_vizdoom"
DL = "train_dl_camal"


def test_unknown_env_lists_the_four(tmp_path):
    proc = run_script(PPO, ["--env", "Doom2"], cwd=tmp_path)
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    for name in ("Basic", "DefendLine", "DefendCenter", "TakeCover"):
        assert name in out
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    "script, args, message",
    [
        (PPO, ["--total-timesteps", "100"], "less than one rollout"),
        (DL, ["--dataset", "pets"], "--data-dir"),
        (DL, ["--model", "resnet50"], "resnet18"),
        (DL, ["--batch-size", "100000"], "keeps about 2860.1 GiB of activations, more than 80 %"),
        ("regularizer_study", ["--dilate-max", "nan"], "--dilate-max must be a number in (0, 100]"),
    ],
)
def test_command_line(tmp_path, script, args, message):
    proc = run_script(script, args, cwd=tmp_path)
    assert proc.returncode == 2
    assert message in proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    "args, message",
    [(["--resume", "no/such/run"], "--resume no/such/run does not exist"), (["--resume", "."], "no checkpoint.pt")],
)
def test_ppo_resume(ppo, capsys, tmp_path, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as err:  # resume_from says why and exits 2, before any work
        ppo.resume_from(tyro.cli(ppo.Args, args=args))
    assert err.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize(
    "args, message",
    [
        (["--frame-height", "30", "--frame-width", "80"], "too small for the Nature CNN"),
        (["--total-timesteps", "-100"], "--total-timesteps must be positive"),
        (["--num-envs", "3", "--num-steps", "5"], "does not split into 4 minibatches"),
        (["--tau", "1.5"], "--tau"),
        (
            ["--num-envs", "64", "--num-steps", "100000", "--total-timesteps", "6400000"],
            "needs about 2288.8 GiB, more than 80 %",
        ),
        (["--method", "gradcam"], "camal"),
        (["--cam", "relu"], "abs-target"),
        (["--collapse-patience", "-1"], "--collapse-patience must not be negative"),
    ],
)
def test_ppo_settings(ppo, capsys, args, message):
    with pytest.raises((ValueError, SystemExit)) as err:
        ppo.check_args(tyro.cli(ppo.Args, args=args))
    if err.type is SystemExit:  # tyro's own message for a value it does not accept
        assert err.value.code == 2
        assert message in capsys.readouterr().err
    else:
        assert message in str(err.value)


def test_dl_pretrained_default_follows_the_dataset(dl):
    """Shapes trains from scratch unless --pretrained is given; the real datasets start from ImageNet unless
    --no-pretrained."""
    assert dl.parse_args([]).pretrained is False
    assert dl.parse_args(["--pretrained"]).pretrained is True
    assert dl.parse_args(["--dataset", "pets"]).pretrained is True
    assert dl.parse_args(["--dataset", "pets", "--no-pretrained"]).pretrained is False
    # the second parse keeps every other flag
    assert dl.parse_args(["--epochs", "3", "--model", "vit_b_16"]) == dl.Args(
        epochs=3, model="vit_b_16", pretrained=False
    )


@pytest.mark.parametrize(
    "args, message",
    [
        (["--dataset", "imagenet"], "shapes"),
        (["--dataset", "pets", "--data-dir", "no/such/dir"], "--data-dir no/such/dir does not exist"),
        (["--dataset", "busi", "--data-dir", "."], "Dataset_BUSI_with_GT"),
        (
            ["--dataset", "shapes", "--pretrained", "--download-mirror", "http://127.0.0.1:9"],
            "put resnet18-",
        ),  # no server: offline
        (["--fold", "10"], "--fold must be 0 to 9"),
        (["--method", "gradcam"], "prior"),
        (["--method", "prior"], "--prior-weights"),
        (["--weights", "nope.pth", "--pretrained"], "no such file"),
        (["--weights", "w.pth"], "--weights w.pth is the start of a --pretrained run, and this one starts from random"),
        (["--weights", "w.pth", "--no-pretrained", "--resize", "square"], "add --pretrained"),
        (["--resume", "no/such/run"], "--resume no/such/run does not exist"),
        (["--resume", "."], "no checkpoint.pt"),
        (["--image-size", "16"], "--image-size must be at least 32"),
        (["--batch-size", "4", "--image-size", "20000"], "keeps about 912.0 GiB of activations"),
        (["--image-size", "112", "--model", "vit_b_16"], "takes 224 x 224 images only"),
        (["--image-size", "112", "--method", "prior", "--prior-weights", "random"], "CLIP's input"),
        (["--shapes-cue", "stripes"], "background"),
        (["--collapse-patience", "-2"], "--collapse-patience must not be negative"),
    ],
)
def test_dl_settings(dl, capsys, tmp_path, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(
        "TORCH_HOME", str(tmp_path / "torch")
    )  # no cached weights: the offline message, never the network
    with pytest.raises((ValueError, FileNotFoundError, dl.DataError, SystemExit)) as err:
        dl.setup(dl.parse_args(args))
    if err.type is SystemExit:
        assert err.value.code == 2
        assert message in capsys.readouterr().err
    else:
        assert message in str(err.value)
