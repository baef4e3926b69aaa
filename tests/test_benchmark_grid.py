"""benchmark.py: the grids, dry runs, real local runs that skip, resume, retry and lock, the analysis, and SLURM through
submitit."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import PPO_TINY, ROOT, proc_read, read_events

TINY_DRL = [*PPO_TINY, "--eval-episodes", "2", "--image-every", "0"]
# one camal cell on Basic that runs long enough to be interrupted: 2 envs x 32 steps per iteration, 64 steps
CELL = ["--preset", "drl", "--envs", "Basic", "--seeds", "1", "--methods", "camal", "--no-analysis"]


def long_cell(iterations):
    return [
        "--num-envs",
        "2",
        "--num-steps",
        "32",
        "--total-timesteps",
        str(64 * iterations),
        "--frame-height",
        "60",
        "--frame-width",
        "80",
        "--eval-episodes",
        "1",
        "--image-every",
        "0",
    ]


TINY_DL = [
    "--shapes-classes",
    "2",
    "--shapes-per-class",
    "4",
    "--num-folds",
    "2",
    "--batch-size",
    "4",
    "--epochs",
    "1",
    "--image-size",
    "64",
]


def bench(args, cwd, timeout=600, env=None):
    return subprocess.run(
        [sys.executable, str(ROOT / "benchmark.py"), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env or dict(os.environ, PYTHONUNBUFFERED="1"),
    )


@pytest.mark.parametrize(
    "args, lines",
    [
        (["--preset", "drl"], 40),
        (["--preset", "dl"], 540),
        (["--preset", "dl-suppress"], 360),
        (["--preset", "study"], 2),
        (["--preset", "drl", "--envs", "Basic", "TakeCover", "--seeds", "1", "2", "3"], 12),
        (["--preset", "drl", "--envs", "Basic", "Basic", "--methods", "camal", "camal", "--seeds", "1", "1"], 1),
        (["--preset", "drl", "--seeds", "1", "--no-cuda", "--frame_height=60", "--no-track"], 8),  # tyro's spellings
        (
            ["--preset", "drl", "--cams", "paper", "abs", "abs-target"],
            80,
        ),  # 3 CAMAL cells per env and seed, vanilla once
        (
            ["--preset", "dl", "--datasets", "pets", "--models", "resnet18", "--folds", "0", "1", "--data-dir", "DATA"],
            6,
        ),
    ],
)
def test_dry_run_prints_one_line_per_cell(tmp_path, args, lines):
    proc = bench([*args, "--dry-run"], tmp_path)
    assert proc.returncode == 0 and proc.stderr == "" and "download.py" not in proc.stdout
    out = proc.stdout.splitlines()
    assert len(out) == lines and len(set(out)) == lines
    assert all(" && " in line and "# " in line for line in out)
    assert not (tmp_path / "benchmark_runs").exists()  # nothing made


def test_downloads_come_once_before_any_cell(tmp_path):
    """--download: download.py fetches the grid's datasets and the ImageNet weights of its models once, before any cell
    starts (a cluster's nodes may have no network); --dry-run lists those commands, and one that fails starts no
    cell."""
    grid = ["--preset", "dl", "--datasets", "pets", "shapes", "--models", "resnet18", "vit_b_16", "--folds", "0"]
    flags = ["--download", "--data-dir", "DATA", "--download-mirror", "http://127.0.0.1:9"]  # port 9: nothing listens
    out = bench([*grid, *flags, "--dry-run"], tmp_path).stdout.splitlines()
    fetch = [line for line in out if "download.py" in line]
    assert len(fetch) == 2 and all(line.endswith("# fetched once, before any cell starts") for line in fetch)
    assert "--dataset pets --data-dir DATA" in fetch[0] and "--mirror http://127.0.0.1:9" in fetch[0]
    assert "--weights resnet18 vit_b_16" in fetch[1] and "shapes" not in " ".join(fetch)
    scratch = bench([*grid, *flags, "--no-pretrained", "--dry-run"], tmp_path).stdout
    assert "--weights" not in scratch and "--dataset pets" in scratch  # cells that start from scratch need no weights
    assert "download.py" not in bench([*grid, "--dry-run"], tmp_path).stdout  # without --download, nothing is fetched
    failed = bench([*grid, *flags, "--no-pretrained"], tmp_path)
    assert failed.returncode == 2 and "download.py exited with 2; no cell was started" in failed.stderr, failed.stderr[
        -2000:
    ]
    assert "cannot download http://127.0.0.1:9/" in failed.stderr and "Traceback" not in failed.stderr
    assert not (tmp_path / "benchmark_runs" / "cells").exists()


def test_cell_identity_is_the_cell_and_its_flags_not_the_time(tmp_path):
    a = bench(
        ["--preset", "drl", "--envs", "Basic", "--seeds", "1", "--methods", "camal", "--dry-run"], tmp_path
    ).stdout
    b = bench(
        ["--preset", "drl", "--envs", "Basic", "--seeds", "1", "--methods", "camal", "--dry-run"], tmp_path
    ).stdout
    c = bench(
        [
            "--preset",
            "drl",
            "--envs",
            "Basic",
            "--seeds",
            "1",
            "--methods",
            "camal",
            "--dry-run",
            "--frame-height",
            "60",
        ],
        tmp_path,
    ).stdout
    assert a == b and "cells/drl__Basic__camal__paper__1 " in a
    assert "--frame-height 60" in c and "cells/drl__Basic__camal__paper__1__" in c  # other flags: another cell


def test_the_paper_grid_runs_the_papers_cam(tmp_path):
    """--preset drl reproduces Table 8 with the paper's Eq. 3 (--cam paper); --cams adds the remedies as more CAMAL
    cells, and vanilla runs once (its eval.json measures the IoU under every CAM)."""
    paper = bench(["--preset", "drl", "--dry-run"], tmp_path).stdout.splitlines()
    assert all("--cam=paper" in line for line in paper) and sum("--method=vanilla" in line for line in paper) == 20
    both = bench(
        ["--preset", "drl", "--envs", "Basic", "--seeds", "1", "--cams", "abs", "paper", "--dry-run"], tmp_path
    ).stdout.splitlines()
    assert [line.split("# ")[1].split(":")[0] for line in both] == [
        "drl__Basic__camal__abs__1",
        "drl__Basic__camal__paper__1",
        "drl__Basic__vanilla__abs__1",  # with the first of --cams
    ]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--preset", "drl", "--folds", "1"], "--folds does not apply to --preset drl"),
        (["--preset", "drl", "--seed", "3"], "the grid's own"),
        (["--preset", "drl", "--seed=3"], "the grid's own"),
        (["--preset", "drl", "--cam", "abs"], "use --envs, --methods, --cams"),
        (["--preset", "dl", "--cams", "abs"], "--cams does not apply to --preset dl"),
        (["--preset", "nope"], "invalid choice"),
        (["--preset", "dl", "--runs-per-gpu", "0"], "--runs-per-gpu must be at least 1"),
        (["--preset", "drl", "--envs", "Doom2"], "invalid choice"),
        # misspelt or unknown flags are refused before any cell starts (each cell failed on them after its start-up)
        (["--preset", "drl", "--total-timestep", "256"], "has no --total-timestep (did you mean --total-timesteps?)"),
        (["--preset", "dl", "--dry-run", "--bogus-flag", "3"], "train_dl_camal.py has no --bogus-flag"),
        (["--preset", "study", "--epochs", "3"], "regularizer_study.py has no --epochs"),
    ],
)
def test_bad_input(tmp_path, args, message):
    proc = bench(args, tmp_path)
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_local_grid_runs_skips_and_analyses(tmp_path):
    """Two cells at once, each on its own GPU slot with the CPU threads shared out. This machine has no GPU, so a
    stand-in nvidia-smi lists two; the runs themselves then use the CPU, as --cuda does where CUDA is missing."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "nvidia-smi").write_text(
        "#!/bin/sh\necho 'GPU 0: Stand-in (UUID: GPU-0)'\necho 'GPU 1: Stand-in (UUID: GPU-1)'\n"
    )
    (bin_dir / "nvidia-smi").chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", PYTHONUNBUFFERED="1")
    args = ["--preset", "drl", "--envs", "Basic", "--seeds", "1", *TINY_DRL]
    first = bench(args, tmp_path, env=env)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "2 at a time on this machine (2 GPUs, 1 run per GPU" in first.stderr
    cells = sorted((tmp_path / "benchmark_runs" / "cells").iterdir())
    assert [c.name.split("__")[2] for c in cells] == ["camal", "vanilla"]
    logs = [(c / "log.txt").read_text() for c in cells]
    devices = {next(t for t in log.split() if t.startswith("CUDA_VISIBLE_DEVICES=")) for log in logs}
    assert devices == {"CUDA_VISIBLE_DEVICES=0", "CUDA_VISIBLE_DEVICES=1"}
    assert all(f"OMP_NUM_THREADS={max(1, (os.cpu_count() or 1) // 2)}" in log for log in logs)
    for c in cells:
        (run,) = (c / "runs").iterdir()
        assert json.loads((run / "eval.json").read_text())["total_timesteps"] == 128
    assert "done 2 / running 0 / failed 0 / left 0" in first.stderr and "2 done, 0 failed" in first.stderr
    stats = (tmp_path / "benchmark_runs" / "analysis" / "stats.md").read_text()
    assert "DRL runs" in stats and (tmp_path / "benchmark_runs" / "analysis" / "stats.json").is_file()
    again = bench(args, tmp_path, env=env)  # the same command: every cell is finished, nothing runs again
    assert again.returncode == 0 and "2 done, 0 failed" in again.stderr
    assert all(len(list((c / "runs").iterdir())) == 1 for c in cells)
    dry = bench([*args, "--dry-run"], tmp_path, env=env).stdout
    assert dry.count(": finished") == 2


