# Run the paper's grids (Tables 7 and 8, Table 4) on this machine's GPUs or on a SLURM cluster, resumably, then analyse
# them. Each cell of a grid (env x method x seed, or dataset x model x method x fold x seed) runs in its own folder
# under --out/cells; its identity is the cell and the flags passed through, never the time. Rerunning the same command
# skips finished cells, resumes interrupted ones from their checkpoint and retries failed ones. Single-file in CleanRL's
# style (cleanrl_utils/benchmark.py is the anchor).
#
#   python benchmark.py --preset drl --dry-run                  # the 40 commands of Table 8's grid, one per line
#   python benchmark.py --preset drl --seeds 1 2 --workers 4    # narrow an axis; run 4 at a time on this machine
#   python benchmark.py --preset dl --datasets pets --data-dir DATA --backend slurm --slurm-partition gpu
#   python benchmark.py --preset drl --envs Basic --frame-height 60 --frame-width 80   # unknown flags go to the script
import argparse
import ast
import difflib
import fcntl
import hashlib
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent
ENVS = ("Basic", "DefendLine", "DefendCenter", "TakeCover")
CAM_KINDS = ("abs", "paper", "abs-target")  # --cam's choices; every evaluation measures IoU under each
MODELS = ("resnet18", "convnext_tiny", "efficientnet_b0", "vit_b_16", "swin_v2_t", "maxvit_t")
# The paper's grids. Every axis can be narrowed or widened from the command line.
PRESETS = {
    # The paper's CAM of V(s) (--cam paper); --cams adds the project's remedies (abs, abs-target) as more CAMAL cells.
    "drl": {"kind": "drl", "envs": ENVS, "methods": ("camal", "vanilla"), "cams": ("paper",), "seeds": (1, 2, 3, 4, 5)},
    "dl": {
        "kind": "dl",
        "datasets": ("pets", "flowers", "busi"),
        "models": MODELS,
        "methods": ("camal", "vanilla", "prior"),
        "folds": tuple(range(10)),
        "seeds": (1,),
    },
    "dl-suppress": {
        "kind": "dl",
        "datasets": ("pets", "flowers", "busi"),
        "models": MODELS,
        "methods": ("camal", "suppress"),
        "folds": tuple(range(10)),
        "seeds": (1,),
    },
    "study": {"kind": "study", "datasets": ("pets", "flowers")},
}
INTERRUPTED = {
    128 + s for s in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)
}  # exit codes after a checkpoint


class Cell:
    """One run of the grid: its axes, the command that starts it and the folder it runs in."""

    def __init__(self, kind, axes, passthrough, out, checkpoint_every):
        self.kind, self.axes, self.passthrough = kind, axes, list(passthrough)
        name = "__".join(str(v) for v in axes.values())
        if passthrough:  # the same cell with other flags is another experiment
            name += "__" + hashlib.sha1(shlex.join(passthrough).encode()).hexdigest()[:8]
        self.id = f"{kind}__{name}"
        self.folder = Path(out) / "cells" / self.id
        flags = [f"--{k.replace('_', '-')}={v}" for k, v in axes.items()]
        if kind == "study":
            self.script = "regularizer_study.py"
            self.args = [*flags, "--out", "study", *passthrough]
        else:
            self.script = "ppo_camal_vizdoom.py" if kind == "drl" else "train_dl_camal.py"
            own = any(a.split("=")[0] == "--checkpoint-every" for a in passthrough)
            self.args = [*flags, *passthrough] + ([] if own else ["--checkpoint-every", str(checkpoint_every)])

    def runs(self):
        return sorted((self.folder / "runs").glob("*/")) if (self.folder / "runs").is_dir() else []

    def finished(self):
        if self.kind == "study":
            return (self.folder / "study" / "study.json").is_file()
        result = "eval.json" if self.kind == "drl" else "metrics.json"
        return any((r / result).is_file() for r in self.runs())

    def resumable(self):
        """The run folder to --resume (its checkpoint is there, its result is not), or None."""
        if self.kind == "study" or self.finished():
            return None
        found = [r for r in self.runs() if (r / "checkpoint.pt").is_file() or (r / "checkpoint.prev.pt").is_file()]
        return found[-1] if found else None

    def command(self):
        run = self.resumable()
        args = ["--resume", str(run.relative_to(self.folder))] if run is not None else self.args
        return [sys.executable, str(ROOT / self.script), *args]


