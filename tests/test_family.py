"""What the five scripts share. Each file stands alone, so the data, evaluation and harness code is copied into every
one of them; the first tests keep the copies identical (a fix made in one file must be made in all five), the others
check the shared pieces once, on iql.py's copy."""

import ast
import json

import gymnasium as gym
import iql
import numpy as np
import pytest
import torch
from conftest import PENDULUM_ID, ROOT

SCRIPTS = ["iql.py", "cql_continuous.py", "bcq.py", "awr.py", "mopo.py"]
# fqe.py evaluates a policy instead of training one: it carries the data, evaluation and harness functions it needs,
# no checkpoints, resume or policy export, and each one it carries must be the same text as the five's, except the
# loading: fqe.py takes both a Box and a Discrete action space, so its loading plays the same roles with other text.
FQE, FQE_OWN = "fqe.py", {"load_minari", "load_data"}
# dt.py learns from sequences, not transitions: its data, evaluation, export and checkpoint evaluation play the same
# roles under the same names with other text; every other shared function is the same text as the five's.
DT, DT_OWN = "dt.py", {"transition_table", "minibatch", "evaluate", "export_policy", "evaluate_checkpoint"}
# bcq_discrete.py and cql_discrete.py take Discrete actions: loading, evaluation, export and checkpoint evaluation play
# the same roles under the same names with other text; every other shared function is the same text as the five's.
DISCRETE = ["bcq_discrete.py", "cql_discrete.py"]
DISCRETE_OWN = {"load_minari", "load_data", "evaluate", "export_policy", "evaluate_checkpoint"}
SHARED = ["episodes_to_transitions", "load_data", "transition_table", "minibatch",  # data
          "make_eval_envs", "evaluate", "normalized_score",  # evaluation
          "fail", "validate", "load_minari", "save_checkpoint", "export_policy", "load_checkpoint", "restore",  # harness
          "stop_on_signals", "cuda_graph", "evaluate_checkpoint"]
# Shared where present: the allocator setting is kept only by the scripts whose speed it changes.
SHARED_WHERE_PRESENT = ["keep_freed_memory", "online_minibatch", "collect"]


def top_level(script: str) -> dict:
    source = (ROOT / script).read_text()
    return {node.name: ast.get_source_segment(source, node) for node in ast.parse(source).body
            if isinstance(node, (ast.FunctionDef, ast.ClassDef))}


def main_loop_blocks(script: str) -> dict:
    """The logging, evaluation, checkpoint and stop blocks of the training loop, and everything after the loop, as
    source text."""
    source = (ROOT / script).read_text()
    main = next(n for n in ast.parse(source).body if isinstance(n, ast.If) and "__main__" in ast.unparse(n.test))
    loop_index, loop = next((i, n) for i, n in enumerate(main.body) if isinstance(n, ast.For))
    blocks = {f"after the loop, line {i}": ast.get_source_segment(source, n) for i, n in
              enumerate(main.body[loop_index + 1:])}
    for node in loop.body:
        test = ast.unparse(node.test) if isinstance(node, ast.If) else ""
        for every in ("args.log_every", "args.eval_every", "args.save_every", "stopping"):
            if every in test:
                blocks[test] = ast.get_source_segment(source, node)
    return blocks


@pytest.mark.parametrize("name", SHARED + SHARED_WHERE_PRESENT)
def test_shared_functions_are_the_same_text_in_every_script(name):
    copies = {script: top_level(script).get(name) for script in SCRIPTS + [FQE] * (name not in FQE_OWN)
              + [DT] * (name not in DT_OWN) + DISCRETE * (name not in DISCRETE_OWN)}
    present = {script: text for script, text in copies.items() if text is not None}
    if name in SHARED:
        missing = sorted(set(SCRIPTS + [DT] * (name not in DT_OWN) + DISCRETE * (name not in DISCRETE_OWN)) - set(present))
        assert not missing, f"{name} is missing from {missing}"
    assert present, name
    reference = present["iql.py"] if "iql.py" in present else next(iter(present.values()))
    drifted = [script for script, text in present.items() if text != reference]
    assert not drifted, f"{name} differs from the first copy in {drifted}: make the same change in every script"


