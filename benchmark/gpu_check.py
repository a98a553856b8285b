"""The GPU checks of the scripts' CUDA-graph training step, in one call on a GPU machine. benchmark/gpu_check.sh
installs what such a machine may lack and rebuilds the dataset first; then:

    python benchmark/gpu_check.py --out results/                     # every part, most important first
    python benchmark/gpu_check.py --parts speed e2e --out results/   # some of them

Parts (each prints a summary; --out gets results.json, curves.png and logs.tar.gz, the parts' full output, a few
files in all since the device tool brings back at most eight; runs and sweeps stay under --work):
  same-math  every script's step (AWR: its policy step and its value step; the discrete scripts' with four actions;
             --steps picks some) run 50 times captured in a CUDA graph and 50 times eagerly, from the same seed: the
             same random draws on both sides (the CUDA generator hands a graph replay the offsets the eager step
             would use), so the losses and learning rates must agree to 1e-4 relative.
  e2e        iql.py for 200,000 steps on local/hopper/medium-replay-v0 with the default evaluation schedule, timed.
  speed      benchmark/speed.py on CUDA, graphed and eager (--no-cudagraphs), and d3rlpy's steps, eager and with
             compile_graph (benchmark/peers/d3rlpy_peer.py).
  packed     iql.py alone, then 5 runs through run.py --runs-per-gpu 5: their updates/s together against one alone.
  curves     2000 steps of every script on local/hopper/medium-replay-v0, seed 1, with and without --cudagraphs: both
             loss curves, the warm-up steps before the capture included (curves.json, curves.png).
  resume     every script for 400 steps straight, against the same run stopped by SIGTERM at step 200 (the script
             sends it to itself at its step-200 evaluation) and resumed: the step is captured again after the resume,
             and the losses logged after it must agree with the straight run's to 1e-4 relative, the same-math bound
             (resume.json); on CPU they agree bit for bit (tests/test_smoke.py).
  online     fine-tuning: iql.py and cql_continuous.py --calql for 200 offline updates, then 300 environment steps with
             half of each batch from the online rows, captured and eager: the captured step reads a table that grows
             outside the graph (a device count of its rows), so the losses logged must agree to 1e-4 relative up to
             the switch and over the first online steps (after them the simulator can amplify rounding differences);
             online.json.
  smoke      the smoke tests' training runs, checkpoint evaluations and exported policies (traced on the GPU, loaded
             on the CPU), fqe.py's, the fine-tuning and dt.py's end-to-end tests, on the GPU.
--budget stops starting parts once that many seconds have passed (the device tool gives each call 10 minutes).
"""

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import tyro

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmark"))
sys.path.insert(0, str(ROOT))
PARTS = ("same-math", "resume", "online", "e2e", "packed", "speed", "curves", "smoke")
DATASET = "local/hopper/medium-replay-v0"


@dataclass
class Args:
    parts: tuple[str, ...] = PARTS
    out: Path = Path("gpu_check")
    work: Path = Path("/tmp/gpu_check_work")
    """runs, sweeps and logs; only a summary of them goes to --out"""
    budget: float = 560.0
    """seconds after which no further part is started"""
    device: str = "cuda"
    """cuda; cpu runs the same code paths eagerly, for a dry run of this script"""
    e2e_steps: int = 200_000
    packed_steps: int = 30_000
    curve_steps: int = 2000
    steps: tuple[str, ...] = ("iql", "cql_continuous", "bcq", "awr", "awr_value", "mopo", "fqe", "bcq_discrete",
                              "cql_discrete", "dt")
    """the training steps same-math compares (benchmark/speed.py's names)"""


def run(cmd: list, log: Path, timeout: float, env: dict | None = None, cwd: Path = ROOT) -> tuple[int, str, float]:
    """A subprocess (from the repository root unless cwd says otherwise); its output goes to log. Returns exit code,
    output tail and seconds."""
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
        rc, text = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as e:
        rc, text = 124, f"{e.stdout or ''}{e.stderr or ''}\n(stopped after {timeout:.0f} s)"
        text = text if isinstance(text, str) else text.decode(errors="replace")
    log.write_text(f"$ {' '.join(map(str, cmd))}\n{text}")
    return rc, text[-3000:], time.perf_counter() - start


