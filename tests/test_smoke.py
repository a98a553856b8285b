"""Every algorithm script, run as a user runs it: a short training on a small real dataset, then the checkpoint
evaluated, then the mistakes a user makes, each of which must end in one clear line and a non-zero exit."""

import math
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import CARTPOLE_ID, HOPPER_ID, PENDULUM_ID, ROOT, run_script
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

ALL_SCRIPTS = ["iql.py", "cql_continuous.py", "bcq.py", "awr.py", "mopo.py"]
SCRIPTS = [s for s in ALL_SCRIPTS if (ROOT / s).exists()]
# Arguments a script needs on top of the shared smoke settings to stay within a minute or two.
EXTRA_ARGS = {"mopo.py": ["--dynamics-max-epochs", "3"]}
# One invalid algorithm argument per script: it must be refused before any data is loaded.
BAD_ARGS = {"iql.py": ["--expectile", "1.5"], "cql_continuous.py": ["--cql-alpha", "-1"], "bcq.py": ["--phi", "2"],
            "awr.py": ["--td-lambda", "1.5"], "mopo.py": ["--num-elites", "9"]}
SMOKE = ["--seed", "3", "--total-steps", "300", "--eval-every", "150", "--eval-episodes", "2", "--batch-size", "32",
         "--log-every", "50"]


def train(script: str, dataset_id: str, cwd: Path):
    result = run_script(script, "--dataset-id", dataset_id, *SMOKE, *EXTRA_ARGS.get(script, []), cwd=cwd)
    assert result.returncode == 0, result.stderr[-3000:]
    runs = list((cwd / "runs").iterdir())
    assert len(runs) == 1, runs
    return result, runs[0]


def scalars(run_dir: Path) -> dict:
    acc = EventAccumulator(str(run_dir))
    acc.Reload()
    return {tag: [e.value for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def assert_clear_error(result, *fragments: str):
    """One short message on stderr, no traceback, a non-zero exit."""
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    assert len(result.stderr.strip().splitlines()) <= 3, result.stderr
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr


@pytest.mark.parametrize("script", SCRIPTS)
def test_train_log_checkpoint_and_evaluate(script, minari_root, tmp_path):
    result, run_dir = train(script, HOPPER_ID, tmp_path)
    exp_name = script[:-3]
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
    assert "final score" in result.stdout

    checkpoint = run_dir / f"{exp_name}.pt"
    assert checkpoint.is_file()
    evaluated = run_script(script, "--dataset-id", HOPPER_ID, "--checkpoint", str(checkpoint), "--eval-episodes", "2",
                           cwd=tmp_path)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert "normalized score" in evaluated.stdout
    assert len(list((tmp_path / "runs").iterdir())) == 1, "evaluating a checkpoint must not start a new run"

    # The checkpoint carries its own environment: --dataset-id does not change where it is evaluated.
    elsewhere = run_script(script, "--dataset-id", PENDULUM_ID, "--checkpoint", str(checkpoint), "--eval-episodes", "1",
                           cwd=tmp_path)
    assert elsewhere.returncode == 0, elsewhere.stderr[-3000:]
    assert f"trained on {HOPPER_ID}" in elsewhere.stdout and "Hopper-v5" in elsewhere.stdout, elsewhere.stdout


@pytest.mark.parametrize("script", SCRIPTS)
def test_bounded_actions_without_reference_scores(script, minari_root, tmp_path):
    """Pendulum: a 1-d action in [-2, 2] and no reference scores, so the raw return is logged and nothing else."""
    result, run_dir = train(script, PENDULUM_ID, tmp_path)
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


@pytest.mark.parametrize("script", SCRIPTS)
def test_user_errors_are_one_line(script, minari_root, tmp_path):
    assert_clear_error(run_script(script, "--dataset-id", CARTPOLE_ID, "--total-steps", "10", cwd=tmp_path), "Box")
    assert_clear_error(run_script(script, "--dataset-id", "test/hopper/nothing-v0", "--no-download", cwd=tmp_path),
                       "test/hopper/nothing-v0", "MINARI_DATASETS_PATH", HOPPER_ID)
    assert_clear_error(run_script(script, "--dataset-id", "no-such-id", "--no-download", cwd=tmp_path), "no-such-id")
    assert_clear_error(run_script(script, "--checkpoint", str(tmp_path / "missing.pt"), cwd=tmp_path), "missing.pt")
    not_a_checkpoint = tmp_path / "notes.pt"
    not_a_checkpoint.write_text("not a checkpoint")
    assert_clear_error(run_script(script, "--checkpoint", str(not_a_checkpoint), cwd=tmp_path), "notes.pt")
    if script in BAD_ARGS:
        assert_clear_error(run_script(script, *BAD_ARGS[script], cwd=tmp_path), BAD_ARGS[script][0])
    assert not (tmp_path / "runs").exists(), "a refused run must not leave a run folder behind"


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
