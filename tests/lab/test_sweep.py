"""W&B sweep configs: they parse, name real config keys, and the agent's command line runs; the local runner."""

import glob
import os
import subprocess
import sys

import pytest

from conftest import REPO, TINY_STUDENT
from lightning_distill.lab.sweep import SweepError, command_for, format_value, load_sweep, results_table, run_local, sample

SWEEPS = sorted(glob.glob(os.path.join(REPO, "experiments", "sweeps", "*.yaml")))


def _config_of(sweep):
    cmd = [str(c) for c in sweep["command"]]
    return os.path.join(REPO, cmd[cmd.index("fit") + 1])


@pytest.mark.parametrize("sweep_file, method", [("student.yaml", "prototype"), ("sikd.yaml", "sikd"), ("cmedl.yaml", "cmedl")])
def test_each_methods_sweep_searches_its_weight_in_a_config_of_that_method(sweep_file, method):
    from lightning_distill.config import load_config

    sweep = load_sweep(os.path.join(REPO, "experiments", "sweeps", sweep_file))
    assert load_config(_config_of(sweep)).distill.method == method
    assert "distill.weight" in sweep["parameters"] and sweep["metric"] == {"name": "val/dice", "goal": "maximize"}


@pytest.mark.parametrize("path", SWEEPS, ids=os.path.basename)
def test_sweep_parses_and_every_parameter_is_a_config_key(path):
    from lightning_distill.config import load_config

    sweep = load_sweep(path)
    assert sweep["metric"]["name"] == "val/dice" and "${args_no_hyphens}" in sweep["command"]
    config = _config_of(sweep)
    fixed = [c for c in sweep["command"][sweep["command"].index("fit") + 2:] if "=" in str(c) or str(c).startswith("~")]
    fixed = [c for c in fixed if not c.startswith("${")]
    for name, spec in sweep["parameters"].items():
        values = spec.get("values", [spec.get("value", spec.get("min"))])
        for v in values:  # every categorical value (or the range's lower end) is accepted by the config schema
            load_config(config, [*fixed, f"{name}={v}"])
    for point in sample(sweep, 5, seed=1):
        load_config(config, [*fixed, *(f"{k}={format_value(v)}" for k, v in point.items())])


@pytest.mark.parametrize("path", SWEEPS, ids=os.path.basename)
def test_command_is_exactly_what_a_wandb_agent_builds(path):
    wandb_utils = pytest.importorskip("wandb.sdk.launch.sweeps.utils")
    sweep = load_sweep(path)
    assert wandb_utils.load_sweep_config(path) == sweep  # wandb's own reader (used by `wandb sweep`) reads the same
    point = sample(sweep, 1, seed=3)[0]
    agent = wandb_utils.create_sweep_command_args({"args": {k: {"value": v} for k, v in point.items()}})
    ours = command_for(sweep, point)
    i = sweep["command"].index("${args_no_hyphens}") - (1 if "${env}" in sweep["command"] else 0)
    assert ours[i:i + len(point)] == agent["args_no_hyphens"]
    assert ours[0] == sys.executable and ours[1:3] == ["-m", "lightning_distill.cli"]


def test_sampled_student_trial_runs_through_the_cli_with_fast_dev_run(tmp_path, teacher_bank):
    """The exact argument list of a sampled point (plus tiny sizes and fast_dev_run) as a subprocess."""
    sweep = load_sweep(os.path.join(REPO, "experiments/sweeps/student.yaml"))
    point = dict(sample(sweep, 1, seed=0)[0], **{"model.name": "FPN"})  # an architecture other than the config's
    cmd = command_for(sweep, point) + [f"output_dir={tmp_path / 'trial'}", *TINY_STUDENT, "trainer.fast_dev_run=true",
                                       f"distill.prototypes={teacher_bank / 'prototypes.pt'}"]
    env = {**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1"}
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "trial" / "results.json").is_file()
    assert glob.glob(str(tmp_path / "trial" / "wandb" / "offline-run-*"))  # the command's logger=wandb, offline


