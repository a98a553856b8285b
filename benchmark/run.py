"""Run a grid of trainings: scripts x dataset ids x seeds x argument variants, locally or on a Ray cluster.

    python benchmark/run.py --scripts iql.py --dataset-ids local/hopper/medium-replay-v0 --seeds 1 2 3 \
        --args="--total-steps 100000" --variants ": " "bc: --temperature 0" --workers 2 --out benchmark/sweeps/hopper

Each run is one subprocess of the script, with OMP_NUM_THREADS set to its share of the CPU cores. Its TensorBoard
folder ends up in {out}/runs/ (read it with `python benchmark/report.py --logdir {out}/runs`), its console output in
{out}/logs/. A run that exits with 0 leaves {out}/done/{key}.json; a second call with the same grid skips those runs,
so an interrupted sweep resumes where it stopped.

A run that was cut off (it exited with 143 or 130 after SIGTERM or SIGINT, having saved its checkpoint) keeps its
folder, checkpoint included, under {out}/cut/, and the next call with the same grid continues it from that checkpoint:
`python SCRIPT --resume {out}/cut/{run folder}`, which takes every argument from the checkpoint and writes into that
folder; once it finishes, the folder moves to {out}/runs/ (TensorBoard reads the folder's several event files as one
curve). Its log ends with the command that continues it: this sweep's own, run again (the resume command the script
itself printed names the temporary folder it ran in). (A run that gets the signal as it exits, its training done, can
come back as cut; resumed, it ends at once.)
A call refuses to resume a cut run whose arguments differ from what the grid now gives it. A run that fails
(any other exit code) leaves its folder under {out}/failed/ and the next call starts it over; move such a folder
back into {out}/cut/ to resume it from its last periodic checkpoint (--save-every) instead.

--time-limit SECONDS bounds one call (a batch job's time limit, say): no run starts in its last --stop-grace seconds,
and at that point every running run gets SIGTERM, so that it finishes its step (which may hold an evaluation), saves
its checkpoint and exits before the limit. A run still saving at the limit is waited for, not killed (give it a
longer --stop-grace). SIGTERM, SIGINT (Ctrl-C) or SIGHUP to run.py does the same at once; the runs start in their own
session, so each gets exactly one signal, from run.py (a second signal to run.py stops them without saving). Calling
the same command again continues the cut runs and starts those not started. Exit codes: 0 when every run of the grid
has finished; 3 when runs remain (cut, or not started), so a job can loop on 3 until it gets 0; 1 when a run failed
(see {out}/failed/ and {out}/logs/); 128 + the signal (130 for SIGINT, 143 for SIGTERM) when run.py itself was
stopped by one; 2 for bad arguments.

Arguments: --args go to every run. Each --variants entry 'NAME: ARGS' adds ARGS and makes its own set of runs, whose
--exp-name is {script}_{NAME}, or the script's name alone for an empty NAME (": "). Without --variants there is one
set, named after the script. The example above trains iql and iql_bc, 3 seeds each.

On a GPU machine, `--runs-per-gpu N` packs N runs at a time on each visible GPU (each run sees one, through
CUDA_VISIBLE_DEVICES) and starts the CUDA MPS control daemon for the sweep when the machine has it and none runs, so
that the runs' small kernels share the GPU instead of taking turns; it stops only a daemon it started. At the end it
prints each run's updates/s and their sum.

Ray (`pip install -r benchmark/requirements.txt`): `--backend ray --ray-address ADDRESS` sends each run to the cluster
as a task with --threads CPUs. The task receives the script's source (every script is one self-contained file), runs
it in a temporary folder on whichever node it lands on and returns the TensorBoard folder as an archive, so the nodes
share no filesystem with this machine. Each node needs the Python packages of requirements.txt and the datasets
(MINARI_DATASETS_PATH, passed on from here, or downloads). Cut runs are resumed by the local backend only: the Ray
backend leaves them in {out}/cut/ (and exits with 3), and --time-limit needs the local backend.
"""

import io
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