PATH_FLAGS = (
    "--data-dir",
    "--weights",
    "--prior-weights",
    "--prior-cache",
)  # paths, whether they exist yet or not (--download makes DATA)


def absolute_paths(passthrough):
    """Paths given relative to where the benchmark starts (--data-dir DATA, --weights w.pth) made absolute, since each
    cell runs in its own folder: existing paths, and every value of PATH_FLAGS (--data-dir DATA --download makes
    DATA)."""
    out, previous = [], ""
    for token in passthrough:
        flag, eq, value = token.partition("=") if token.startswith("--") else ("", "", token)
        path_flag = (flag if eq else previous) in PATH_FLAGS and value != "random"
        if value and not value.startswith("-") and (os.path.exists(value) or path_flag):
            value = os.path.abspath(value)
        out.append(f"{flag}{eq}{value}" if flag else value)
        previous = token if token.startswith("--") and not eq else ""
    return out


def grid(args, passthrough):
    preset = PRESETS[args.preset]
    passthrough = absolute_paths(passthrough)
    kind = preset["kind"]
    pick = lambda axis: list(dict.fromkeys(getattr(args, axis) or preset[axis]))  # noqa: E731  (--methods a a: once)
    if kind == "dl" and not args.folds:
        args.folds = list(range(args.num_folds))
    cells = []
    if kind == "drl":
        cams = list(dict.fromkeys(pick("cams")))
        for env in pick("envs"):
            for method in pick("methods"):
                # vanilla trains without a CAM: one cell (with the first of --cams, for its training curves), whose
                # evaluation measures the IoU under every --cam (eval.json's by_cam)
                for cam in cams if method == "camal" else cams[:1]:
                    for seed in pick("seeds"):
                        axes = {"env": env, "method": method, "cam": cam, "seed": seed}
                        cells.append(Cell(kind, axes, passthrough, args.out, args.checkpoint_every))
    elif kind == "dl":
        for dataset in pick("datasets"):
            for model in pick("models"):
                for method in pick("methods"):
                    for fold in pick("folds"):
                        for seed in pick("seeds"):
                            axes = {"dataset": dataset, "model": model, "method": method, "fold": fold, "seed": seed}
                            extra = [f"--folds={args.num_folds}", *passthrough]
                            if method == "prior" and not any(a.split("=")[0] == "--prior-cache" for a in passthrough):
                                extra.append(
                                    f"--prior-cache={Path(args.out).resolve() / 'prior_cache'}"
                                )  # CLIP's CAMs once per grid
                            cells.append(Cell(kind, axes, extra, args.out, 1))
    else:
        for dataset in pick("datasets"):
            cells.append(Cell(kind, {"dataset": dataset}, passthrough, args.out, 0))
    return cells


# ---------------------------------------------------------------------------------------------
# Running one cell: a lock, the command in the cell's folder, its log; retried, resumed
# ---------------------------------------------------------------------------------------------
# Starts a cell's command (argv[2:]) with SIGTERM asked for when the benchmark (pid argv[1]) dies, however it dies: the
# trainer then saves a checkpoint and stops, as for a scheduler's signal. Linux's PR_SET_PDEATHSIG (1), kept through
# exec; elsewhere the command starts without it.
LAUNCH = """import ctypes, os, signal, sys
try:
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)
except (OSError, AttributeError):
    pass
if os.getppid() != int(sys.argv[1]):
    sys.exit(128 + signal.SIGTERM)  # the benchmark died before the request was made
os.execv(sys.argv[2], sys.argv[2:])
"""