def test_grid_and_random_sampling():
    grid = load_sweep(os.path.join(REPO, "experiments/sweeps/sikd.yaml"))
    points = sample(grid)
    assert len(points) == 3 * 2 * 2 and len({tuple(p.items()) for p in points}) == 12
    assert sample(grid, 5) == points[:5]
    rnd = load_sweep(os.path.join(REPO, "experiments/sweeps/student.yaml"))
    a, b = sample(rnd, 20, seed=0), sample(rnd, 20, seed=0)
    assert a == b and a != sample(rnd, 20, seed=1)
    lam = [p["distill.weight"] for p in a]
    assert all(0.1 <= v <= 10.0 for v in lam) and min(lam) < 1.0 < max(lam)  # log-uniform over two decades
    assert {p["model.name"] for p in sample(rnd, 40)} == {"Unet", "FPN", "DeepLabV3Plus"}
    with pytest.raises(SweepError, match="--count"):
        sample(rnd)


@pytest.mark.parametrize("text,match", [
    ("method: evolution\n", "method must be one of"),
    ("method: grid\nparameters:\n  optim.lr: {min: 0.1, max: 1}\n", "grid sweep needs"),
    ("parameters:\n  distill.prototypes: {values: [null, a]}\n", "null is not a usable"),
    ("parameters:\n  optim.lr: {distribution: log_uniform_values, min: 0, max: 1}\n", "min > 0"),
    ("command: [fit, experiments/student.yaml]\n", "args_no_hyphens"),
    ("command: [fit, '${args_json}', '${args_no_hyphens}']\n", "not supported"),
    ("metric: {name: val/dice, goal: up}\n", "goal"),
])
def test_sweep_errors_name_the_problem(tmp_path, text, match):
    parts = {"method": "method: random\n", "metric": "metric: {name: val/dice, goal: maximize}\n",
             "parameters": "parameters:\n  optim.lr: {values: [0.001]}\n",
             "command": "command: [fit, experiments/student.yaml, '${args_no_hyphens}']\n"}
    for key in list(parts):
        if key + ":" in text:
            parts[key] = ""
    p = tmp_path / "bad.yaml"
    p.write_text(text + "".join(parts.values()))
    with pytest.raises(SweepError, match=match):
        load_sweep(p)


def test_local_sweep_runs_trials_and_writes_one_table(tmp_path):
    """A 2-point grid of tiny baseline runs through `lightning-distill sweep --local`."""
    from lightning_distill.cli import main

    sweep = tmp_path / "tiny.yaml"
    tiny = ", ".join(f"'{o}'" for o in TINY_STUDENT if "max_steps" not in o)
    sweep.write_text(
        "name: tiny\nmethod: grid\nmetric: {name: val/dice, goal: maximize}\n"
        "parameters:\n  optim.lr: {values: [0.001, 0.003]}\n  trainer.max_steps: {value: 2}\n"
        f"command: ['${{env}}', '${{interpreter}}', -m, lightning_distill.cli, fit, {REPO}/experiments/baseline.yaml, "
        f"{tiny}, '${{args_no_hyphens}}']\n")
    out = tmp_path / "out"
    assert main(["sweep", str(sweep), "--local", "--out", str(out), "pictures=0"]) == 0
    table = (out / "results.md").read_text()
    assert table.count("| trial_00") == 2 and "| optim.lr | trainer.max_steps | val/dice |" in table
    from lightning_distill.lab.benchmark import read_records

    recs = read_records(out / "trials.jsonl")
    assert [r["returncode"] for r in recs] == [0, 0] and all(r["value"] is not None for r in recs)
    assert recs[0]["command"][-1] == "pictures=0" and "optim.lr=0.001" in recs[0]["command"]
    assert results_table(load_sweep(sweep), recs).splitlines()[0].startswith("Sweep")
    # dry run: commands only
    records = run_local(sweep, None, tmp_path / "dry", dry_run=True, log=lambda *a: None)
    assert records == [] and not (tmp_path / "dry" / "trials.jsonl").exists()