import tyro

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Args:
    scripts: tuple[str, ...] = ("iql.py",)
    """training scripts, by file name in the repository root"""
    dataset_ids: tuple[str, ...] = ("local/hopper/medium-replay-v0",)
    """Minari dataset ids"""
    seeds: tuple[int, ...] = (1, 2, 3)
    """seeds; each is one run"""
    args: str = ""
    """extra arguments for every run; starting with a dash, it needs the = form: --args="--total-steps 100000" """
    variants: tuple[str, ...] = ()
    """'NAME: ARGS' strings: each adds ARGS to its own set of runs, named {script}_{NAME} ({script} alone for ': ')"""
    out: Path = Path("benchmark/sweeps/default")
    """output folder: runs/ (TensorBoard), logs/ (console output), done/ (finished runs), cut/ (to resume), failed/"""
    workers: int = 1
    """runs at a time (local backend)"""
    runs_per_gpu: Optional[int] = None
    """local backend on a GPU machine: this many runs at a time on each visible GPU, under CUDA MPS where it exists"""
    threads: Optional[int] = None
    """CPU threads per run; default: this machine's cores divided by --workers (local), 1 (Ray)"""
    backend: Literal["local", "ray"] = "local"
    """where runs execute: local subprocesses, or Ray tasks"""
    ray_address: Optional[str] = None
    """Ray cluster address (e.g. 'auto' or 'ray://host:10001'); None starts a Ray instance on this machine"""
    time_limit: Optional[float] = None
    """seconds this call may take (local backend); then the runs save and stop, and the same command continues them"""
    stop_grace: float = 60.0
    """seconds before --time-limit at which runs get SIGTERM: time to end a step (maybe an evaluation) and save"""
    dry_run: bool = False
    """print the runs that would start and exit"""


@dataclass
class Run:
    script: str
    dataset_id: str
    seed: int
    argv: list
    exp_name: str
    resume: Optional[Path] = None
    """the run's folder under {out}/cut/ when it was cut off with a checkpoint: it runs as `--resume FOLDER`"""

    @property
    def key(self) -> str:
        """The prefix of the run folder the script itself names ({dataset}__{exp_name}__{seed}__{time})."""
        return f"{self.dataset_id.replace('/', '-')}__{self.exp_name}__{self.seed}"


def fail(message: str):
    print(f"run.py: error: {message}", file=sys.stderr)
    sys.exit(2)


def parse_variant(variant: str) -> tuple[str, list]:
    name, sep, rest = variant.partition(":")
    if not sep or " " in name.strip() or name.strip().startswith("-"):
        fail(f"write each variant as 'NAME: ARGS' (e.g. 'bc: --temperature 0'), got '{variant}'")
    return name.strip(), shlex.split(rest)


def build_grid(args: Args) -> list[Run]:
    common = shlex.split(args.args)
    variants = [parse_variant(v) for v in args.variants] or [("", [])]
    names = [n for n, _ in variants]
    if len(set(names)) < len(names):
        fail(f"two variants share the name '{max(names, key=names.count)}'; give each its own NAME")
    runs = []
    for script in args.scripts:
        if not (ROOT / script).is_file():
            fail(f"no script '{script}' in {ROOT}; choose from "
                 f"{', '.join(sorted(p.name for p in ROOT.glob('*.py')))}")
        for name, extra in variants:
            extra = common + extra
            # Runs execute in a temporary folder, so a path given to a --*-path option is made absolute here.
            extra = [os.path.abspath(a) if i and extra[i - 1].endswith("-path") else a for i, a in enumerate(extra)]
            exp_name = Path(script).stem + (f"_{name}" if name else "")
            for dataset_id in args.dataset_ids:
                for seed in args.seeds:
                    argv = ["--dataset-id", dataset_id, "--seed", str(seed), *extra, "--exp-name", exp_name]
                    runs.append(Run(script, dataset_id, seed, argv, exp_name))
    return runs


