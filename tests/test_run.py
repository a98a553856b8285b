"""benchmark/run.py on a tiny grid (two scripts, the test Hopper dataset, two seeds, a hundred steps), then
benchmark/report.py on what it wrote; a sweep stopped by --time-limit and continued by the next call; and the same kind
of run through a local Ray instance."""

import json
import os
import re
import shlex
import sys

import pytest
from conftest import HOPPER_ID, ROOT, run_script
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

sys.path.insert(0, str(ROOT / "benchmark"))
import report  # noqa: E402

TINY = "--total-steps 100 --eval-every 50 --eval-episodes 1 --batch-size 32 --log-every 50 --no-save-model"


def sweep(out, *extra, seeds=("1", "2")):
    return run_script("benchmark/run.py", "--scripts", "iql.py", "awr.py", "--dataset-ids", HOPPER_ID,
                      "--seeds", *seeds, f"--args={TINY}", "--workers", "2", "--threads", "1", "--out", str(out),
                      *extra, cwd=ROOT, timeout=600)


def test_sweep_resumes_and_reports(minari_root, tmp_path):
    pytest.importorskip("matplotlib", reason="the curves image needs pip install -r benchmark/requirements.txt")
    out = tmp_path / "sweep"
    first = sweep(out)
    assert first.returncode == 0, first.stdout + first.stderr
    markers = sorted(p.name for p in (out / "done").iterdir())
    assert markers == sorted(f"test-hopper-random-v0__{s}__{seed}.json" for s in ("iql", "awr") for seed in (1, 2))
    assert len(list((out / "runs").iterdir())) == 4
    stamps = {p: p.stat().st_mtime_ns for p in (out / "done").iterdir()}

    # A second call finds every run finished and starts nothing; a third seed is the only new run.
    again = sweep(out)
    assert again.returncode == 0 and "4 already finished" in again.stdout and "0 to run" in again.stdout
    more = sweep(out, seeds=("1", "2", "3"))
    assert more.returncode == 0 and "4 already finished" in more.stdout and "2 to run" in more.stdout
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items())
    assert len(list((out / "runs").iterdir())) == 6

    report.main(report.Args(logdir=out / "runs", name="tiny", out=tmp_path / "results"))
    rows = (tmp_path / "results" / "tiny.md").read_text().splitlines()[2:]
    assert sorted(r.split(" | ")[1] for r in rows) == ["awr", "iql"]
    assert all(r.split(" | ")[2] == "100" and len(r.split(" | ")[4].split(", ")) == 3 for r in rows)
    png = tmp_path / "results" / "tiny_curves.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000


def test_failed_run_is_not_marked_finished(minari_root, tmp_path):
    out = tmp_path / "sweep"
    result = run_script("benchmark/run.py", "--scripts", "iql.py", "--dataset-ids", HOPPER_ID, "--seeds", "1",
                        f"--args={TINY}", "--variants", "bad: --expectile 1.5", "--out", str(out), cwd=ROOT)
    assert result.returncode == 1 and "1 run(s) failed" in result.stderr
    assert not list((out / "done").iterdir())
    assert "--expectile must lie in (0, 1)" in (out / "logs" / "test-hopper-random-v0__iql_bad__1.log").read_text()