def run_cell(cell, retries, env=None, on_start=None):
    """Run a cell to the end unless another invocation holds it. Returns (status, exit code): status is done, failed,
    interrupted (it saved a checkpoint; a rerun resumes it) or busy (locked by another invocation)."""
    cell.folder.mkdir(parents=True, exist_ok=True)
    with open(cell.folder / "lock", "w") as lock:
        try:  # released by the kernel when this process ends, however it ends
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return "busy", None
        if cell.finished():
            return "done", 0
        if on_start:
            on_start()
        code = None
        for attempt in range(retries + 1):
            cmd = cell.command()
            with open(cell.folder / "log.txt", "a") as log:
                placed = " ".join(
                    f"{k}={env[k]}" for k in ("CUDA_VISIBLE_DEVICES", "OMP_NUM_THREADS") if env and k in env
                )
                log.write(
                    f"\n$ {placed + ' ' if placed else ''}{shlex.join(cmd)}  (attempt {attempt + 1} of {retries + 1}, "
                    f"{time.strftime('%Y-%m-%d %H:%M:%S')})\n"
                )
                log.flush()
                # through LAUNCH: the trainer is told to stop if this process dies (SIGKILL included), and it holds
                # the cell's lock while it lives, so a rerun cannot start a second trainer on the same run folder
                launch = [sys.executable, "-c", LAUNCH, str(os.getpid()), *cmd]
                proc = subprocess.Popen(
                    launch,
                    cwd=cell.folder,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=env,
                    start_new_session=True,
                    pass_fds=(lock.fileno(),),
                )
                CHILDREN.add(proc)
                try:
                    code = proc.wait()
                finally:
                    CHILDREN.discard(proc)
            if code == 0 and cell.finished():
                return "done", 0
            if code in INTERRUPTED or STOPPING["set"]:
                return "interrupted", code
            if code == 2:  # the script refused its input: the same command would be refused again
                return "failed", code
        return "failed", code


# Running training processes, told to checkpoint and stop when this process is. Plain objects, no locks: submitit
# pickles what a SLURM task runs, with these globals.
CHILDREN = set()
STOPPING = {"set": False}


def forward_signal(signum, frame):
    """Ctrl-C, SIGTERM, SIGUSR1 or SIGUSR2: every running cell saves its checkpoint and stops; a rerun resumes them."""
    STOPPING["set"] = True
    print(
        f"\n{signal.Signals(signum).name}: the running cells save a checkpoint and stop; rerun the same command to "
        "resume",
        file=sys.stderr,
        flush=True,
    )
    stop_children(signal.SIGUSR1 if signum in (signal.SIGUSR1, signal.SIGUSR2) else signal.SIGTERM)


def stop_children(signum):
    for proc in list(CHILDREN):
        try:
            proc.send_signal(signum)
        except ProcessLookupError:
            pass


class CellJob:
    """What a SLURM array task runs (submitit pickles it): one cell. Before SLURM pre-empts or times the task out it
    sends SIGUSR2 (submitit's --signal): submitit calls checkpoint(), the training process gets SIGUSR1, saves its
    checkpoint and exits, and the task is requeued; the requeued task resumes the cell from that checkpoint. SLURM may
    signal the training process itself too: the scripts take any number of these signals as one stop."""

    def __init__(self, retries):
        self.retries = retries

    def __call__(self, cell):
        signal.signal(signal.SIGUSR1, forward_signal)
        # scontrol requeue, scancel, a node taken down: SLURM sends SIGTERM to every process of the task; the cell then
        # saves its checkpoint, and must not be retried here (submitit's own handler only logs it)
        signal.signal(signal.SIGTERM, forward_signal)
        # torch's threads match the CPUs SLURM gave the task: more would oversubscribe them (a 20-fold slowdown
        # measured)
        threads = os.environ.get("SLURM_CPUS_PER_TASK")
        return run_cell(cell, self.retries, env=dict(os.environ, OMP_NUM_THREADS=threads) if threads else None)

    def checkpoint(self, cell):
        import submitit

        print(
            "SLURM's time limit or a pre-emption is near: the cell saves a checkpoint; submitit requeues this task, "
            "which resumes it",
            file=sys.stderr,
            flush=True,
        )
        stop_children(signal.SIGUSR1)
        for proc in list(CHILDREN):
            # not proc.wait(): this runs in a signal handler that interrupted run_cell's proc.wait(), which holds its
            # lock
            try:
                os.waitpid(proc.pid, 0)
            except ChildProcessError:
                pass
            CHILDREN.discard(proc)  # submitit pickles this task again for the requeue, with these globals
        STOPPING["set"] = False
        return submitit.helpers.DelayedSubmission(CellJob(self.retries), cell)