def execute(script_name: str, source: str, argv: list, threads: int, env: dict, log_path: Optional[str] = None,
            started=None):
    """Run one training in a fresh temporary folder; returns (exit code, console output or '', archive of runs/).
    The console output is appended to log_path when given. With `started`, the run gets its own process group and
    started(process) receives it, so that the caller can signal it (a resumed run writes into its --resume folder, so
    its archive is empty).

    Self-contained on purpose: a Ray task executes exactly this function on a remote node, so it takes the script's
    source instead of a path and returns the TensorBoard folder as bytes instead of leaving it on a local disk."""
    with tempfile.TemporaryDirectory(prefix="offrl_run_") as work:
        script = os.path.join(work, script_name)
        with open(script, "w") as f:
            f.write(source)
        run_env = {**os.environ, **env, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
                   "PYTHONUNBUFFERED": "1"}
        with (open(log_path, "a") if log_path else tempfile.TemporaryFile("w+", dir=work)) as log:
            process = subprocess.Popen([sys.executable, script, *argv], cwd=work, env=run_env, stdout=log,
                                       stderr=subprocess.STDOUT, start_new_session=started is not None)
            if started is not None:
                started(process)
            rc = process.wait()
            if not log_path:
                log.seek(0)
                text = log.read()
        archive = io.BytesIO()
        if os.path.isdir(os.path.join(work, "runs")):
            with tarfile.open(fileobj=archive, mode="w:gz") as tar:
                tar.add(os.path.join(work, "runs"), arcname="runs")
        return rc, ("" if log_path else text), archive.getvalue()


def time_left_from_log(path: Path) -> Optional[float]:
    """The scripts print '... | X min left' at every evaluation; the last such figure of a running run."""
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        if line.endswith("min left"):
            try:
                return float(line.split("|")[-1].split()[0])
            except ValueError:
                return None
    return None


class Progress:
    def __init__(self, total: int, skipped: int, workers: int):
        self.total, self.skipped, self.workers = total, skipped, workers
        self.counts, self.durations = dict.fromkeys(("done", "cut", "stopped", "failed"), 0), []

    def record(self, outcome: str, seconds: float, whole: bool):
        self.counts[outcome] += 1
        if outcome == "done" and whole:  # a resumed run's time is only part of a run's
            self.durations.append(seconds)

    def show(self, running: list, queued: int, logs: Path, final: bool = False):
        finished = self.skipped + self.counts["done"]
        # Time left: what each running run says about itself, then queued runs at the mean duration seen so far.
        left = [time_left_from_log(logs / f"{key}.log") for key in running]
        per_run = sum(self.durations) / len(self.durations) / 60 if self.durations else None
        if per_run is not None or None not in left:
            lanes = sorted(per_run if x is None else x for x in left) + [0.0] * (self.workers - len(left))
            for _ in range(queued):  # each queued run goes to the lane that frees first
                lanes[0] += per_run or max(lanes)
                lanes.sort()
            eta = f"{max(lanes):.0f} min left" if lanes else ""
        else:
            eta = "time left: after the first evaluations"
        width = 30
        filled = int(width * finished / max(self.total, 1))
        cut = f", {self.counts['cut']} cut" if self.counts["cut"] else ""
        line = (f"[{'#' * filled}{'.' * (width - filled)}] {finished}/{self.total} done "
                f"({self.skipped} skipped, {self.counts['failed']} failed{cut}), {len(running)} running, {queued} "
                f"queued, {eta}")
        print(("\r" if sys.stdout.isatty() else "") + line, end="\n" if final or not sys.stdout.isatty() else "",
              flush=True)


# Exit codes of a run stopped by SIGINT or SIGTERM: 128 + the signal from the scripts' handler, or minus the signal
# when it came before the handler was installed.
STOPPED = (128 + signal.SIGINT, 128 + signal.SIGTERM, -signal.SIGINT, -signal.SIGTERM)


def note_of(folder: Path) -> Path:
    """{out}/cut/{folder}.json, beside a cut run's folder: the grid arguments it was started with, its time so far."""
    return folder.with_name(folder.name + ".json")