def same_math(args: Args) -> dict:
    import speed

    device, results = torch.device(args.device), {}
    for name in args.steps:
        try:
            results[name] = compare_steps(name, args, device, speed)
        except Exception as e:  # a step that cannot be captured: say which, check the others
            results[name] = {"error": f"{type(e).__name__}: {e}", "pass": False}
            print(f"same-math {name}: {results[name]['error']}", flush=True)
    return results


def compare_steps(name: str, args: Args, device: torch.device, speed) -> dict:
    traces = {}
    for graphed in (False, True):
        torch.manual_seed(0)
        config = speed.Args(device=args.device, cudagraphs=graphed, dataset_size=100_000,
                            batch_size={"bcq": 100, "dt": 64}.get(name, 256))
        eager, module, script_args = speed.STEPS[name](config, device)
        step = module.cuda_graph(eager, script_args, device)
        rows = []
        for _ in range(50):
            out = step()
            rows.append({k: float(v) for k, v in (out if isinstance(out, dict) else {"loss": out}).items()})
        traces[graphed] = rows
    worst = {}
    for tag in traces[False][0]:
        eager_values = [r[tag] for r in traces[False]]
        graph_values = [r[tag] for r in traces[True]]
        worst[tag] = max(abs(g - e) / max(abs(e), 1e-6) for g, e in zip(graph_values, eager_values))
    # The criterion holds for the losses and learning rates; values/* diagnostics near 0 (a fresh critic's Q) are
    # reported but not judged, since a relative difference says little there.
    judged = {k: v for k, v in worst.items() if k.startswith("losses/") or k.endswith(("_lr", "learning_rate"))
              or k == "loss"}
    result = {"max_relative_difference": worst, "eager": traces[False], "graphed": traces[True],
              "pass": all(v <= 1e-4 for v in judged.values())}
    print(f"same-math {name}: {'pass' if result['pass'] else 'FAIL'}, largest relative difference of a loss or "
          f"learning rate {max(judged.values()):.2e} ({max(judged, key=judged.get)}), of any value "
          f"{max(worst.values()):.2e} ({max(worst, key=worst.get)})", flush=True)
    return result


SIGTERM_AT_EVALUATION = """
import os, runpy, signal, sys
from torch.utils.tensorboard import SummaryWriter
add_scalar, stop_at = SummaryWriter.add_scalar, int(sys.argv[1])
def patched(self, tag, value, step=None, *args, **kwargs):
    add_scalar(self, tag, value, step, *args, **kwargs)
    if tag == "eval/return" and step == stop_at:
        os.kill(os.getpid(), signal.SIGTERM)
SummaryWriter.add_scalar = patched
script, sys.argv = sys.argv[2], sys.argv[2:]
runpy.run_path(script, run_name="__main__")
"""