def start_until_checkpoint(args, tmp_path):
    """benchmark.py with one cell, in the background, until the cell's run has saved a checkpoint: (the process, the
    cell)."""
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "benchmark.py"), *args],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    cells = tmp_path / "benchmark_runs" / "cells"
    deadline = time.time() + 300
    while not list(cells.glob("*/runs/*/checkpoint.pt")) and time.time() < deadline:
        time.sleep(0.2)
    (cell,) = cells.iterdir()
    return proc, cell


@pytest.mark.slow
def test_interrupted_cell_resumes_from_its_checkpoint(tmp_path):
    iters, per_iter = 12, 64
    args = [*CELL, "--checkpoint-every", "2", *long_cell(iters)]
    proc, cell = start_until_checkpoint(args, tmp_path)
    proc.send_signal(signal.SIGINT)  # Ctrl-C on the benchmark: the cell checkpoints and stops
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGINT, err[-3000:]
    assert "1 interrupted" in err and not list(cell.glob("runs/*/eval.json"))
    resumed = bench(args, tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    log = (cell / "log.txt").read_text()
    assert "--resume runs/" in log and "resuming" in log
    (run,) = (cell / "runs").iterdir()
    assert (run / "eval.json").is_file()
    steps = [e.step for e in read_events(run).Scalars("charts/SPS")]
    assert steps == [per_iter * i for i in range(1, iters + 1)]  # one value per iteration across the break


@pytest.mark.slow
def test_refused_cell_is_not_retried_and_is_summarised(tmp_path):
    """Exit code 2 is the script refusing its input: the same command would be refused again, so it is not retried."""
    proc = bench(
        [
            "--preset",
            "dl",
            "--datasets",
            "pets",
            "--models",
            "resnet18",
            "--methods",
            "camal",
            "--folds",
            "0",
            "--retries",
            "1",
            "--data-dir",
            "no/such/dir",
        ],
        tmp_path,
    )
    assert proc.returncode == 1
    (cell,) = (tmp_path / "benchmark_runs" / "cells").iterdir()
    log = (cell / "log.txt").read_text()
    # benchmark.py makes path flags absolute (cells run from their own folders)
    assert log.count("(attempt ") == 1 and f"--data-dir {tmp_path / 'no/such/dir'} does not exist" in log
    assert "| failed cell | exit code | last lines of its log |" in proc.stderr
    assert f"| {cell.name} | 2 | " in proc.stderr and "does not exist" in proc.stderr


@pytest.mark.slow
def test_a_crashed_cell_is_retried_from_its_checkpoint(tmp_path):
    """A training process killed outright (SIGKILL: no checkpoint of its own) is retried, and the retry resumes from the
    last checkpoint it saved; one curve value per iteration across the crash."""
    iters, per_iter = 12, 64
    args = [*CELL, "--checkpoint-every", "2", "--retries", "1", *long_cell(iters)]
    proc, cell = start_until_checkpoint(args, tmp_path)
    # the benchmark's own child only (other benchmarks may run on this machine)
    (trainer,) = subprocess.run(
        ["pgrep", "-P", str(proc.pid), "-f", "ppo_camal_vizdoom.py"], capture_output=True, text=True
    ).stdout.split()
    os.kill(int(trainer), signal.SIGKILL)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0 and "1 done, 0 failed" in err, err[-3000:]
    log = (cell / "log.txt").read_text()
    assert log.count("(attempt ") == 2 and "--resume runs/" in log and "resuming" in log
    (run,) = (cell / "runs").iterdir()
    assert [e.step for e in read_events(run).Scalars("charts/SPS")] == [per_iter * i for i in range(1, iters + 1)]


@pytest.mark.slow
def test_a_killed_benchmark_leaves_no_trainer_behind(tmp_path):
    """benchmark.py killed with SIGKILL (no handler of its own runs): its cell's trainer is told to stop, saves a
    checkpoint and exits, instead of running on unseen; and while it lives it holds the cell's lock, so a rerun cannot
    start a second trainer on the same run folder (before, "fold 0: results" came twice in one cell's log)."""
    import torch

    iters = 400
    args = [*CELL, "--checkpoint-every", "2", *long_cell(iters)]
    proc, cell = start_until_checkpoint(args, tmp_path)
    (trainer,) = [
        int(p)
        for p in os.listdir("/proc")
        if p.isdigit() and "ppo_camal_vizdoom.py" in proc_read(p) and os.path.realpath(f"/proc/{p}/cwd") == str(cell)
    ]
    held = [os.readlink(f"/proc/{trainer}/fd/{fd}") for fd in os.listdir(f"/proc/{trainer}/fd")]
    assert str(cell / "lock") in held, held
    proc.kill()
    proc.wait()
    deadline = time.time() + 60
    while os.path.exists(f"/proc/{trainer}") and time.time() < deadline:
        time.sleep(0.2)
    assert not os.path.exists(f"/proc/{trainer}"), "the trainer outlived its benchmark"
    log = (cell / "log.txt").read_text()
    assert "SIGTERM: saving a checkpoint" in log and "Traceback" not in log, log[-2000:]
    (run,) = (cell / "runs").iterdir()
    assert torch.load(run / "checkpoint.pt", weights_only=True)["iteration"] < iters


@pytest.mark.slow
def test_a_cell_runs_once_under_two_invocations(tmp_path):
    args = [*CELL, *TINY_DRL]
    first = subprocess.Popen(
        [sys.executable, str(ROOT / "benchmark.py"), *args],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    cells = tmp_path / "benchmark_runs" / "cells"
    deadline = time.time() + 120
    while not list(cells.glob("*/log.txt")) and time.time() < deadline:
        time.sleep(0.1)
    (log,) = cells.glob("*/log.txt")
    second = bench(args, tmp_path)  # while the first holds the cell's lock
    _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err[-3000:]
    assert second.returncode == 0 and "1 run by another invocation" in second.stderr
    assert log.read_text().count("(attempt ") == 1
    assert len(list(log.parent.glob("runs/*"))) == 1


@pytest.mark.slow
def test_dl_grid_with_analysis_through_submitit(tmp_path):
    """--backend slurm on submitit's local executor (the same array jobs, without a cluster), then eval_faithfulness and
    stats."""
    pytest.importorskip("submitit", reason="requirements-cluster.txt")  # .ci/run installs it, so CI runs this
    proc = bench(
        [
            "--preset",
            "dl",
            "--datasets",
            "shapes",
            "--models",
            "resnet18",
            "--methods",
            "camal",
            "vanilla",
            "--folds",
            "0",
            "1",
            "--backend",
            "slurm",
            "--slurm-cluster",
            "local",
            "--poll",
            "1",
            *TINY_DL,
        ],
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "4 cells submitted as a SLURM array" in proc.stderr and "4 done, 0 failed" in proc.stderr
    analysis = tmp_path / "benchmark_runs" / "analysis"
    assert "over the" in (analysis / "faithfulness.md").read_text()
    stats = json.loads((analysis / "stats.json").read_text())
    (comp,) = stats["dl"]["comparisons"]
    assert comp["baseline"] == "vanilla" and len(comp["pairs"]) == 2
    assert (analysis / "figures" / "attention_samples.png").is_file()


@pytest.mark.slow
@pytest.mark.parametrize(
    "script, args, tags",
    [
        (
            "ppo_camal_vizdoom",
            ["--env", "Basic", *PPO_TINY, "--eval-episodes", "0"],
            [b"charts/SPS", b"losses/camal_loss", b"charts/attention_iou"],
        ),
        (
            "train_dl_camal",
            [
                "--shapes-classes",
                "2",
                "--shapes-per-class",
                "4",
                "--folds",
                "2",
                "--fold",
                "0",
                "--batch-size",
                "4",
                "--epochs",
                "2",
                "--image-size",
                "64",
            ],
            [b"train/loss", b"test/accuracy", b"test/attention_iou"],
        ),
    ],
)
def test_track_offline_holds_the_scalars(tmp_path, script, args, tags):
    """--track, CleanRL's way: W&B mirrors the TensorBoard events. Offline, the run file holds every scalar's tag."""
    pytest.importorskip("wandb", reason="requirements-cluster.txt")  # .ci/run installs it, so CI runs this
    proc = subprocess.run(
        [sys.executable, str(ROOT / f"{script}.py"), *args, "--track", "--wandb-project-name", "camal-test"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
        env=dict(os.environ, WANDB_MODE="offline", WANDB_SILENT="true"),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run,) = (tmp_path / "runs").iterdir()
    (offline,) = run.glob("wandb/offline-run-*/run-*.wandb")
    data = offline.read_bytes()
    for tag in tags:
        assert tag in data, tag