def stopped_at(log: str) -> str:
    """'S/T' from the line a stopped script prints ('SIGTERM at step S/T: continue with ...'), or '?'."""
    for line in reversed(log.splitlines()):
        if " at step " in line and ": continue with" in line:
            return line.split(" at step ")[1].split(":")[0]
    return "?"


def point_log_at_sweep(log: Path, folder: Path, step: str):
    """A cut run's log ends with the script's 'continue with python {temporary folder}/SCRIPT --resume runs/...', which
    names a folder that is gone (the script ran there) and a run folder that moved to cut/. That line is rewritten to
    say where the checkpoint is, and a last line gives what does continue the run: the sweep's own command again."""
    lines = log.read_text().splitlines() if log.exists() else []
    for i, line in enumerate(lines):
        if " at step " in line and ": continue with" in line:
            lines[i] = line.split(": continue with")[0] + f": checkpoint saved; the run is now in {folder}"
    at = f" at step {step}" if step != "?" else ""  # '?': signalled as it ended, after its last step
    lines.append(f"run.py: cut{at}: run the same command again (in {os.getcwd()}) to resume it: "
                 f"{shlex.join(['python', *sys.argv])}")
    log.write_text("\n".join(lines) + "\n")


def find_cut(run: Run, out: Path) -> Optional[Path]:
    """The run's folder under {out}/cut/, if an earlier call cut it off; refuses one cut with other arguments."""
    cut = out / "cut"
    folders = sorted(p for p in cut.iterdir() if p.is_dir() and p.name.startswith(run.key + "__"))
    if len(folders) > 1:
        fail(f"{len(folders)} cut folders of one run in {cut}: {', '.join(p.name for p in folders)}; keep the one to "
             "resume, delete the others")
    if not folders:
        return None
    note = note_of(folders[0])
    argv = json.loads(note.read_text())["argv"] if note.exists() else run.argv
    if argv != run.argv:
        fail(f"{folders[0]} was started with other arguments ({shlex.join(argv)}) than this grid gives it "
             f"({shlex.join(run.argv)}): run the command that started it, or delete that folder to start the run over")
    return folders[0].resolve()


def finish(run: Run, rc: int, archive: bytes, out: Path, seconds: float, threads: int, log: str) -> str:
    """File what a run left and return its outcome.
    - 'done' (exit 0): its TensorBoard folder into {out}/runs, and the finished marker.
    - 'cut' (stopped by SIGTERM or SIGINT, its checkpoint saved): the folder into {out}/cut with a note of its
      arguments and time so far; the next call resumes it.
    - 'stopped' (stopped before its training began, nothing saved): nothing kept; the next call starts it.
    - 'failed': the folder into {out}/failed, so that report.py never mixes half runs into the table; the next call
      starts it over."""
    earlier = json.loads(note_of(run.resume).read_text()) if run.resume and note_of(run.resume).exists() else {}
    seconds += earlier.get("seconds", 0.0)
    with tempfile.TemporaryDirectory() as tmp:
        folders = [run.resume] if run.resume else []  # a resumed run writes into its folder under cut/
        if archive:
            with tarfile.open(fileobj=io.BytesIO(archive), mode="r:gz") as tar:
                tar.extractall(tmp, filter="data")
            folders += sorted(Path(tmp, "runs").iterdir())
        saved = any((f / f"{run.exp_name}.pt").is_file() for f in folders)
        outcome = ("done" if rc == 0 else "cut" if rc in STOPPED and saved else "stopped" if rc in STOPPED else
                   "failed")
        if outcome == "stopped":
            return outcome
        dest = out / {"done": "runs", "cut": "cut", "failed": "failed"}[outcome]
        dest.mkdir(parents=True, exist_ok=True)
        for folder in folders:
            target = folder
            if folder != run.resume or outcome != "cut":  # a resumed run cut again stays where it is
                target = dest / folder.name
                while target.exists():  # never overwrite an earlier run's folder
                    target = target.with_name(target.name + "_")
                shutil.move(str(folder), target)
            if outcome == "cut":
                note_of(target).write_text(json.dumps({"argv": run.argv, "seconds": round(seconds, 1),
                                                       "step": stopped_at(log)}, indent=1))
                point_log_at_sweep(out / "logs" / f"{run.key}.log", target, stopped_at(log))
    if run.resume and outcome != "cut":
        note_of(run.resume).unlink(missing_ok=True)
    if outcome == "done":
        marker = {"script": run.script, "dataset_id": run.dataset_id, "seed": run.seed, "argv": run.argv,
                  "seconds": round(seconds, 1), "threads": threads}
        (out / "done" / f"{run.key}.json").write_text(json.dumps(marker, indent=1))
    return outcome


