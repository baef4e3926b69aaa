"""Checkpoints and --resume: a killed or interrupted run continues into the same TensorBoard run."""

import contextlib
import dataclasses
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import ROOT, load_script, proc_read, read_events, run_script

ITERS, PER_ITER = 12, 32
ARGS = [
    "--env",
    "Basic",
    "--num-envs",
    "2",
    "--num-steps",
    "16",
    "--total-timesteps",
    str(ITERS * PER_ITER),
    "--frame-height",
    "60",
    "--frame-width",
    "80",
    "--eval-episodes",
    "1",
    "--image-every",
    "0",
]


def start_ppo(cwd, args, stderr=subprocess.PIPE, own_session=False):
    """The PPO script as a terminal runs it, its output read line by line as it comes. own_session: a process group of
    its own, so a kill or a Ctrl-C sent to the group reaches the game engines too and none is left behind."""
    return subprocess.Popen(
        [sys.executable, str(ROOT / "ppo_camal_vizdoom.py"), *args],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=stderr,
        text=True,
        env=dict(os.environ, PYTHONUNBUFFERED="1"),
        start_new_session=own_session,
    )


def check_resumed_run(run_dir, iters=ITERS, per_iter=PER_ITER):
    """One value per iteration, none twice, and the learning rate on its schedule across the break."""
    acc = read_events(run_dir)
    steps = [ev.step for ev in acc.Scalars("charts/SPS")]
    assert steps == [per_iter * i for i in range(1, iters + 1)], steps
    for ev in acc.Scalars("charts/learning_rate"):
        iteration = ev.step // per_iter
        assert abs(ev.value - 2.5e-4 * (1 - (iteration - 1) / iters)) < 1e-9
    result = json.loads((run_dir / "eval.json").read_text())
    assert result["total_timesteps"] == iters * per_iter