def resume(args: Args) -> dict:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    def losses(run_dir: Path) -> dict:
        acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
        acc.Reload()
        return {t: {e.step: e.value for e in acc.Scalars(t)} for t in acc.Tags()["scalars"] if t.startswith("losses/")}

    results = {}
    for script in ("iql", "cql_continuous", "bcq", "awr", "mopo"):
        argv = [str(ROOT / f"{script}.py"), "--dataset-id", DATASET, "--seed", "1", "--total-steps", "400",
                "--log-every", "25", "--eval-every", "200", "--eval-episodes", "2", "--no-download"]
        argv += {"mopo": ["--dynamics-max-epochs", "2", "--rollout-freq", "100"], "awr": ["--policy-steps", "100"],
                 "cql_continuous": ["--hidden-dims", "256", "256"]}.get(script, [])
        dirs = {}
        for label in ("straight", "stopped"):
            work = args.work / "resume" / f"{script}_{label}"
            work.mkdir(parents=True, exist_ok=True)
            cmd = [sys.executable, *argv] if label == "straight" else [sys.executable, "-c", SIGTERM_AT_EVALUATION,
                                                                      "200", *argv]
            rc, _, _ = run(cmd, work / "log.txt", 300, cwd=work)
            run_dir = next((work / "runs").iterdir())
            if label == "stopped":
                rc = (rc, run([sys.executable, argv[0], "--resume", str(run_dir)], work / "resume_log.txt", 300,
                              cwd=work)[0])
            dirs[label] = (rc, run_dir)
        straight, resumed = losses(dirs["straight"][1]), losses(dirs["stopped"][1])
        gaps = {tag: max(abs(resumed[tag][k] - v) / max(abs(v), 1e-6) for k, v in values.items() if k > 200)
                for tag, values in straight.items()}
        results[script] = {"rc": [dirs["straight"][0], dirs["stopped"][0]], "largest_relative_gap": gaps,
                           "pass": dirs["stopped"][0] == (143, 0) and max(gaps.values()) <= 1e-4}
        print(f"resume {script}: {'pass' if results[script]['pass'] else 'FAIL'} (exit codes {results[script]['rc']}), "
              "largest relative gap after the resume per loss: " + ", ".join(f"{t.split('/')[1]} {v:.1e}"
                                                                              for t, v in gaps.items()), flush=True)
    (args.out / "resume.json").write_text(json.dumps(results, indent=1))
    return results


def e2e(args: Args) -> dict:
    rc, tail, seconds = run([sys.executable, "iql.py", "--dataset-id", DATASET, "--total-steps", str(args.e2e_steps),
                             "--no-download", "--no-save-model"], args.work / "e2e.txt", 400)
    print(f"e2e: iql.py {args.e2e_steps} steps with evaluation in {seconds:.0f} s (rc {rc})\n{tail[-400:]}", flush=True)
    return {"rc": rc, "seconds": seconds, "steps": args.e2e_steps}


def speed_part(args: Args) -> dict:
    results, env = {}, {"OMP_NUM_THREADS": "4"}
    ours = ["iql", "cql_continuous", "awr", "awr_value", "mopo", "fqe"]
    for graphed in (True, False):
        flag = [] if graphed else ["--no-cudagraphs"]
        steps = ["--steps", "3000"] if graphed else ["--steps", "500"]
        rows = [(ours, []), (["bcq"], ["--batch-size", "100"])]
        rows += [(["fqe"], ["--fqe-bootstrap", "10"])]  # fqe.py's default: ten bootstrap fits beside the full-data fit
        rows += [] if graphed else [(["mopo_rollout"], ["--warmup", "3", "--steps", "20"])]  # eager in mopo.py too
        for scripts, extra in rows:
            cmd = [sys.executable, "benchmark/speed.py", "--device", args.device, "--scripts", *scripts, *flag,
                   *steps, *extra]
            rc, tail, _ = run(cmd, args.work / f"speed_{'graph' if graphed else 'eager'}_{scripts[0]}.txt", 300, env)
            results[f"{'graph' if graphed else 'eager'}_{scripts[0]}"] = tail
            print(tail[-1200:], flush=True)
    for compiled, algos in ((False, ("iql", "cql", "bcq")), (True, ("iql",))):  # compiling takes minutes per algo
        for algo in algos:
            cmd = [sys.executable, "benchmark/peers/d3rlpy_peer.py", "--algo", algo, "--speed", "--dataset-id",
                   DATASET, "--device", f"{args.device}:0", "--warmup", "30", "--steps", "300"]
            cmd += ["--compile-graph"] if compiled else []
            rc, tail, seconds = run(cmd, args.work / f"d3rlpy_{algo}{'_compiled' * compiled}.txt", 120, env)
            line = [x for x in tail.splitlines() if x.startswith("d3rlpy")] or [f"rc {rc}: {tail[-300:]}"]
            results[f"d3rlpy_{algo}{'_compiled' * compiled}"] = line[-1]
            print(f"{line[-1]} ({seconds:.0f} s)", flush=True)
    return results