# ---------------------------------------------------------------------------------------------
# Progress, summary and analysis
# ---------------------------------------------------------------------------------------------
class Progress:
    """done / running / failed / left and an ETA from the cells finished in this invocation, on one line."""

    def __init__(self, total, parallel):
        self.total, self.parallel, self.lock = total, max(1, parallel), threading.Lock()
        self.done = self.running = self.failed = self.busy = self.interrupted = 0
        self.durations, self.start = [], time.time()

    def update(self, **delta):
        with self.lock:
            for k, v in delta.items():
                setattr(self, k, getattr(self, k) + v)
            left = self.total - self.done - self.failed - self.running - self.busy - self.interrupted
            eta = ""
            if self.durations and left + self.running:
                seconds = sum(self.durations) / len(self.durations) * (left + self.running) / self.parallel
                eta = f", ETA {seconds / 3600:.1f} h" if seconds > 3600 else f", ETA {seconds / 60:.0f} min"
            busy = (f", {self.busy} run by another invocation" if self.busy else "") + (
                f", {self.interrupted} interrupted (a rerun resumes them)" if self.interrupted else ""
            )
            end = "\r" if sys.stderr.isatty() else "\n"
            print(
                f"[benchmark] done {self.done} / running {self.running} / failed {self.failed} / left {left}{busy}"
                f" ({time.time() - self.start:.0f} s{eta})",
                end=end,
                file=sys.stderr,
                flush=True,
            )


def log_tail(cell, lines=5):
    path = cell.folder / "log.txt"
    return path.read_text(errors="replace").strip().splitlines()[-lines:] if path.is_file() else []


def summary(results):
    failed = [(c, code) for c, (status, code) in results.items() if status == "failed"]
    interrupted = [c for c, (status, _) in results.items() if status == "interrupted"]
    counts = {s: sum(1 for st, _ in results.values() if st == s) for s in ("done", "failed", "interrupted", "busy")}
    print(
        f"\n[benchmark] {counts['done']} done, {counts['failed']} failed, {counts['interrupted']} interrupted (a rerun "
        f"resumes them), {counts['busy']} run by another invocation",
        file=sys.stderr,
    )
    if failed:
        print("\n| failed cell | exit code | last lines of its log |\n|---|---|---|", file=sys.stderr)
        for c, code in failed:
            tail = " / ".join(line.strip() for line in log_tail(c)).replace("|", "\\|")
            print(f"| {c.id} | {code} | {tail} |", file=sys.stderr)
        print(f"\nlogs: {Path(failed[0][0].folder).parent}/<cell>/log.txt", file=sys.stderr)
    return failed, interrupted


def analyse(cells, out):
    """eval_faithfulness.py over the finished DL runs, then stats.py over every cell, into out/analysis."""
    analysis = Path(out) / "analysis"
    analysis.mkdir(parents=True, exist_ok=True)
    dl_runs = [
        str(r) for c in cells if c.kind == "dl" and c.finished() for r in c.runs() if (r / "metrics.json").is_file()
    ]
    steps = []
    if dl_runs:
        steps.append(
            (
                "eval_faithfulness.py",
                [*dl_runs, "--plot", str(analysis / "faithfulness_curves.png"), "--figures", str(analysis / "figures")],
                analysis / "faithfulness.md",
            )
        )
    if any(c.kind != "study" and c.finished() for c in cells):
        steps.append(("stats.py", [str(Path(out) / "cells"), "--out", str(analysis)], analysis / "stats.md"))
    for script, script_args, report in steps:
        with open(report, "w") as f:
            code = subprocess.run(
                [sys.executable, str(ROOT / script), *script_args], stdout=f, stderr=subprocess.STDOUT
            ).returncode
        print(
            f"[benchmark] {script}: {'written to' if code == 0 else f'exit code {code}, see'} {report}", file=sys.stderr
        )


# ---------------------------------------------------------------------------------------------
# Backends
# ---------------------------------------------------------------------------------------------
def gpu_count():
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30)
        return sum(1 for line in out.stdout.splitlines() if line.startswith("GPU ")) if out.returncode == 0 else 0
    except (OSError, subprocess.TimeoutExpired):
        return 0