class Runs:
    """The local runs' processes, so that the time limit or a signal to run.py reaches each of them once."""

    def __init__(self):
        # Re-entrant: run.py's signal handler, which runs in the main thread, may interrupt the main thread here.
        self.lock, self.processes, self.stopping = threading.RLock(), {}, False

    def add(self, key: str, process: subprocess.Popen):
        with self.lock:
            self.processes[key] = process
            if self.stopping:  # started just as the sweep stopped
                process.send_signal(signal.SIGTERM)

    def discard(self, key: str):
        with self.lock:
            self.processes.pop(key, None)

    def stop(self) -> int:
        """SIGTERM to every running run (a second call: they exit at once, unsaved); returns how many got it."""
        with self.lock:
            self.stopping = True
            running = [p for p in self.processes.values() if p.poll() is None]
            for process in running:
                process.send_signal(signal.SIGTERM)
            return len(running)


def visible_gpus() -> list:
    """The GPUs this process may use: CUDA_VISIBLE_DEVICES when it is set, else every GPU nvidia-smi lists."""
    if "CUDA_VISIBLE_DEVICES" in os.environ:
        return [g for g in os.environ["CUDA_VISIBLE_DEVICES"].split(",") if g.strip()]
    try:
        listing = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [str(i) for i, line in enumerate(line for line in listing.splitlines() if line.startswith("GPU "))]


def start_mps() -> bool:
    """CUDA MPS lets the packed runs' kernels share the GPU at once instead of taking turns (2.8x the throughput of
    one run with five IQL runs on an H100, against 1.25x without). Starts the control daemon if the machine has it and
    none runs; returns whether this call started it, so that only a daemon it started is stopped."""
    if not shutil.which("nvidia-cuda-mps-control"):
        print("MPS: nvidia-cuda-mps-control is not on this machine; the runs share each GPU by time slicing")
        return False
    if subprocess.run(["pgrep", "-f", "nvidia-cuda-mps-control -d"], capture_output=True).returncode == 0:
        print("MPS: a control daemon is already running; the runs use it, and it is left running")
        return False
    subprocess.run(["nvidia-cuda-mps-control", "-d"], check=True)
    print("MPS: started the control daemon for this sweep; it is stopped at the end")
    return True


def updates_per_second(log: Path) -> Optional[float]:
    """The last '... | N updates/s | ...' figure a run printed."""
    for line in reversed(log.read_text().splitlines() if log.exists() else []):
        parts = [p.strip() for p in line.split("|") if p.strip().endswith("updates/s")]
        if parts:
            return float(parts[-1].split()[0])
    return None