def packed(args: Args) -> dict:
    common = [sys.executable, "benchmark/run.py", "--scripts", "iql.py", "--dataset-ids", DATASET,
              f"--args=--total-steps {args.packed_steps} --eval-every {args.packed_steps} --eval-episodes 1 "
              "--no-save-model"]
    results = {}
    for label, seeds, per_gpu in (("alone", ["1"], "1"), ("packed", ["1", "2", "3", "4", "5"], "5")):
        rc, tail, seconds = run([*common, "--seeds", *seeds, "--runs-per-gpu", per_gpu, "--out",
                                 str(args.work / f"sweep_{label}")], args.work / f"packed_{label}.txt", 300)
        summary = [x for x in tail.splitlines() if "updates/s per run" in x or x.startswith("MPS")]
        results[label] = {"rc": rc, "seconds": seconds, "summary": summary}
        print(f"packed {label}: rc {rc}, {seconds:.0f} s: " + " / ".join(summary), flush=True)
    return results


def curves(args: Args) -> dict:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    jobs, results = [], {}
    for script in ("iql", "cql_continuous", "bcq", "awr", "mopo"):
        for graphed in (True, False):
            work = args.work / "curve_runs" / f"{script}_{'graph' if graphed else 'eager'}"
            work.mkdir(parents=True, exist_ok=True)
            cmd = [sys.executable, str(ROOT / f"{script}.py"), "--dataset-id", DATASET, "--seed", "1",
                   "--total-steps", str(args.curve_steps), "--log-every", "50", "--eval-every", str(args.curve_steps),
                   "--eval-episodes", "2", "--no-download", "--no-save-model"]
            cmd += [] if graphed else ["--no-cudagraphs"]
            cmd += ["--dynamics-max-epochs", "2"] if script == "mopo" else []
            log = open(work / "log.txt", "w")
            proc = subprocess.Popen(cmd, cwd=work, stdout=log, stderr=subprocess.STDOUT,
                                    env={**os.environ, "OMP_NUM_THREADS": "1"})
            jobs.append((script, graphed, work, log, proc))
    for script, graphed, work, log, proc in jobs:
        proc.wait(timeout=300)
        log.close()
        acc = EventAccumulator(str(next((work / "runs").iterdir())), size_guidance={"scalars": 0})
        acc.Reload()
        tags = [t for t in acc.Tags()["scalars"] if t.startswith(("losses/", "eval/", "charts/actor_lr"))]
        results.setdefault(script, {})["graph" if graphed else "eager"] = {
            tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in tags}
    for script, modes in results.items():
        gaps = {tag: max(abs(g[1] - e[1]) / max(abs(e[1]), 1e-6) for g, e in zip(modes["graph"][tag], values))
                for tag, values in modes["eager"].items() if tag.startswith("losses/")}
        print(f"curves {script}: graphed against eager over {args.curve_steps} steps, largest relative gap per loss: "
              + ", ".join(f"{t.split('/')[1]} {v:.1e}" for t, v in gaps.items()), flush=True)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, len(results), figsize=(4.5 * len(results), 3.5), squeeze=False)
        for ax, (script, modes) in zip(axes[0], results.items()):
            tag = "losses/critic_loss" if "losses/critic_loss" in modes["eager"] else "losses/actor_loss"
            for mode, style in (("eager", "-"), ("graph", "--")):
                ax.plot(*zip(*modes[mode][tag]), style, label=f"{mode}")
            ax.set_title(f"{script}: {tag}")
            ax.set_xlabel("gradient step")
            ax.legend()
        fig.tight_layout()
        fig.savefig(args.out / "curves.png", dpi=80)
    except ImportError:
        pass
    return results