@pytest.mark.slow
def test_resume_after_crash(tmp_path):
    """Killed two iterations after a checkpoint: the resumed run re-logs those iterations once, not twice."""
    proc = start_ppo(
        tmp_path, [*ARGS, "--checkpoint-every", "2", "--vector-env", "sync"], stderr=subprocess.STDOUT, own_session=True
    )
    saved, kill_after = None, None
    for line in proc.stdout:
        if line.startswith("iter "):
            iteration = int(line.split()[1].split("/")[0])
            if saved is None:
                found = list((tmp_path / "runs").glob("*/checkpoint.pt"))
                if found:
                    saved = found[0].read_bytes()  # the checkpoint as it stood then (later ones replace it)
                    ckpt = found[0]
                    kill_after = torch.load(found[0], weights_only=True)["iteration"] + 2
            if kill_after is not None and iteration >= kill_after:
                os.killpg(proc.pid, signal.SIGKILL)  # a crash: no chance to clean up
                break
    proc.wait()
    assert saved is not None and kill_after < ITERS, "the run ended before it could be killed"
    # the newest checkpoint garbled (a copy cut short): the resume must fall back to the previous one, here the saved
    # one
    ckpt.with_name("checkpoint.prev.pt").write_bytes(saved)
    ckpt.write_bytes(ckpt.read_bytes()[:3000])
    state = torch.load(ckpt.with_name("checkpoint.prev.pt"), weights_only=True)
    assert state["global_step"] == state["iteration"] * PER_ITER
    assert {"python", "numpy", "torch", "cuda"} <= set(state["rng"])
    # the crashed run's curves already reach past the checkpoint
    assert max(ev.step for ev in read_events(ckpt.parent).Scalars("charts/SPS")) > state["global_step"]

    resumed = run_script("ppo_camal_vizdoom", ["--resume", str(ckpt.parent)], cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert (
        "checkpoint.pt is truncated or corrupt" in resumed.stderr
        and "up to 2 iterations or epochs of progress will be redone" in resumed.stderr
    )
    assert f"resuming {ckpt.parent.name} at iteration {state['iteration'] + 1}/{ITERS}" in resumed.stdout
    check_resumed_run(ckpt.parent)


@pytest.mark.slow
def test_interrupt_saves_and_resumes(tmp_path):
    """Ctrl-C reaches the learner, its env workers and the game engines; the run still saves and resumes.

    Long rollouts and a one-minibatch update, so the signal lands while the workers are stepping the games.
    """
    iters, per_iter = 6, 2 * 256
    args = [
        "--env",
        "Basic",
        "--num-envs",
        "2",
        "--num-steps",
        "256",
        "--total-timesteps",
        str(iters * per_iter),
        "--update-epochs",
        "1",
        "--num-minibatches",
        "1",
        "--frame-height",
        "60",
        "--frame-width",
        "80",
        "--eval-episodes",
        "1",
        "--image-every",
        "0",
        "--vector-env",
        "async",
    ]
    # no --checkpoint-every: Ctrl-C alone must save the run
    proc = start_ppo(tmp_path, args, stderr=subprocess.STDOUT, own_session=True)
    for line in proc.stdout:
        if line.startswith("iter 1/"):
            time.sleep(0.1)  # into iteration 2's rollout
            os.killpg(proc.pid, signal.SIGINT)  # the whole process group, as a terminal's Ctrl-C
            break
    out = proc.stdout.read()
    assert proc.wait(timeout=120) == 128 + signal.SIGINT, out[-3000:]
    assert "Traceback" not in out and "--resume" in out
    # within a step: the rollout had not changed the model, so the state after iteration 1 is saved at once
    assert (
        "SIGINT: saving a checkpoint and stopping within a step during a rollout" in out
        and "(the last iteration took" in out
    )
    assert "stopped in iteration 2's rollout; saved the state after iteration 1" in out, out[-2000:]
    (run_dir,) = (tmp_path / "runs").iterdir()
    state = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    assert state["iteration"] == 1 and state["global_step"] == per_iter
    assert not (run_dir / "eval.json").exists()

    resumed = run_script("ppo_camal_vizdoom", ["--resume", str(run_dir)], cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    check_resumed_run(run_dir, iters, per_iter)
    assert refused_resume(run_dir) == "this run finished"


def refused_resume(run_dir):
    """--resume run_dir in-process through resume_from(), which the command line runs first: exit 2 and a message
    (test_bad_input.py runs the command line). Returns the first words the message matched, for the assert."""
    ppo = load_script("ppo_camal_vizdoom")
    with pytest.raises(SystemExit) as e, contextlib.redirect_stderr(io.StringIO()) as err:
        ppo.resume_from(ppo.Args(resume=str(run_dir)))
    message = err.getvalue()
    assert e.value.code == 2 and message.startswith(f"error: --resume {run_dir}: ") and "Traceback" not in message, (
        message
    )
    for expected in ("this run finished", "truncated or corrupt", "could run code, so it is refused"):
        if expected in message:
            return expected
    return message


def test_broken_or_unsafe_checkpoint_is_a_clear_error(tmp_path):
    """Nothing whole to resume from: exit 2 with why; a checkpoint that would run code is refused and runs nothing."""
    from conftest import write_code_running_file

    run_dir = tmp_path / "runs" / "Basic__x__camal__1__1"
    run_dir.mkdir(parents=True)
    (run_dir / "checkpoint.pt").write_bytes(b"PK\x03\x04 cut short")
    assert refused_resume(run_dir) == "truncated or corrupt"
    write_code_running_file(run_dir / "checkpoint.pt", tmp_path / "ran", args={})
    assert refused_resume(run_dir) == "could run code, so it is refused"
    assert not (tmp_path / "ran").exists()
    # settings of the wrong types (a hand-edited or foreign checkpoint): named, not a TypeError later
    ppo = load_script("ppo_camal_vizdoom")
    saved = {**dataclasses.asdict(ppo.Args()), "total_timesteps": "lots", "env": "Doom2", "target_kl": 0.5}
    state = {"args": saved, "agent": {}, "optimizer": {}, "iteration": 1, "global_step": 8, "rng": {}}
    torch.save(state, run_dir / "checkpoint.pt")
    message = refused_resume(run_dir)
    assert "the checkpoint's settings are damaged: env='Doom2', total_timesteps='lots'" in message, message


@pytest.mark.parametrize("script", ["ppo_camal_vizdoom", "train_dl_camal"])
def test_repeated_scheduler_signals_are_one_stop_and_a_second_ctrl_c_stops_now(script, capsys):
    """SLURM signals every process of a job (SIGUSR2) and benchmark.py forwards one more (SIGUSR1): still one clean
    stop."""
    module = load_script(script)
    stop = module.StopRequest("stopping at the next safe point", "pass")
    assert not stop and stop.exit_code() == 128 + signal.SIGTERM  # a DDP process that was not signalled itself
    stop.last_pass_seconds = 42.0
    for s in (signal.SIGUSR2, signal.SIGUSR1, signal.SIGTERM):
        stop.handle(s, None)
    assert stop and stop.signum == signal.SIGUSR2 and stop.exit_code() == 128 + signal.SIGUSR2
    with pytest.raises(KeyboardInterrupt):
        stop.handle(signal.SIGINT, None)
    out = capsys.readouterr().out  # one message, for the first signal, with the pace
    assert out.count("SIGUSR2: stopping at the next safe point (the last pass took 42 s)") == 1 and "SIGTERM" not in out


@pytest.mark.slow
def test_first_run_explains_itself(tmp_path):
    """The start-up line (device, run folder, TensorBoard, how to stop), an ETA on every line, a warning when the run
    would take days, and Ctrl-C answered within a step. (A rollout stops too fast for a second Ctrl-C to arrive in
    time; test_ctrl_c_during_the_final_evaluation sends one.)"""
    proc = start_ppo(
        tmp_path,
        [
            "--env",
            "TakeCover",  # the users' first command
            "--num-envs",
            "2",
            "--num-steps",
            "64",
            "--total-timesteps",
            "100000000",
            "--frame-height",
            "60",
            "--frame-width",
            "80",
            "--no-cuda",
        ],
    )
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("iter 1/"):
            os.kill(proc.pid, signal.SIGINT)
            break
    out, err = proc.stdout.read(), proc.stderr.read()
    assert proc.wait(timeout=120) == 128 + signal.SIGINT, err[-3000:]
    assert ": CPU (" in lines[0] and "2 sync envs at 60 x 80, 781250 iterations of 128 steps" in lines[0]
    assert "watch: tensorboard --logdir runs" in lines[1] and "--resume runs/TakeCover__" in lines[1]
    eta = lines[-1].split(" eta=")[1].split(" episodes=")[0]
    assert eta.endswith("h") and "d " in eta  # days and hours
    assert (
        "warning: at " in err
        and "more (the paper's 10M steps" in err
        and "--env Basic --frame-height 60 --frame-width 80" in err
    )
    assert "TakeCover at 60 x 80 in about 40 min: python ppo_camal_vizdoom.py --env TakeCover --frame-height 60" in err
    assert (
        "SIGINT: saving a checkpoint and stopping" in out
        and "continue with: python ppo_camal_vizdoom.py --resume" in out
    )
    assert "Traceback" not in err + out


@pytest.mark.slow
@pytest.mark.parametrize("how", ["ctrl-c", "scheduler", "second ctrl-c"])
def test_a_stop_during_the_final_evaluation(tmp_path, how):
    """Training is over: a first stop saves the trained state and exits cleanly, and --resume completes the evaluation
    with the eval.json an uninterrupted run writes. "scheduler" signals the whole process group, as SLURM does, so the
    game engines die of it too. A second Ctrl-C stops at once, with exit code 130 and no traceback."""
    episodes = 1000 if how == "second ctrl-c" else 20
    signum = signal.SIGUSR1 if how == "scheduler" else signal.SIGINT
    args = ["--env", "Basic", "--num-envs", "2", "--num-steps", "32", "--total-timesteps", "64", "--frame-height", "60"]
    args += [
        "--frame-width",
        "80",
        "--eval-episodes",
        str(episodes),
        "--image-every",
        "0",
        "--no-cuda",
        "--vector-env",
        "sync",
    ]
    (tmp_path / "stopped").mkdir()
    proc = start_ppo(tmp_path / "stopped", args, own_session=True)
    said = []
    for line in proc.stdout:
        said.append(line)
        if line.startswith(f"evaluating the trained policy over {episodes} episodes"):
            time.sleep(0.5)  # into the play
            os.killpg(proc.pid, signum) if how == "scheduler" else os.kill(proc.pid, signum)
        if "the training is done; saving its state and stopping (--resume completes the evaluation)" in line:
            if how == "second ctrl-c":
                os.kill(proc.pid, signal.SIGINT)
            break
    out, err = proc.stdout.read(), proc.stderr.read()
    said = "".join(said) + out
    code = proc.wait(timeout=120)
    (run_dir,) = (tmp_path / "stopped" / "runs").iterdir()
    assert "(the last iteration took" not in said, said  # no iteration's pace
    assert "Traceback" not in said + err, said + err
    assert not (run_dir / "eval.json").exists()
    if how == "second ctrl-c":
        assert code == 128 + signal.SIGINT and "stopped at once, without a checkpoint" in err, said + err[-3000:]
        return
    assert code == 128 + signum and "stopped during the final evaluation; complete it with:" in said, said + err[-3000:]
    assert torch.load(run_dir / "checkpoint.pt", weights_only=True)["iteration"] == 1
    resumed = run_script("ppo_camal_vizdoom", ["--resume", str(run_dir)], cwd=tmp_path / "stopped")
    assert (
        resumed.returncode == 0 and "its training is done (global_step=64); completing its outputs" in resumed.stdout
    ), resumed.stderr
    assert refused_resume(run_dir) == "this run finished"
    (tmp_path / "whole").mkdir()
    whole = run_script("ppo_camal_vizdoom", args, cwd=tmp_path / "whole")
    assert whole.returncode == 0, whole.stderr[-3000:]
    (whole_dir,) = (tmp_path / "whole" / "runs").iterdir()
    results = [json.loads((d / "eval.json").read_text()) for d in (run_dir, whole_dir)]
    for key in ("episodic_returns", "episodic_lengths", "episodic_iou", "by_cam"):
        assert results[0][key] == results[1][key], key


def descendants(pid):
    """{pid: start time} of every process below pid, from /proc."""
    procs = {}
    for d in filter(str.isdigit, os.listdir("/proc")):
        try:
            fields = open(f"/proc/{d}/stat").read().rsplit(")", 1)[1].split()
            procs[int(d)] = (int(fields[1]), fields[19])
        except (OSError, IndexError):
            pass
    found, parents = {}, [pid]
    while parents:
        children = [p for p, (parent, _) in procs.items() if parent == parents[-1]]
        parents = parents[:-1] + children
        found.update({p: procs[p][1] for p in children})
    return found


def alive(pid, start):
    try:
        fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    except OSError:
        return False
    return fields[19] == start and fields[0] != "Z"  # a zombie has ended


@pytest.mark.slow
@pytest.mark.parametrize("vector_env", ["sync", "async"])
def test_a_killed_trainer_leaves_no_game_running(tmp_path, vector_env):
    """The games ignore the stop signals (so a scheduler's signal does not kill them mid-step): when the trainer itself
    is killed with SIGKILL, its watchdog ends the engines and env workers it leaves behind."""
    proc = start_ppo(tmp_path, [*ARGS, "--total-timesteps", "100000", "--vector-env", vector_env], own_session=True)
    for line in proc.stdout:
        if line.startswith("iter 1/"):
            break
    found = {p: (s, proc_read(p)) for p, s in descendants(proc.pid).items()}
    games = {p: s for p, (s, cmd) in found.items() if "sys.stdin.read()" not in cmd}  # all but the watchdog
    assert sum("vizdoom -iwad" in cmd.replace("\0", " ") for _, cmd in found.values()) == 2, found  # the two engines
    assert len(games) == (4 if vector_env == "async" else 2), found  # async: and their two workers
    os.kill(proc.pid, signal.SIGKILL)  # the trainer alone: nothing closes the games
    proc.wait()
    deadline = time.time() + 10
    while time.time() < deadline and any(alive(p, s) for p, s in games.items()):
        time.sleep(0.2)
    assert not [p for p, s in games.items() if alive(p, s)], "game processes outlived their trainer"


@pytest.mark.slow
def test_a_signal_during_start_up_leaves_no_game_running(tmp_path):
    """A scheduler's signal that reaches the process group while the trainer is still starting (its games exist, its
    loop has not begun; on a loaded node start-up takes seconds) stops it cleanly: no traceback, no killed trainer, and
    none of its games left running."""
    proc = start_ppo(tmp_path, [*ARGS, "--total-timesteps", "100000", "--vector-env", "sync"], own_session=True)
    deadline, games = time.time() + 120, {}
    while time.time() < deadline and len(games) < 2:  # the moment both engines exist
        games = {p: s for p, s in descendants(proc.pid).items() if "vizdoom" in proc_read(p)}
    assert len(games) == 2, games
    os.killpg(proc.pid, signal.SIGUSR1)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGUSR1 and "Traceback" not in err, (
        proc.returncode,
        out[-2000:],
        err[-2000:],
    )
    deadline = time.time() + 10
    while time.time() < deadline and any(alive(p, s) for p, s in games.items()):
        time.sleep(0.2)
    assert not [p for p, s in games.items() if alive(p, s)], "game processes outlived their trainer"


def run_record(run_dir):
    """What a PPO run computed: its trained weights, eval.json's results and every curve but the clock's."""
    acc = read_events(run_dir)
    curves = {
        tag: [(ev.step, ev.value) for ev in acc.Scalars(tag)]
        for tag in acc.Tags()["scalars"]
        if tag != "charts/SPS" and not tag.startswith("perf/")
    }
    result = json.loads((run_dir / "eval.json").read_text())
    keys = ("episodic_returns", "episodic_lengths", "episodic_iou", "by_cam", "random_returns", "total_timesteps")
    weights = torch.load(next(run_dir.glob("*.cleanrl_model")), weights_only=True)
    return curves, {k: result[k] for k in keys}, weights


@pytest.mark.slow
def test_a_resumed_run_is_the_same_experiment(tmp_path):
    """A run stopped and resumed ends bit for bit where the same run uninterrupted ends: weights, evaluation and every
    curve. Stopped twice: Ctrl-C in a rollout with sync games, and SIGKILL after a checkpoint (--checkpoint-every) with
    async games (sync and async games make the same run). The games are mid-episode at the checkpoint (32-step
    rollouts, Basic's episodes last up to 75 steps): the resumed run plays them back to where they were."""
    args = [*ARGS, "--num-steps", "32", "--total-timesteps", str(8 * 64), "--eval-episodes", "2", "--save-model"]
    args += ["--checkpoint-every", "2", "--image-every", "3"]
    records = {}
    for name in ("whole", "ctrl-c", "killed"):
        (tmp_path / name).mkdir()
        vector_env = "async" if name == "killed" else "sync"
        if name == "whole":
            done = run_script("ppo_camal_vizdoom", [*args, "--vector-env", vector_env], cwd=tmp_path / name)
            assert done.returncode == 0, done.stderr[-3000:]
        else:
            proc = start_ppo(
                tmp_path / name, [*args, "--vector-env", vector_env], stderr=subprocess.STDOUT, own_session=True
            )
            for line in proc.stdout:
                if line.startswith("iter 3/") and name == "ctrl-c":
                    os.killpg(proc.pid, signal.SIGINT)  # saves the state after iteration 3 (or 4)
                    break
                if line.startswith("iter 5/") and name == "killed":
                    os.killpg(proc.pid, signal.SIGKILL)  # the checkpoint of iteration 4 is the last
                    break
            out = proc.stdout.read()
            proc.wait(timeout=120)
            (run,) = (tmp_path / name / "runs").iterdir()
            assert not (run / "eval.json").exists(), out[-2000:]
            state = torch.load(run / "checkpoint.pt", weights_only=True)
            assert any(g["actions"] for g in state["games"]["games"]), "no game was mid-episode at the checkpoint"
            if name == "ctrl-c":  # a damaged record of the games is refused, not replayed into another run
                broken = tmp_path / "broken" / run.name
                shutil.copytree(run, broken)
                state["games"]["games"][0]["actions"].append(99)
                torch.save(state, broken / "checkpoint.pt")
                refused = run_script("ppo_camal_vizdoom", ["--resume", str(broken)], cwd=tmp_path / "broken")
                assert refused.returncode == 2 and "Traceback" not in refused.stderr, refused.stderr[-2000:]
                assert "its games cannot be put back where they were: they hold actions outside" in refused.stderr
            if name == "killed":

                def resume_copy(folder, checkpoint):
                    """A copy of the run with another checkpoint, resumed: it must finish, saying why its games
                    start new episodes."""
                    copy = tmp_path / folder / run.name
                    shutil.copytree(run, copy)
                    torch.save(checkpoint, copy / "checkpoint.pt")
                    went_on = run_script("ppo_camal_vizdoom", ["--resume", str(copy)], cwd=tmp_path / folder)
                    assert went_on.returncode == 0 and (copy / "eval.json").is_file(), went_on.stderr[-2000:]
                    return went_on.stderr

                # a replay that does not reach the saved frame (as after a cut _vizdoom.ini): new episodes, said loudly
                state["games"]["games"][0]["digest"][0] ^= 1
                stderr = resume_copy("other", state)
                assert (
                    "its games could not be put back where they were (the replayed game shows another frame than the "
                    "saved one): they start new episodes" in stderr
                ), stderr[-2000:]
                # a checkpoint from before the games were recorded
                stderr = resume_copy("older", {k: v for k, v in state.items() if k != "games"})
                assert (
                    "this checkpoint does not hold where its games were (it was saved by an older version): they "
                    "start new episodes" in stderr
                ), stderr[-2000:]
            resumed = run_script("ppo_camal_vizdoom", ["--resume", str(run)], cwd=tmp_path / name)
            assert resumed.returncode == 0, resumed.stderr[-3000:]
            assert "the games are where the checkpoint left them" in resumed.stdout, resumed.stdout[-2000:]
        (run,) = (tmp_path / name / "runs").iterdir()
        records[name] = run_record(run)
    curves, result, weights = records["whole"]
    for name in ("ctrl-c", "killed"):
        curves2, result2, weights2 = records[name]
        assert result == result2, name
        assert curves.keys() == curves2.keys() and "charts/attention_iou" in curves
        for tag in curves:
            assert curves[tag] == curves2[tag], (name, tag)
        assert weights.keys() == weights2.keys() and all(torch.equal(weights[k], weights2[k]) for k in weights)


def test_a_cut_settings_file_in_the_working_directory_changes_no_game(tmp_path, monkeypatch):
    """The engine's settings file, cut short where an engine was killed writing it (movebob=0. stills the weapon):
    once read from the working directory by every later game, it made a resumed run's replay miss its saved frames on
    every retry. Each game now keeps a settings file of its own, so the games draw the same frames, the replay lands,
    and nothing is left behind."""
    import vizdoom as vzd

    ppo = load_script("ppo_camal_vizdoom")
    game = vzd.DoomGame()  # a whole settings file, as the engine writes it
    game.load_config(os.path.join(vzd.scenarios_path, "basic.cfg"))
    game.set_window_visible(False)
    game.set_doom_config_path(str(tmp_path / "whole.ini"))
    game.init()
    game.close()
    whole = (tmp_path / "whole.ini").read_text()
    cut = tmp_path / "cut"
    cut.mkdir()
    (cut / "_vizdoom.ini").write_text(whole[: whole.index("movebob=0.") + len("movebob=0.")])
    clean = tmp_path / "clean"
    clean.mkdir()

    def play(folder):
        monkeypatch.chdir(folder)
        env = ppo.VizDoomEnv("Basic", frame_skip=4, frame_height=60, frame_width=80)
        env.reset(seed=3)
        digests = [env.digest()]
        for a in [0, 1, 2, 0, 2] * 4:
            env.step(a)
            digests.append(env.digest())
        return env, digests

    first, seen = play(clean)
    second, seen_there = play(cut)
    assert seen_there == seen
    replay = ppo.VizDoomEnv("Basic", frame_skip=4, frame_height=60, frame_width=80)
    replay.saved_position = first.position()
    assert not isinstance(replay.put_back(4), str)
    folders = [env.config_dir for env in (first, second, replay)]
    for env in (first, second, replay):
        env.close()
    assert not any(os.path.exists(f) for f in folders) and not (clean / "_vizdoom.ini").exists()