def test_the_loops_log_and_evaluate_with_the_same_text():
    reference = main_loop_blocks("iql.py")
    assert len(reference) == 4 + 3, sorted(reference)  # four blocks in the loop, three statements after it
    for script in SCRIPTS[1:] + DISCRETE:
        assert main_loop_blocks(script) == reference, script
    log_block = [k for k in reference if "args.log_every" in k]
    assert [main_loop_blocks(FQE)[k] for k in log_block] == [reference[k] for k in log_block]
    # dt.py evaluates each target return in turn: all but its evaluation block are the same text
    assert {k: v for k, v in main_loop_blocks(DT).items() if "args.eval_every" not in k} == {
        k: v for k, v in reference.items() if "args.eval_every" not in k}


def test_fqe_carries_the_data_evaluation_and_loading_it_needs():
    carried = set(top_level(FQE)) & set(SHARED)
    assert {"episodes_to_transitions", "load_data", "transition_table", "make_eval_envs", "evaluate", "fail",
            "validate", "load_minari", "cuda_graph"} <= carried, sorted(carried)


def test_each_script_reads_in_the_conventional_order():
    """Args, data, networks, the algorithm, evaluation, the harness, main: a reader meets the algorithm first."""
    for script in [*SCRIPTS, FQE, DT, *DISCRETE]:
        headers = [line.split("----")[1].strip() for line in (ROOT / script).read_text().splitlines()
                   if line.startswith("# ---- ")]
        names = [h.split(":")[0].split(" ")[0].lower() for h in headers]
        assert names == ["data", "networks", "the", "evaluation", "harness", "main"], (script, headers)


def fake_task(env_id: str, max_episode_steps, obs_dim: int, low, high) -> dict:
    spec = gym.spec(env_id)
    spec_json = json.loads(spec.to_json())
    spec_json["max_episode_steps"] = max_episode_steps
    return {"dataset_id": "test", "env_spec": json.dumps(spec_json), "ref_min_score": None, "ref_max_score": None,
            "obs_mean": torch.zeros(obs_dim), "obs_std": torch.ones(obs_dim),
            "action_low": torch.tensor(low), "action_high": torch.tensor(high)}


def test_batched_evaluation_returns_what_episodes_one_by_one_return():
    """All episodes stepped together (one policy call per time step) against one environment at a time: the same
    starts (seed + i), the same actions for each episode, the same returns, though episodes end at different times."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(11, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3), torch.nn.Tanh())
    task = fake_task("Hopper-v5", 1000, 11, [-1.0] * 3, [1.0] * 3)
    batched = iql.evaluate(net, iql.make_eval_envs(task, 4, None), task, seed=7)
    single = [iql.evaluate(net, iql.make_eval_envs(task, 1, None), task, seed=7 + i)[0] for i in range(4)]
    np.testing.assert_allclose(batched, single, rtol=1e-6)
    assert len(set(np.round(batched, 3))) == 4  # different starts, different episodes


def test_evaluation_unscales_actions_and_stops_at_1000_steps_without_a_time_limit():
    """Pendulum's action box is [-2, 2]: the policy's [-1, 1] maps onto it. With the time limit taken out of its
    spec, an episode (which never terminates) still ends, after 1000 policy calls."""
    task = fake_task("Pendulum-v1", None, 3, [-2.0], [2.0])
    seen, calls = [], []

    class Recorder(gym.Wrapper):
        def step(self, action):
            seen.append(float(action[0]))
            return super().step(action)

    policy = lambda obs: calls.append(len(obs)) or torch.full((len(obs), 1), 0.5)  # noqa: E731
    returns = iql.evaluate(policy, [Recorder(env) for env in iql.make_eval_envs(task, 2, None)], task, seed=0)
    assert len(calls) == 1000 and set(calls) == {2} and len(returns) == 2
    assert set(seen) == {1.0}  # -2 + (0.5 + 1) / 2 * 4


def test_loaded_actions_are_rescaled_to_the_unit_box(minari_root):
    data, task = iql.load_data(iql.Args(dataset_id=PENDULUM_ID, download=False), torch.device("cpu"))
    assert task["action_low"].tolist() == [-2.0] and task["action_high"].tolist() == [2.0]
    assert data["actions"].min() >= -1.0 and data["actions"].max() <= 1.0 and data["actions"].min() < -0.9
    assert json.loads(task["env_spec"])["max_episode_steps"] == 200  # the time limit travels with the task
    table, split = iql.transition_table(data, task)
    obs = table[:, :split[0]]
    torch.testing.assert_close(obs.mean(0), torch.zeros(3), atol=1e-4, rtol=0)  # standardized observations
    assert split == [3, 1, 1, 3, 1] and len(table) == len(data["rewards"])