def online(args: Args) -> dict:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    jobs, results, offline, steps = [], {}, 200, 300
    for script, extra in (("iql", []), ("cql_continuous", ["--calql", "--hidden-dims", "256", "256"])):
        for graphed in (True, False):
            work = args.work / "online_runs" / f"{script}_{'graph' if graphed else 'eager'}"
            work.mkdir(parents=True, exist_ok=True)
            cmd = [sys.executable, str(ROOT / f"{script}.py"), "--dataset-id", DATASET, "--seed", "1", "--total-steps",
                   str(offline), "--online-steps", str(steps), "--online-ratio", "0.5", "--log-every", "25",
                   "--eval-every", str(offline + steps), "--eval-episodes", "2", "--no-download", *extra]
            log = open(work / "log.txt", "w")
            jobs.append((script, graphed, work, log, subprocess.Popen(
                cmd + ([] if graphed else ["--no-cudagraphs"]), cwd=work, stdout=log, stderr=subprocess.STDOUT,
                env={**os.environ, "OMP_NUM_THREADS": "1"})))
    for script, graphed, work, log, proc in jobs:
        rc = proc.wait(timeout=400)
        log.close()
        acc = EventAccumulator(str(next((work / "runs").iterdir())), size_guidance={"scalars": 0})
        acc.Reload()
        results.setdefault(script, {})["graph" if graphed else "eager"] = {"rc": rc, **{
            tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]
            if tag.startswith("losses/")}}
    for script, modes in results.items():
        near = {tag: max((abs(g[1] - e[1]) / max(abs(e[1]), 1e-6) for g, e in zip(modes["graph"][tag], values)
                          if e[0] <= offline + 50), default=float("nan"))
                for tag, values in modes["eager"].items() if tag != "rc"}
        modes["gaps_to_the_first_online_steps"] = near
        print(f"online {script}: exit codes {modes['graph']['rc']} (graph) {modes['eager']['rc']} (eager); largest "
              "relative gap per loss up to 50 steps past the switch: "
              + ", ".join(f"{t.split('/')[1]} {v:.1e}" for t, v in near.items()), flush=True)
    (args.out / "online.json").write_text(json.dumps(results, indent=1))
    return {s: {"gaps": m["gaps_to_the_first_online_steps"], "rc": [m["graph"]["rc"], m["eager"]["rc"]]}
            for s, m in results.items()}


def smoke(args: Args) -> dict:
    rc, tail, seconds = run([sys.executable, "-m", "pytest", "-q", "-n", "10", "-p", "no:cacheprovider",
                             "tests/test_smoke.py", "tests/test_fqe.py", "tests/test_finetune.py", "tests/test_dt.py",
                             "tests/test_discrete.py", "-k",
                             "train_log or bounded or exported or fqe or online or calql or hopper or pendulum "
                             "or beats or checkpoint_and_its"],
                            args.work / "smoke.txt", 300)
    print(f"smoke on {args.device}: rc {rc} in {seconds:.0f} s\n{tail[-600:]}", flush=True)
    return {"rc": rc, "seconds": seconds, "tail": tail[-1500:]}


def main(args: Args):
    args.out.mkdir(parents=True, exist_ok=True)
    args.work.mkdir(parents=True, exist_ok=True)
    start, done = time.perf_counter(), {}
    if args.device == "cuda":
        print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)
    for part in [p for p in PARTS if p in args.parts]:
        if time.perf_counter() - start > args.budget:
            print(f"{part}: not started, past the {args.budget:.0f} s budget", flush=True)
            continue
        part_start = time.perf_counter()
        fn = {"same-math": same_math, "resume": resume, "online": online, "e2e": e2e, "speed": speed_part,
              "packed": packed, "curves": curves, "smoke": smoke}[part]
        try:
            done[part] = fn(args)
        except Exception as e:  # one part's failure must not cost the others their device time
            done[part] = {"error": f"{type(e).__name__}: {e}"}
            print(f"{part}: {type(e).__name__}: {e}", flush=True)
        if part == "same-math" and all("error" in r for r in done[part].values() if isinstance(r, dict)):
            print("no step could be captured: the other parts would fail the same way, so they are not started")
            args.budget = 0
        print(f"[{part} took {time.perf_counter() - part_start:.0f} s]", flush=True)
        (args.out / "results.json").write_text(json.dumps(done, indent=1, default=str))
        logs = [str(p.relative_to(args.work)) for p in args.work.rglob("*") if p.suffix == ".txt"]
        if logs:
            subprocess.run(["tar", "czf", str(args.out.resolve() / "logs.tar.gz"), *logs], cwd=args.work)


if __name__ == "__main__":
    main(tyro.cli(Args))