def test_time_limit_cuts_runs_and_the_same_command_resumes_them(minari_root, tmp_path):
    """A run stopped by --time-limit keeps its checkpoint under cut/ (exit code 3); the same command again continues it
    from that checkpoint (exit code 0), and its curve covers every step once."""
    def sweep_args(out, steps):
        return ("benchmark/run.py", "--scripts", "iql.py", "--dataset-ids", HOPPER_ID, "--seeds", "1", "--threads", "1",
                f"--args=--total-steps {steps} --batch-size 32 --eval-every 500 --eval-episodes 1 --log-every 50 "
                "--no-cuda", "--out", str(out))

    # Stop the run a few seconds into its training: about 1000 of its 3000 steps on two busy CPU cores. A machine that
    # has not begun training by then (the run exits unsaved and counts as not started) gets more time; one so fast
    # that the run finished, or was stopped only as it ended, gets a longer run.
    steps, stop_after = 3000, 8
    for attempt in range(4):
        out = tmp_path / f"sweep{attempt}"
        first = run_script(*sweep_args(out, steps), "--time-limit", str(stop_after + 2), "--stop-grace", "2", cwd=ROOT)
        log = out / "logs" / "test-hopper-random-v0__iql__1.log"
        stopped = re.search(r"SIGTERM at step (\d+)/", log.read_text() if log.exists() else "")
        if stopped and int(stopped.group(1)) < steps:
            break
        if first.returncode == 3 and "1 run(s) not started" in first.stdout:
            stop_after *= 2
        else:
            steps *= 4
    assert first.returncode == 3, first.stdout[-2000:] + first.stderr[-2000:]
    assert "1 run(s) cut off" in first.stdout and "Run the same command again" in first.stdout
    assert not list((out / "runs").iterdir()) and not list((out / "done").iterdir())
    folder = next(p for p in (out / "cut").iterdir() if p.is_dir())
    assert folder.name.startswith("test-hopper-random-v0__iql__1__") and (folder / "iql.pt").is_file()
    cut_step = int(stopped.group(1))
    # The log names the sweep's command to continue the run, not the temporary copy of the script that ran.
    command = shlex.join(["python", str(ROOT / "benchmark" / "run.py"), *sweep_args(out, steps)[1:], "--time-limit",
                          str(stop_after + 2), "--stop-grace", "2"])
    lines = log.read_text().splitlines()
    assert lines[-1] == f"run.py: cut at step {stopped.group(1)}/{steps}: run the same command again (in {ROOT}) to " \
                        f"resume it: {command}"
    assert f"SIGTERM at step {cut_step}/{steps}: checkpoint saved; the run is now in {folder}" in lines
    assert "offrl_run_" not in log.read_text()

    # The grid's arguments must stay those the cut run started with; the same ones resume it, with --resume alone.
    other = run_script(*sweep_args(out, steps + 1), "--dry-run", cwd=ROOT)
    assert other.returncode == 2 and "was started with other arguments" in other.stderr, other.stdout + other.stderr
    dry = run_script(*sweep_args(out, steps), "--dry-run", cwd=ROOT)
    assert dry.returncode == 0 and f"python iql.py --resume {folder}" in dry.stdout, dry.stdout + dry.stderr

    second = run_script(*sweep_args(out, steps), cwd=ROOT)
    assert second.returncode == 0, second.stdout[-2000:] + second.stderr[-2000:]
    assert not list((out / "cut").iterdir()) and (out / "done" / "test-hopper-random-v0__iql__1.json").exists()
    resumed = log.read_text().split("run.py: resuming")[1]
    first_step = int(re.search(r"^step (\d+)/", resumed, re.MULTILINE).group(1))
    assert first_step == min((cut_step // 500 + 1) * 500, steps) and f"step {steps}/{steps}" in resumed
    run_dir = out / "runs" / folder.name
    assert len(list(run_dir.glob("events.out.tfevents.*"))) >= 2 and (run_dir / "iql.pt").is_file()
    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    acc.Reload()
    for tag, every in (("eval/normalized_score", 500), ("losses/critic_loss", 50)):  # and at the last step
        assert [e.step for e in acc.Scalars(tag)] == sorted({*range(every, steps + 1, every), steps}), tag
    third = run_script(*sweep_args(out, steps), cwd=ROOT)
    assert third.returncode == 0 and "1 already finished" in third.stdout and "0 to run" in third.stdout


def test_variants_are_named_and_names_are_distinct(tmp_path):
    def dry(*variants):
        return run_script("benchmark/run.py", "--scripts", "iql.py", "awr.py", "--seeds", "1", "--args=--tau 0.01",
                          "--variants", *variants, "--out", str(tmp_path), "--dry-run", cwd=ROOT)

    result = dry(": ", "bc: --temperature 0")
    assert result.returncode == 0 and "4 to run" in result.stdout
    lines = result.stdout.split("\n")
    assert sum("--exp-name iql_bc" in line and "--tau 0.01 --temperature 0" in line for line in lines) == 1
    for bad, message in ((("a: --tau 1", "a: --tau 2"), "share the name 'a'"), (("bc --temperature 0",), "NAME: ARGS")):
        result = dry(*bad)
        assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr


def test_ray_backend_runs_the_grid(minari_root, tmp_path):
    pytest.importorskip("ray", reason="Ray is optional: pip install -r benchmark/requirements.txt")
    out = tmp_path / "sweep"
    # No --ray-address: run.py starts a Ray instance on this machine, which is what a cluster's head node runs.
    result = run_script("benchmark/run.py", "--scripts", "awr.py", "--dataset-ids", HOPPER_ID, "--seeds", "1", "2",
                        f"--args={TINY}", "--backend", "ray", "--out", str(out), cwd=ROOT, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    runs = sorted(p.name for p in (out / "runs").iterdir())
    assert [r.rsplit("__", 1)[0] for r in runs] == [f"test-hopper-random-v0__awr__{s}" for s in (1, 2)]
    marker = json.loads((out / "done" / "test-hopper-random-v0__awr__1.json").read_text())
    assert marker["threads"] == 1 and "--total-steps" in marker["argv"]
    assert "step 100/100" in (out / "logs" / "test-hopper-random-v0__awr__2.log").read_text()
    assert os.listdir(out / "runs" / runs[0])  # the TensorBoard event file came back from the task


def test_runs_are_packed_on_the_visible_gpus(tmp_path):
    """--runs-per-gpu N runs N at a time on each GPU, one CUDA_VISIBLE_DEVICES each; without a GPU it is refused."""
    argv = ("benchmark/run.py", "--scripts", "iql.py", "--seeds", "1", "2", "3", "4", "--runs-per-gpu", "2", "--out",
            str(tmp_path), "--dry-run")
    packed = run_script(*argv, cwd=ROOT, env={"CUDA_VISIBLE_DEVICES": "0,1"})
    assert packed.returncode == 0 and "4 to run" in packed.stdout, packed.stdout + packed.stderr
    assert [line.split()[0] for line in packed.stdout.splitlines()[1:]] == [f"CUDA_VISIBLE_DEVICES={g}" for g in
                                                                           "0101"]
    refused = run_script(*argv, cwd=ROOT, env={"CUDA_VISIBLE_DEVICES": ""})
    assert refused.returncode == 2 and "needs" in refused.stderr and "GPU" in refused.stderr
