"""Every algorithm script, run as a user runs it: a short training on a small real dataset, then the checkpoint
evaluated, the exported policy loaded without the script, the run stopped and resumed, then the mistakes a user
makes, each of which must end in one clear line and a non-zero exit."""

import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import CARTPOLE_ID, HOPPER_ID, PENDULUM_ID, ROOT, run_script
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

ALL_SCRIPTS = ["iql.py", "cql_continuous.py", "bcq.py", "awr.py", "mopo.py", "dt.py"]
SCRIPTS = [s for s in ALL_SCRIPTS if (ROOT / s).exists()]
# Arguments a script needs on top of the shared smoke settings to stay within a minute or two.
EXTRA_ARGS = {"mopo.py": ["--dynamics-max-epochs", "3"], "cql_continuous.py": ["--hidden-dims", "64", "64"],
              "dt.py": ["--seq-len", "5", "--embedding-dim", "32", "--num-layers", "1", "--hidden-dims", "64"]}
# On Hopper, an inner loop every 100 steps, so that a run resumed at step 100 or 150 crosses a refit or a rollout.
INNER_LOOPS = {"awr.py": ["--policy-steps", "100"], "mopo.py": ["--rollout-freq", "100", "--rollout-batch-size", "5000"]}
# One invalid algorithm argument per script: it must be refused before any data is loaded.
BAD_ARGS = {"iql.py": ["--expectile", "1.5"], "cql_continuous.py": ["--cql-alpha", "-1"], "bcq.py": ["--phi", "2"],
            "awr.py": ["--td-lambda", "1.5"], "mopo.py": ["--num-elites", "9"], "dt.py": ["--seq-len", "0"]}
SMOKE = ["--seed", "3", "--total-steps", "300", "--eval-every", "150", "--eval-episodes", "2", "--batch-size", "32",
         "--log-every", "50"]


def smoke_args(script: str, dataset_id: str) -> list:
    inner = INNER_LOOPS.get(script, []) if dataset_id == HOPPER_ID else []
    return ["--dataset-id", dataset_id, *SMOKE, *EXTRA_ARGS.get(script, []), *inner]


TRAINED = {}


def train(script: str, dataset_id: str, tmp_path_factory):
    """The smoke run of a script on a dataset, trained once per session in its own empty working directory."""
    if (script, dataset_id) not in TRAINED:
        cwd = tmp_path_factory.mktemp(f"{script[:-3]}_{dataset_id.split('/')[1]}")
        result = run_script(script, *smoke_args(script, dataset_id), cwd=cwd)
        assert result.returncode == 0, result.stderr[-3000:]
        runs = list((cwd / "runs").iterdir())
        assert len(runs) == 1, runs
        TRAINED[script, dataset_id] = result, runs[0]
    return TRAINED[script, dataset_id]