def main(args: Args):
    sweep_start = time.time()  # --time-limit counts from here
    if args.workers < 1:
        fail(f"--workers must be >= 1, got {args.workers}")
    if args.time_limit is not None:
        if args.backend != "local":
            fail("--time-limit needs the local backend (--backend local): cut runs are resumed by it only")
        if not 0 <= args.stop_grace < args.time_limit:
            fail(f"--stop-grace must be >= 0 and shorter than --time-limit, got {args.stop_grace} and "
                 f"{args.time_limit}")
    gpus = []
    if args.runs_per_gpu is not None:
        gpus = visible_gpus()
        if args.runs_per_gpu < 1 or not gpus or args.backend != "local":
            fail("--runs-per-gpu needs a number >= 1, the local backend and a visible GPU (CUDA_VISIBLE_DEVICES or "
                 f"nvidia-smi -L); got {args.runs_per_gpu}, {args.backend}, GPUs {gpus or 'none'}")
        args.workers = args.runs_per_gpu * len(gpus)
    runs = build_grid(args)
    for sub in ("runs", "logs", "done", "cut"):
        (args.out / sub).mkdir(parents=True, exist_ok=True)
    todo = [r for r in runs if not (args.out / "done" / f"{r.key}.json").exists()]
    for run in todo:
        run.resume = find_cut(run, args.out)
    resumed = sum(r.resume is not None for r in todo)
    threads = args.threads or (max(1, (os.cpu_count() or 1) // args.workers) if args.backend == "local" else 1)
    print(f"{len(runs)} runs in the grid, {len(runs) - len(todo)} already finished in {args.out}, {len(todo)} to run "
          + (f"({resumed} cut off earlier, resumed from their checkpoints; " if resumed else "(")
          + f"{args.backend}, {threads} thread(s) each)")
    if args.dry_run:
        for i, r in enumerate(todo):
            where = f"CUDA_VISIBLE_DEVICES={gpus[i % len(gpus)]} " if gpus else ""
            print(f"  {where}python {r.script} {shlex.join(['--resume', str(r.resume)] if r.resume else r.argv)}")
        return
    if not todo:
        return
    env = {k: v for k, v in os.environ.items() if k == "MINARI_DATASETS_PATH"}
    sources = {s: (ROOT / s).read_text() for s in args.scripts}
    progress = Progress(len(runs), len(runs) - len(todo), args.workers)
    logs, cut, not_started, stopped_by = args.out / "logs", [], [], {}

    def complete(run: Run, started: float, rc: int, archive: bytes, log: str):
        outcome = finish(run, rc, archive, args.out, time.time() - started, threads, log)
        progress.record(outcome, time.time() - started, whole=run.resume is None)
        if outcome == "cut":  # a run signalled as it exits, after its last step, says nothing
            cut.append(run.key + (f" (step {stopped_at(log)})" if stopped_at(log) != "?" else ""))
        elif outcome == "stopped":
            not_started.append(run)

    if args.backend == "ray":
        try:
            import ray
        except ImportError:
            fail("--backend ray needs Ray: pip install -r benchmark/requirements.txt")
        left = [r for r in todo if r.resume]
        if left:
            print(f"{len(left)} cut run(s) in {args.out / 'cut'} are resumed by the local backend only: run this "
                  "command with --backend local to continue them")
            cut += [f"{r.key} (left in cut/)" for r in left]
        ray.init(address=args.ray_address, log_to_driver=False, include_dashboard=False)
        remote = ray.remote(num_cpus=threads)(execute)
        pending = {remote.remote(r.script, sources[r.script], r.argv, threads, env): (r, time.time())
                   for r in todo if not r.resume}
        progress.workers = max(1, int(ray.cluster_resources().get("CPU", 1) // threads))
        while pending:
            progress.show([r.key for r, _ in pending.values()], 0, logs)
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=30)
            for ref in ready:
                run, started = pending.pop(ref)
                rc, text, archive = ray.get(ref)
                (logs / f"{run.key}.log").write_text(text)
                complete(run, started, rc, archive, text)
    else:
        processes = Runs()

        def on_signal(signum, frame):
            # Only os.write here: the main thread may be inside print() when the signal arrives.
            first = not stopped_by
            stopped_by.setdefault("signal", signum)
            if not first:  # a second signal: the runs exit at once, unsaved; a third acts as usual
                for s, handler in handlers.items():
                    signal.signal(s, handler)
            n = processes.stop()
            os.write(2, (f"\nrun.py: {signal.Signals(signum).name}: " + (
                f"stopping {n} run(s), each after its current step, with its checkpoint saved; no run starts; a "
                "second signal stops them at once\n" if first else f"stopping {n} run(s) at once\n")).encode())

        # SIGHUP too: the runs, in their own session, would outlive a closed terminal and run.py.
        handlers = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
        started_mps = gpus and start_mps()
        deadline = sweep_start + args.time_limit if args.time_limit is not None else None
        stop_at = deadline - args.stop_grace if deadline is not None else None
        try:
            with ThreadPoolExecutor(args.workers) as pool:
                queue, running, late = list(todo), {}, False
                while queue or running:
                    if stop_at is not None and time.time() >= stop_at and not processes.stopping:
                        n = processes.stop()
                        print(f"time limit ({args.time_limit:g} s) in {max(0, deadline - time.time()):.0f} s: no run "
                              f"starts, and SIGTERM went to {n} running run(s), which save their checkpoints",
                              flush=True)
                    while queue and len(running) < args.workers and not processes.stopping:
                        run = queue.pop(0)
                        log = logs / f"{run.key}.log"
                        if run.resume:  # its log goes on where the cut run's stopped
                            with open(log, "a") as f:
                                f.write(f"run.py: resuming {run.resume} from its checkpoint: python {run.script} "
                                        f"--resume {run.resume}\n")
                        else:
                            log.write_text("")
                        # Packed on GPUs: the next run goes to the GPU with the fewest runs on it.
                        gpu = min(gpus, key=lambda g: [x for _, _, x in running.values()].count(g)) if gpus else None
                        run_env = {**env, "CUDA_VISIBLE_DEVICES": gpu} if gpu is not None else env
                        argv = ["--resume", str(run.resume)] if run.resume else run.argv
                        future = pool.submit(execute, run.script, sources[run.script], argv, threads, run_env,
                                             str(log), started=lambda p, key=run.key: processes.add(key, p))
                        running[future] = (run, time.time(), gpu)
                    if not running:  # stopped with runs still queued
                        break
                    progress.show([r.key for r, _, _ in running.values()], len(queue), logs)
                    timeout = 30 if stop_at is None or processes.stopping else min(30, max(0.1, stop_at - time.time()))
                    finished, _ = wait(list(running), timeout=timeout, return_when=FIRST_COMPLETED)
                    for future in finished:
                        run, started, _ = running.pop(future)
                        processes.discard(run.key)
                        rc, _, archive = future.result()
                        log = logs / f"{run.key}.log"
                        complete(run, started, rc, archive, log.read_text() if log.exists() else "")
                    if deadline is not None and running and time.time() > deadline and not late:
                        late = True
                        print(f"time limit reached with {len(running)} run(s) still finishing their step and saving; "
                              "they are waited for (a longer --stop-grace gives them the time)", file=sys.stderr)
                not_started += queue
        finally:
            for s, handler in handlers.items():
                signal.signal(s, handler)
            if started_mps:
                subprocess.run(["nvidia-cuda-mps-control"], input="quit\n", text=True)
        if gpus:
            rates = [updates_per_second(logs / f"{r.key}.log") for r in todo]
            print(f"{len(todo)} runs on {len(gpus)} GPU(s), {args.runs_per_gpu} at a time on each, in "
                  f"{time.time() - sweep_start:.0f} s; updates/s per run {[round(x) for x in rates if x]}, together "
                  f"{sum(x for x in rates if x):.0f}")
    progress.show([], 0, logs, final=True)
    if cut:
        print(f"{len(cut)} run(s) cut off, each with its checkpoint in {args.out / 'cut'}: {', '.join(cut)}")
    if not_started:
        print(f"{len(not_started)} run(s) not started, or stopped before they saved anything (the next call starts "
              f"them from step 0): {', '.join(r.key for r in not_started)}")
    if cut or not_started:
        print("Run the same command again to continue them (the cut ones from their checkpoints); it exits with 3 "
              "while runs remain and with 0 once every run has finished")
    if progress.counts["failed"]:
        print(f"{progress.counts['failed']} run(s) failed: see {logs} and {args.out / 'failed'}", file=sys.stderr)
    if stopped_by:
        sys.exit(128 + stopped_by["signal"])
    if progress.counts["failed"]:
        sys.exit(1)
    if cut or not_started:
        sys.exit(3)


if __name__ == "__main__":
    main(tyro.cli(Args))