def run_local(cells, args):
    gpus = gpu_count()
    slots = [g for g in range(gpus) for _ in range(args.runs_per_gpu)]
    workers = args.workers or max(1, len(slots))
    threads = max(1, (os.cpu_count() or 1) // workers)  # CPU threads shared out among the concurrent runs
    free = list(slots)
    free_lock = threading.Lock()
    progress = Progress(len(cells), workers)
    print(
        f"[benchmark] {len(cells)} cells, {workers} at a time on this machine ({gpus} GPUs, {args.runs_per_gpu} run "
        f"per GPU; {threads} CPU threads each), in {Path(args.out).resolve()}",
        file=sys.stderr,
        flush=True,
    )

    def work(cell):
        if STOPPING["set"]:
            return cell, ("interrupted", None)
        with free_lock:
            slot = free.pop(0) if free else None
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")
        if slot is not None:
            env["CUDA_VISIBLE_DEVICES"] = str(slot)
        started, ran = time.time(), []
        try:
            status, code = run_cell(
                cell, args.retries, env, on_start=lambda: (ran.append(1), progress.update(running=1))
            )
        finally:
            if slot is not None:
                with free_lock:
                    free.append(slot)
        if not ran:  # finished before this invocation, or another invocation holds it
            progress.update(
                done=int(status == "done"), busy=int(status == "busy"), interrupted=int(status == "interrupted")
            )
        elif status == "done":
            progress.durations.append(time.time() - started)
            progress.update(running=-1, done=1)
        else:
            progress.update(running=-1, failed=int(status == "failed"), interrupted=int(status == "interrupted"))
        return cell, (status, code)

    for s in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(s, forward_signal)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return dict(pool.map(work, cells))


def slurm_executor(args):
    try:
        import submitit
    except ImportError:
        raise SystemExit("error: --backend slurm needs submitit: pip install submitit") from None
    folder = str(Path(args.out) / "slurm" / "%j")
    # tests: the same pickled array tasks, time limit, signal and requeue, on this machine
    if args.slurm_cluster == "local":
        executor = submitit.LocalExecutor(folder=folder, max_num_timeout=args.slurm_max_requeues)
        executor.update_parameters(timeout_min=args.slurm_time, signal_delay_s=args.slurm_signal_delay_s)
        return executor
    executor = submitit.AutoExecutor(
        folder=folder, cluster=args.slurm_cluster, slurm_max_num_timeout=args.slurm_max_requeues
    )
    extra = dict(kv.split("=", 1) for kv in args.slurm_extra)
    executor.update_parameters(
        timeout_min=args.slurm_time,
        gpus_per_node=args.slurm_gpus_per_task,
        cpus_per_task=args.slurm_cpus_per_task,
        slurm_partition=args.slurm_partition,
        slurm_array_parallelism=args.slurm_array_parallelism,
        slurm_signal_delay_s=args.slurm_signal_delay_s,
        slurm_additional_parameters=extra,
        name="camal-benchmark",
    )
    return executor


def run_slurm(cells, args):
    executor = slurm_executor(args)
    todo = [c for c in cells if not c.finished()]
    results = {c: ("done", 0) for c in cells if c not in todo}
    jobs = executor.map_array(CellJob(args.retries), todo) if todo else []
    print(
        f"[benchmark] {len(todo)} cells submitted as a SLURM array ({len(results)} finished before); job "
        f"{jobs[0].job_id.split('_')[0] if jobs else '-'}; logs in {Path(args.out) / 'slurm'}",
        file=sys.stderr,
        flush=True,
    )
    progress = Progress(len(cells), args.slurm_array_parallelism)
    progress.update(done=len(results))
    pending = dict(zip(todo, jobs))
    wait = wait_local if args.slurm_cluster == "local" else wait_slurm
    for cell, status in wait(pending, executor, args, progress):
        results[cell] = status
        progress.update(**{status[0]: 1})  # done, failed, interrupted or busy
    return results


def wait_local(pending, executor, args, progress):
    """submitit's local executor (the tests without a SLURM controller): a task is over when submitit says so."""
    while pending:
        time.sleep(args.poll)
        for cell, job in list(pending.items()):
            if job.done():
                try:
                    yield cell, job.result()
                except Exception as e:  # the task itself failed: its log says why
                    yield (
                        cell,
                        task_failed(cell, str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__),
                    )
                del pending[cell]


# SLURM's states of a task that is over (squeue lists them for MinJobAge after the end); any other state is still
# running
OVER = {
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "NODE_FAIL",
    "PREEMPTED",
    "OUT_OF_MEMORY",
    "BOOT_FAIL",
    "DEADLINE",
}


def slurm_states(jobs):
    """{task id: state} of these tasks as squeue knows them, finished ones included; None when squeue does not answer.
    squeue is the source of states: without an accounting database sacct (which submitit asks) has none."""
    ids = sorted({j.job_id.split("_")[0] for j in jobs})
    try:
        out = subprocess.run(
            ["squeue", "-h", "-r", "-t", "all", "-j", ",".join(ids), "-o", "%i %T"],
            capture_output=True,
            text=True,
            timeout=60,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    # the controller is busy or away: ask again at the next poll
    if out.returncode and "Invalid job id" not in out.stderr:
        return None
    return dict(line.split()[:2] for line in out.stdout.splitlines() if len(line.split()) >= 2)


def wait_slurm(pending, executor, args, progress):
    """Yield (cell, status) as tasks end. A task is over when squeue says so for a whole poll (a requeued task, from
    scontrol requeue, a time limit or a node failure, goes back to PENDING and is waited for). The cell's own files say
    whether it finished; a task that ended without finishing it for SLURM's reasons (a node failure, a pre-emption
    that was not requeued) is submitted again, up to --retries times; one cancelled (scancel) is interrupted."""
    tries = {cell: 0 for cell in pending}
    seen_over = {}
    while pending:
        time.sleep(args.poll)
        states = slurm_states(pending.values())
        if states is None:
            continue
        running = sum(states.get(job.job_id) == "RUNNING" for job in pending.values())
        if running != progress.running:
            progress.update(running=running - progress.running)
        for cell, job in list(pending.items()):
            state = states.get(job.job_id, "GONE")  # forgotten after MinJobAge: over
            if state not in OVER and state != "GONE":
                seen_over.pop(job.job_id, None)
                continue
            if time.time() - seen_over.setdefault(job.job_id, time.time()) < args.poll:
                continue  # over for less than a poll: a requeue may still put it back in the queue
            del pending[cell]
            outcome = read_outcome(job)
            if cell.finished():
                yield cell, ("done", 0)
            # the training failed, with its retries: log.txt says why
            elif outcome is not None and outcome[0] == "failed":
                yield cell, outcome
            elif state == "CANCELLED" or STOPPING["set"]:
                yield cell, ("interrupted", None)
            elif tries[cell] < args.retries:
                tries[cell] += 1
                retry = executor.submit(CellJob(args.retries), cell)
                cell.folder.mkdir(parents=True, exist_ok=True)  # a task that never started made no folder
                with open(cell.folder / "log.txt", "a") as log:
                    log.write(
                        f"\nSLURM task {job.job_id} ended {state} without finishing the cell: submitted again as job "
                        f"{retry.job_id}\n"
                    )
                print(
                    f"[benchmark] {cell.id}: task {job.job_id} ended {state}; submitted again as {retry.job_id}",
                    file=sys.stderr,
                    flush=True,
                )
                pending[cell] = retry
            else:
                yield (
                    cell,
                    task_failed(
                        cell,
                        f"SLURM task {job.job_id} ended {state} without finishing the cell, after {args.retries} "
                        "resubmissions",
                    ),
                )


def read_outcome(job):
    """What the task's CellJob returned, from submitit's result file; None where the task left none (killed)."""
    if not job.paths.result_pickle.exists():
        return None
    try:
        return job.result()
    except Exception:  # the task raised: nothing it returned
        return None


def task_failed(cell, why):
    cell.folder.mkdir(parents=True, exist_ok=True)
    with open(cell.folder / "log.txt", "a") as log:
        log.write(f"\nSLURM task failed: {why}\n")
    return "failed", None


# copied unchanged from ppo_camal_vizdoom.py (tests/test_shared_helpers.py keeps the copies identical)
def unwritable(path):
    """Why the folder `path` could not be made or written in (a file in the way, no permission), or None. Checked before
    any work, so an output never fails once the work is done; nothing is created."""
    here = os.path.abspath(path)
    while not os.path.exists(here):
        here = os.path.dirname(here)
    if not os.path.isdir(here):
        return f"{here} is a file"
    return None if os.access(here, os.W_OK) else f"{here} is not writable"


def passed_value(passthrough, flag):
    """The value the training script's flags give `flag` (--flag V or --flag=V), or None."""
    for i, token in enumerate(passthrough):
        if token == flag and i + 1 < len(passthrough):
            return passthrough[i + 1]
        if token.startswith(flag + "="):
            return token.split("=", 1)[1]
    return None


def downloads(args, passthrough):
    """With --download: download.py's commands that fetch the grid's datasets (and the ImageNet weights its cells start
    from) once, here, before any cell starts, since a cluster's nodes may have no network; the cells then find them in
    place and only verify them."""
    preset = PRESETS[args.preset]
    if preset["kind"] == "drl" or "--download" not in passthrough:
        return []
    datasets = [d for d in (args.datasets or preset["datasets"]) if d != "shapes"]
    data_dir, mirror = passed_value(passthrough, "--data-dir"), passed_value(passthrough, "--download-mirror")
    cmd = [sys.executable, str(ROOT / "download.py"), *(["--mirror", mirror] if mirror else [])]
    calls = [[*cmd, "--dataset", d, "--data-dir", data_dir] for d in datasets if data_dir]
    weights = "--no-pretrained" not in passthrough and passed_value(passthrough, "--weights") is None
    if preset["kind"] == "dl" and datasets and weights:
        calls.append([*cmd, "--weights", *(args.models or preset["models"])])
    return calls


def parse(argv):
    p = argparse.ArgumentParser(
        description="Run a grid of the paper's experiments, resumably; any flag not listed here goes to the training "
        "script unchanged.",
        allow_abbrev=False,
    )
    p.add_argument(
        "--preset",
        required=True,
        choices=sorted(PRESETS),
        help="drl (Table 8), dl (Table 7), dl-suppress, study (Table 4)",
    )
    p.add_argument("--envs", nargs="+", choices=ENVS, help="DRL environments (all four by default)")
    p.add_argument("--methods", nargs="+", choices=["camal", "vanilla", "prior", "suppress"])
    p.add_argument(
        "--cams",
        nargs="+",
        choices=CAM_KINDS,
        help="DRL: the CAMAL cells' --cam (default: paper, the paper's Eq. 3); vanilla runs once, with the first, and "
        "its evaluation measures the IoU under each",
    )
    p.add_argument("--seeds", nargs="+", type=int)
    p.add_argument("--models", nargs="+", choices=MODELS)
    p.add_argument("--datasets", nargs="+", choices=["pets", "flowers", "busi", "shapes"])
    p.add_argument("--folds", nargs="+", type=int, help="which folds to run (all of --num-folds by default)")
    p.add_argument(
        "--num-folds",
        type=int,
        default=10,
        help="DL: k of the k-fold split (train_dl_camal.py's --folds; the paper: 10)",
    )
    p.add_argument(
        "--out", default="benchmark_runs", help="the grid's folder: cells/<cell>/ (runs, log.txt), analysis/, slurm/"
    )
    p.add_argument("--backend", default="local", choices=["local", "slurm"])
    p.add_argument(
        "--workers", type=int, default=0, help="local: cells at a time (default: one per GPU slot, 1 without GPUs)"
    )
    p.add_argument("--runs-per-gpu", type=int, default=1, help="local: cells sharing one GPU (CUDA_VISIBLE_DEVICES)")
    p.add_argument(
        "--retries", type=int, default=1, help="reruns of a failed cell (from its checkpoint when it has one)"
    )
    p.add_argument(
        "--checkpoint-every",
        type=int,
        default=10,
        help="DRL cells checkpoint every this many iterations (DL: every epoch)",
    )
    p.add_argument(
        "--dry-run", action="store_true", help="print each cell's command and where it would run; run nothing"
    )
    p.add_argument("--no-analysis", action="store_true", help="skip eval_faithfulness.py and stats.py at the end")
    p.add_argument("--slurm-partition", default=None)
    p.add_argument("--slurm-gpus-per-task", type=int, default=1)
    p.add_argument("--slurm-cpus-per-task", type=int, default=8)
    p.add_argument(
        "--slurm-time",
        type=int,
        default=24 * 60,
        help="minutes per task; a task that runs out checkpoints and is requeued",
    )
    p.add_argument(
        "--slurm-signal-delay-s",
        type=int,
        default=90,
        help="seconds before the time limit at which SLURM signals a task (SIGUSR2) to checkpoint and be requeued",
    )
    p.add_argument("--slurm-array-parallelism", type=int, default=64)
    p.add_argument(
        "--slurm-max-requeues",
        type=int,
        default=20,
        help="how many times a task may reach its time limit and be requeued (submitit's max_num_timeout; its default "
        "of 3 would fail a long cell); a pre-emption does not count",
    )
    p.add_argument(
        "--slurm-extra",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="more sbatch options, e.g. account=proj qos=high",
    )
    p.add_argument(
        "--slurm-cluster", default=None, choices=["slurm", "local", "debug"], help=argparse.SUPPRESS
    )  # tests: submitit locally
    p.add_argument("--poll", type=float, default=10.0, help=argparse.SUPPRESS)
    args, passthrough = p.parse_known_args(argv)
    problems = []
    kind = PRESETS[args.preset]["kind"]
    applies = {
        "drl": ("envs", "methods", "cams", "seeds"),
        "dl": ("datasets", "models", "methods", "folds", "seeds"),
        "study": ("datasets",),
    }[kind]
    for axis in ("envs", "methods", "cams", "seeds", "models", "datasets", "folds"):
        if getattr(args, axis) and axis not in applies:
            problems.append(f"--{axis} does not apply to --preset {args.preset}")
    if any(not 0 <= f < args.num_folds for f in args.folds or []):
        problems.append(f"--folds must lie in 0..{args.num_folds - 1} (--num-folds {args.num_folds})")
    if args.num_folds < 2:
        problems.append("--num-folds must be at least 2")
    for name in ("retries", "workers", "slurm_max_requeues"):
        if getattr(args, name) < 0:
            problems.append(f"--{name.replace('_', '-')} must not be negative")
    if args.runs_per_gpu < 1:
        problems.append("--runs-per-gpu must be at least 1")
    if not 0 < args.slurm_signal_delay_s < 60 * args.slurm_time:
        problems.append(f"--slurm-signal-delay-s must lie between 0 and --slurm-time ({60 * args.slurm_time} s)")
    if any("=" not in kv for kv in args.slurm_extra):
        problems.append("--slurm-extra takes KEY=VALUE pairs")
    own = ("--resume", "--fold", "--env", "--seed", "--method", "--cam", "--model", "--dataset")
    # --seed 7, --seed=7, and an abbreviation such as --se 7 alike
    taken = [
        a
        for a in passthrough
        if a.startswith("--") and any(o.startswith(a.split("=")[0]) for o in own) and len(a.split("=")[0]) > 2
    ]
    if taken:
        problems.append(
            f"these flags are the grid's own or the benchmark's: {taken}; use --envs, --methods, --cams, --seeds, "
            "--models, --datasets, --folds"
        )
    script = {"drl": "ppo_camal_vizdoom.py", "dl": "train_dl_camal.py", "study": "regularizer_study.py"}[kind]
    known = trainer_flags(script)
    for flag in dict.fromkeys(a.split("=")[0] for a in passthrough if a.startswith("--")):
        if flag.replace("_", "-") not in known:  # each cell would fail on it, after its start-up
            near = difflib.get_close_matches(flag.replace("_", "-"), sorted(known), n=1)
            problems.append(f"{script} has no {flag}" + (f" (did you mean {near[0]}?)" if near else ""))
    if unwritable(args.out):  # checked now, before any cell runs
        problems.append(f"--out {args.out}: {unwritable(args.out)}")
    if problems:
        p.exit(2, "error: " + "; ".join(problems) + "\n")
    return args, passthrough


def trainer_flags(script):
    """The flags a script's Args takes (--name, and --no-name for a bool), read from its source: no import, no torch."""
    tree = ast.parse((ROOT / script).read_text())
    (args,) = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Args"]
    flags = {"--help", "-h"}
    for field in args.body:
        if isinstance(field, ast.AnnAssign) and isinstance(field.target, ast.Name):
            name = "--" + field.target.id.replace("_", "-")
            is_bool = isinstance(field.annotation, ast.Name) and field.annotation.id == "bool"
            flags.update([name, "--no-" + name[2:]] if is_bool else [name])
    return flags


def main(argv=None):
    args, passthrough = parse(sys.argv[1:] if argv is None else argv)
    cells = grid(args, passthrough)
    fetch = downloads(args, passthrough)
    if args.dry_run:
        for call in fetch:
            print(f"{shlex.join(call)}  # fetched once, before any cell starts")
        for i, cell in enumerate(cells):
            where = (
                "finished"
                if cell.finished()
                else f"SLURM array task {i}"
                if args.backend == "slurm"
                else "this machine"
            ) + (", resumes" if cell.resumable() else "")
            print(f"cd {shlex.quote(str(cell.folder))} && {shlex.join(cell.command())}  # {cell.id}: {where}")
        return 0
    for call in fetch:
        print(f"[benchmark] {shlex.join(call[1:])}", file=sys.stderr, flush=True)
        code = subprocess.run(call).returncode
        if code:
            print(f"[benchmark] error: download.py exited with {code}; no cell was started", file=sys.stderr)
            return 2
    results = run_slurm(cells, args) if args.backend == "slurm" else run_local(cells, args)
    failed, interrupted = summary(results)
    if not args.no_analysis and not STOPPING["set"]:
        analyse(cells, args.out)
    return 1 if failed else (128 + signal.SIGINT if interrupted and STOPPING["set"] else 0)


if __name__ == "__main__":
    sys.exit(main())