def scalars(run_dir: Path) -> dict:
    acc = EventAccumulator(str(run_dir))
    acc.Reload()
    return {tag: [e.value for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def events(run_dir: Path, tag: str) -> list:
    acc = EventAccumulator(str(run_dir))
    acc.Reload()
    return acc.Scalars(tag)


def assert_clear_error(result, *fragments: str):
    """One short message on stderr, no traceback, a non-zero exit."""
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    assert len(result.stderr.strip().splitlines()) <= 3, result.stderr
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr


@pytest.mark.parametrize("script", SCRIPTS)
def test_train_log_checkpoint_and_evaluate(script, minari_root, tmp_path_factory, tmp_path):
    result, run_dir = train(script, HOPPER_ID, tmp_path_factory)
    exp_name = script[:-3]
    # The first line says where the run trains: the device and, on a CPU, the thread count (1 under run_script).
    assert re.search(r"; runs on (cpu \(no GPU found\), threads: 1|cuda)", result.stdout.splitlines()[0]), result.stdout
    assert run_dir.name.startswith(f"{HOPPER_ID.replace('/', '-')}__{exp_name}__3__")
    logged = scalars(run_dir)
    losses = [t for t in logged if t.startswith("losses/")]
    assert losses, logged.keys()
    for tag in losses:
        assert all(math.isfinite(v) for v in logged[tag]), (tag, logged[tag])
    for tag in ("charts/updates_per_second", "charts/peak_memory_mb", "eval/return", "eval/normalized_score"):
        assert tag in logged, (tag, sorted(logged))
    # Evaluations at steps 150 and 300 (the last step); the final score line averages them.
    assert len(logged["eval/return"]) == 2
    assert "final score (mean of the last 2 evaluations)" in result.stdout

    checkpoint = run_dir / f"{exp_name}.pt"
    assert checkpoint.is_file() and (run_dir / f"{exp_name}_policy.pt2").is_file()
    evaluated = run_script(script, "--dataset-id", HOPPER_ID, "--checkpoint", str(checkpoint), "--eval-episodes", "2",
                           cwd=tmp_path)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert "normalized score" in evaluated.stdout
    assert not (tmp_path / "runs").exists(), "evaluating a checkpoint must not start a new run"

    # The checkpoint carries its own environment: --dataset-id does not change where it is evaluated.
    elsewhere = run_script(script, "--dataset-id", PENDULUM_ID, "--checkpoint", str(checkpoint), "--eval-episodes", "1",
                           cwd=tmp_path)
    assert elsewhere.returncode == 0, elsewhere.stderr[-3000:]
    assert f"trained on {HOPPER_ID}" in elsewhere.stdout and "Hopper-v5" in elsewhere.stdout, elsewhere.stdout


@pytest.mark.parametrize("script", SCRIPTS)
def test_bounded_actions_without_reference_scores(script, minari_root, tmp_path_factory, tmp_path):
    """Pendulum: a 1-d action in [-2, 2] and no reference scores, so the raw return is logged and nothing else."""
    result, run_dir = train(script, PENDULUM_ID, tmp_path_factory)
    logged = scalars(run_dir)
    assert "eval/return" in logged and "eval/normalized_score" not in logged
    assert "no reference scores" in result.stdout
    # A random Pendulum policy scores about -1200 per episode; returns must stay in the task's physical range.
    assert all(-2000 < r <= 0 for r in logged["eval/return"]), logged["eval/return"]
    # Pendulum never terminates: evaluating the checkpoint ends only because its 200-step time limit travels with it.
    checkpoint = run_dir / f"{script[:-3]}.pt"
    evaluated = run_script(script, "--checkpoint", str(checkpoint), "--eval-episodes", "2", cwd=tmp_path, timeout=120)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert "Pendulum-v1: 2 episodes" in evaluated.stdout and "no reference scores" in evaluated.stdout


LOAD_POLICY = """
import sys
import numpy as np
import torch
policy = torch.export.load(sys.argv[1]).module()
torch.manual_seed(0)
np.save(sys.argv[3], policy(torch.as_tensor(np.load(sys.argv[2]))).detach().numpy())
assert {"iql", "cql_continuous", "bcq", "awr", "mopo", "dt", "conftest"}.isdisjoint(sys.modules), "imported a script"
"""


@pytest.mark.parametrize("script", [s for s in SCRIPTS if s != "dt.py"])  # dt.py's takes a context: tests/test_dt.py
def test_exported_policy_runs_without_the_script(script, minari_root, tmp_path_factory, tmp_path):
    """The policy exported beside the checkpoint, loaded in a process that imports torch and numpy only, maps raw
    observations to environment actions as the agent's act does (Pendulum: standardized inputs, actions in [-2, 2]);
    BCQ's random candidates come from the same draws after the same seed."""
    _, run_dir = train(script, PENDULUM_ID, tmp_path_factory)
    exp_name, module = script[:-3], __import__(script[:-3])
    observations = (np.random.default_rng(0).normal(size=(7, 3)) * [1.0, 1.0, 4.0]).astype(np.float32)
    np.save(tmp_path / "obs.npy", observations)
    loaded = subprocess.run([sys.executable, "-c", LOAD_POLICY, str(run_dir / f"{exp_name}_policy.pt2"),
                             str(tmp_path / "obs.npy"), str(tmp_path / "actions.npy")], capture_output=True, text=True,
                            timeout=120, cwd=tmp_path)
    assert loaded.returncode == 0, loaded.stderr[-3000:]

    ckpt = torch.load(run_dir / f"{exp_name}.pt", weights_only=True)
    task = ckpt["task"]
    agent = module.Agent(3, 1, module.Args(**ckpt["args"]), torch.device("cpu"))
    agent.load_state_dict(ckpt["agent"])
    torch.manual_seed(0)
    with torch.no_grad():
        unit = agent.act((torch.as_tensor(observations) - task["obs_mean"]) / task["obs_std"])
    expected = task["action_low"] + (unit + 1.0) * 0.5 * (task["action_high"] - task["action_low"])
    actions = np.load(tmp_path / "actions.npy")
    assert actions.shape == (7, 1) and np.abs(actions).max() <= 2.0
    np.testing.assert_allclose(actions, expected.numpy(), rtol=1e-5, atol=1e-6)
    assert np.abs(actions).max() > 1.0 or np.std(actions) > 0  # the [-1, 1] output was rescaled to the Box, not clipped


STALL_IN_SAVE = """
import builtins, runpy, sys, time
opened, real_open, stall_at = [], builtins.open, int(sys.argv[1])
class Stalled:  # the argv[1]-th checkpoint write (counting from 1; 0: none) writes a first chunk, then stalls
    def __init__(self, f): self.f = f
    def write(self, data):
        self.f.write(data[:4096]); self.f.flush(); print("WRITING", flush=True); time.sleep(600)
    def __getattr__(self, name): return getattr(self.f, name)
    def __enter__(self): return self
    def __exit__(self, *exc): self.f.close()
def patched(file, mode="r", *args, **kwargs):
    f = real_open(file, mode, *args, **kwargs)
    if str(file).endswith(".pt.tmp"):
        opened.append(file)
        if len(opened) == stall_at:
            return Stalled(f)
    return f
builtins.open = patched
script, sys.argv = sys.argv[2], sys.argv[2:]
runpy.run_path(script, run_name="__main__")
"""

SIGTERM_AT_EVALUATION = """
import os, runpy, signal, sys
from torch.utils.tensorboard import SummaryWriter
add_scalar, stop_at = SummaryWriter.add_scalar, int(sys.argv[1])
def patched(self, tag, value, step=None, *args, **kwargs):
    add_scalar(self, tag, value, step, *args, **kwargs)
    if tag == "eval/return" and step == stop_at:
        os.kill(os.getpid(), signal.SIGTERM)  # as a cluster would, in the middle of the step
SummaryWriter.add_scalar = patched
script, sys.argv = sys.argv[2], sys.argv[2:]
runpy.run_path(script, run_name="__main__")
"""


def python_with(code: str, *args: str, cwd: Path) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-c", code, *args], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def wait_for(process: subprocess.Popen, text: str, timeout: float = 300) -> str:
    """The process's output up to the first line that contains text."""
    seen, start = [], time.time()
    for line in process.stdout:
        seen.append(line)
        if text in line or time.time() - start > timeout:
            break
    assert text in "".join(seen), "".join(seen)[-3000:] + process.stderr.read()[-3000:]
    return "".join(seen)


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_stopped_run_resumes_exactly(script, minari_root, tmp_path_factory, tmp_path):
    """300 steps straight, against: a run killed (SIGKILL) while it writes its second checkpoint, at step 200; resumed
    from the step-100 checkpoint that the kill left whole; stopped by SIGTERM at step 150; resumed to 300. Every logged
    loss and diagnostic, every evaluation and the final weights are the same, bit for bit (CPU). The resumed parts
    cross AWR's refits and MOPO's rollouts (every 100 steps here)."""
    _, straight = train(script, HOPPER_ID, tmp_path_factory)
    exp_name, path = script[:-3], str(ROOT / script)
    killed = python_with(STALL_IN_SAVE, "2", path, *smoke_args(script, HOPPER_ID), "--save-every", "100",
                         cwd=tmp_path)
    wait_for(killed, "WRITING")
    killed.kill()
    killed.wait()
    [run_dir] = (tmp_path / "runs").iterdir()
    assert (run_dir / f"{exp_name}.pt.tmp").stat().st_size > 0  # the write it was killed in
    ckpt = torch.load(run_dir / f"{exp_name}.pt", weights_only=True)
    assert ckpt["loop"]["step"] == 100
    ckpt["loop"]["elapsed"] += 1e6  # as after a first session on a machine 10,000x slower: no bearing on this one
    torch.save(ckpt, run_dir / f"{exp_name}.pt")

    stopped = python_with(SIGTERM_AT_EVALUATION, "150", path, "--resume", str(run_dir), cwd=tmp_path)
    out, err = stopped.communicate(timeout=300)
    assert stopped.returncode == 143, out[-2000:] + err[-2000:]
    assert f"SIGTERM at step 150/300: continue with python {path} --resume {run_dir}" in out and "Traceback" not in err
    # Speed and time left are this session's: 50 updates, not 150 over the first session's 10^6 s.
    speed, left = re.search(r"step 150/300 .* (\d+) updates/s \| ([\d.]+) min left", out).groups()
    assert int(speed) >= 1 and float(left) < 60, (speed, left)
    resumed = run_script(script, "--resume", str(run_dir), cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "step 300/300" in resumed.stdout and "step 150/300" not in resumed.stdout

    expected, logged = scalars(straight), scalars(run_dir)
    compared = [t for t in expected if t.split("/")[0] in ("losses", "values", "model", "eval")]
    assert len(compared) >= 5
    for tag in compared:
        assert logged[tag] == expected[tag], tag
    assert [e.step for e in events(run_dir, compared[0])] == [e.step for e in events(straight, compared[0])]
    final, reference = (torch.load(d / f"{exp_name}.pt", weights_only=True)["agent"] for d in (run_dir, straight))
    assert final.keys() == reference.keys() and all(torch.equal(final[k], reference[k]) for k in final)


def test_ctrl_c_saves_after_the_step_and_a_second_one_exits_at_once(minari_root, tmp_path):
    """SIGINT saves after the current step, prints the command that resumes the run and exits 130 without a
    traceback; while it saves, a second SIGINT ends the process at once, leaving no half-written checkpoint."""
    argv = ["--dataset-id", HOPPER_ID, "--total-steps", "1000000", "--batch-size", "32", "--eval-every", "50",
            "--eval-episodes", "1", "--save-every", "0"]
    (tmp_path / "once").mkdir(), (tmp_path / "twice").mkdir()
    once = python_with(STALL_IN_SAVE, "0", str(ROOT / "iql.py"), *argv, cwd=tmp_path / "once")  # no stall
    wait_for(once, "step 50/1000000")
    once.send_signal(signal.SIGINT)
    out, err = once.communicate(timeout=120)
    assert once.returncode == 130 and "Traceback" not in err, err[-2000:]
    assert "SIGINT at step" in out and "--resume runs/" in out
    [run_dir] = (tmp_path / "once" / "runs").iterdir()
    assert torch.load(run_dir / "iql.pt", weights_only=True)["loop"]["step"] >= 50

    twice = python_with(STALL_IN_SAVE, "1", str(ROOT / "iql.py"), *argv, cwd=tmp_path / "twice")
    wait_for(twice, "step 50/1000000")
    twice.send_signal(signal.SIGINT)
    wait_for(twice, "WRITING")  # the save after the step has begun, and stalls
    started = time.time()
    twice.send_signal(signal.SIGINT)
    out, err = twice.communicate(timeout=60)
    assert twice.returncode == 130 and time.time() - started < 10 and "Traceback" not in err, err[-2000:]
    [run_dir] = (tmp_path / "twice" / "runs").iterdir()
    assert not (run_dir / "iql.pt").exists()


@pytest.mark.parametrize("script", SCRIPTS)
def test_user_errors_are_one_line(script, minari_root, tmp_path):
    assert_clear_error(run_script(script, "--dataset-id", CARTPOLE_ID, "--total-steps", "10", cwd=tmp_path), "Box",
                       "bcq_discrete.py", "cql_discrete.py")
    if script == SCRIPTS[0]:  # load_minari and load_checkpoint are the same text in every script (test_family)
        assert_clear_error(run_script(script, "--dataset-id", "test/hopper/nothing-v0", "--no-download", cwd=tmp_path),
                           "test/hopper/nothing-v0", "MINARI_DATASETS_PATH", HOPPER_ID, "benchmark/make_datasets.py")
        assert_clear_error(run_script(script, "--dataset-id", "no-such-id", "--no-download", cwd=tmp_path), "no-such-id")
        assert_clear_error(run_script(script, "--dataset-id", "test/hopper/random", cwd=tmp_path),  # no version
                           "'test/hopper/random' is not a dataset id")
        assert_clear_error(run_script(script, "--checkpoint", str(tmp_path / "missing.pt"), cwd=tmp_path), "missing.pt")
        not_a_checkpoint = tmp_path / "notes.pt"
        not_a_checkpoint.write_text("not a checkpoint")
        assert_clear_error(run_script(script, "--checkpoint", str(not_a_checkpoint), cwd=tmp_path), "notes.pt")
    if script in BAD_ARGS:
        assert_clear_error(run_script(script, *BAD_ARGS[script], cwd=tmp_path), BAD_ARGS[script][0])
    described = run_script(script, "--help", cwd=tmp_path, env={"COLUMNS": "200"})
    assert described.returncode == 0 and __import__(script[:-3]).__doc__.splitlines()[0] in described.stdout
    assert not (tmp_path / "runs").exists(), "a refused run must not leave a run folder behind"


def test_local_ids_are_not_looked_up_online_and_a_failed_video_leaves_nothing(minari_root, tmp_path):
    """A local/ id is this machine's own: a missing one fails at once, without the hub's retries (about 30 s offline).
    --capture-video either records every evaluation (the last one too, which gymnasium writes only at a reset or
    close) or, without moviepy or a renderer, stops in one line before training, leaving no folder behind."""
    started = time.time()
    assert_clear_error(run_script("iql.py", "--dataset-id", "local/hopper/nothing-v0", cwd=tmp_path), "not found locally",
                       "--datasets medium-replay")
    assert time.time() - started < 20
    video = run_script("iql.py", "--dataset-id", PENDULUM_ID, "--total-steps", "2", "--eval-every", "1",
                       "--eval-episodes", "1", "--batch-size", "8", "--capture-video", cwd=tmp_path)
    if video.returncode:
        assert_clear_error(video, "--capture-video needs moviepy")
        assert not (tmp_path / "videos").exists() and not (tmp_path / "runs").exists()
    else:
        [folder] = (tmp_path / "videos").iterdir()
        assert len(list(folder.glob("*.mp4"))) == 2, list(folder.iterdir())


@pytest.mark.parametrize("script", ["iql.py"])  # load_checkpoint is the same text in every script (test_family)
def test_checkpoint_and_resume_mistakes_are_one_line(script, minari_root, tmp_path_factory, tmp_path):
    """Another script's checkpoint names the script that saved it; a resumed run refuses an argument that would change
    it; a folder without a checkpoint, or --checkpoint with --resume, is refused; the run's files stay as they were."""
    other = "bcq.py"
    _, other_run = train(other, HOPPER_ID, tmp_path_factory)
    _, own = train(script, HOPPER_ID, tmp_path_factory)
    files = {p: p.stat().st_mtime_ns for p in own.iterdir()}
    for flag, target in (("--checkpoint", other_run / f"{other[:-3]}.pt"), ("--resume", other_run)):
        assert_clear_error(run_script(script, flag, str(target), cwd=tmp_path), f"saved by {other}", f"to {other}")
    assert_clear_error(run_script(script, "--resume", str(own), "--seed", "4", cwd=tmp_path),
                       "--seed 4 would change the run, which has 3")
    assert_clear_error(run_script(script, "--resume", str(own), "--total-steps", "600", cwd=tmp_path),
                       "--total-steps 600 would change the run, which has 300", "learning-rate schedule", "a new run")
    finished = run_script(script, "--resume", str(own), cwd=tmp_path)  # trains, evaluates and logs nothing
    assert finished.returncode == 0 and "has finished its 300 steps: nothing to resume" in finished.stdout, finished
    assert "step " not in finished.stdout and "saved" not in finished.stdout
    assert_clear_error(run_script(script, "--resume", str(tmp_path), cwd=tmp_path), str(tmp_path), "--resume")
    assert_clear_error(run_script(script, "--resume", str(own), "--checkpoint", str(own / f"{script[:-3]}.pt"),
                                  cwd=tmp_path), "and no --resume")
    assert {p: p.stat().st_mtime_ns for p in own.iterdir()} == files and not (tmp_path / "runs").exists()


FAULTS_AFTER_REUSE = """
import resource, sys, torch
sys.path.insert(0, {root!r})
if {tune}:
    __import__({module!r}).keep_freed_memory()
def touch():
    torch.empty(16 * 2**20).fill_(1.0)  # 64 MB, above glibc's largest automatic mmap threshold (32 MB)
faults = []
for _ in range(12):  # as in a training loop
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    touch()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(*faults)
"""


TUNED = [s for s in SCRIPTS if "def keep_freed_memory" in (ROOT / s).read_text()]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the allocator setting is for glibc on Linux")
@pytest.mark.parametrize("script", [None, *TUNED])
def test_freed_memory_is_reused_without_page_faults(script):
    """glibc's defaults page-fault on every reuse of a large block (the control, script=None); after a script's
    keep_freed_memory(), a loop that allocates and frees 64 MB reuses the heap without faults."""
    module = script.removesuffix(".py") if script else None
    code = FAULTS_AFTER_REUSE.format(root=str(ROOT), tune=script is not None, module=module)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    # The fewest faults of any round after the first few: with glibc's defaults every round maps fresh pages.
    fewest, pages = min(int(f) for f in out.stdout.split()[4:]), 64 * 2**20 // 4096
    if script is None:
        assert fewest > pages // 2, out.stdout
    else:
        assert fewest < pages // 20, out.stdout
