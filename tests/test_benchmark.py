"""Benchmark grid: statistics, the results file, resume logic, config checks, and the --quick grid end to end."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO
from lightning_distill import bench_report
from lightning_distill.bench_report import case_scores, paired_bootstrap, verdict
from lightning_distill.benchmark import Benchmark, append_record, grid, load_benchmark, read_records
from lightning_distill.config import ConfigError, to_dict

PHANTOM = os.path.join(REPO, "experiments/benchmarks/phantom.yaml")


# ------------------------------------------------------------------------------------------- statistics
def test_case_scores_average_present_organs_and_skip_empty_cases():
    cases = [{"id": "a", "dice": {"liver": 0.8, "spleen": None, "aorta": 0.4}},
             {"id": "b", "dice": {"liver": None, "spleen": None, "aorta": None}}]
    assert case_scores(cases) == {"a": pytest.approx(0.6)}


def test_paired_bootstrap_constant_shift_has_a_degenerate_interval():
    rng = np.random.default_rng(0)
    b = {s: {f"c{i}": float(v) for i, v in enumerate(rng.uniform(0.5, 0.9, 30))} for s in range(3)}
    a = {s: {c: v + 0.05 for c, v in b[s].items()} for s, _ in b.items()}
    ci = paired_bootstrap(a, b, n=500)
    assert ci["mean"] == pytest.approx(0.05) and ci["lo"] == pytest.approx(0.05) and ci["hi"] == pytest.approx(0.05)
    assert ci["seeds"] == 3 and ci["cases"] == 30 and verdict(ci) == "better"


def test_paired_bootstrap_noise_only_interval_covers_zero_and_pairs_by_case():
    rng = np.random.default_rng(1)
    b = {s: {f"c{i}": 0.7 for i in range(40)} for s in range(3)}
    a = {s: {c: 0.7 + float(rng.normal(0, 0.05)) for c in b[s]} for s in range(3)}
    ci = paired_bootstrap(a, b, n=1000)
    assert ci["lo"] < 0 < ci["hi"] and verdict(ci) == "no clear difference"
    # only common seeds and cases are paired
    a2 = {0: {"x": 1.0, "y": 0.0}, 1: {"x": 1.0}}
    b2 = {0: {"x": 0.5}, 2: {"x": 0.0}}
    assert paired_bootstrap(a2, b2, n=10) == {"mean": 0.5, "lo": 0.5, "hi": 0.5, "seeds": 1, "cases": 1}
    assert paired_bootstrap({0: {"x": 1.0}}, {1: {"x": 1.0}}) is None
    assert verdict({"lo": -0.2, "hi": -0.1}) == "worse" and verdict(None) == "n/a"


# ------------------------------------------------------------------------------------------- results file
def test_results_file_appends_atomically_and_names_a_damaged_line(tmp_path, monkeypatch):
    path = tmp_path / "results.jsonl"
    assert read_records(path) == []
    append_record(path, {"key": "a", "x": 1})
    append_record(path, {"key": "b", "x": 2})
    assert [r["key"] for r in read_records(path)] == ["a", "b"]
    before = path.read_text()

    def crash(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError):
        append_record(path, {"key": "c"})
    monkeypatch.undo()
    assert path.read_text() == before and not [p for p in tmp_path.iterdir() if p.name not in ("results.jsonl", "results.jsonl.lock")]
    assert append_record(path, {"key": "a", "x": 3}) is False  # a key is recorded once (parallel workers, orphans)
    assert path.read_text() == before
    path.write_text(before + '{"key": "c", "x"\n')
    with pytest.raises(ValueError, match=r"results.jsonl, line 3"):
        read_records(path)


# ------------------------------------------------------------------------------------------- config checks
def _bench_yaml(tmp_path, text):
    p = tmp_path / "b.yaml"
    p.write_text(text)
    return p


BASE = f"""
name: t
student: {{config: {REPO}/experiments/student.yaml}}
teachers: {{t3d: {{config: {REPO}/experiments/teacher.yaml}}}}
methods: {{baseline: [distill.weight=0], kd: ["distill.prototypes={{teachers.t3d}}/prototypes.pt"]}}
archs: {{Unet: []}}
"""


@pytest.mark.parametrize("extra, match", [
    ("seedz: [1]\n", "seedz"),
    ("baseline: plain\n", "baseline 'plain' is not one of the methods"),
    ("fractions: [0, 1]\n", r"fractions must be in \(0, 1\]"),
    ("quick: {archs: [FPN]}\n", "quick.archs names"),
])
def test_benchmark_config_errors(tmp_path, extra, match):
    with pytest.raises(ConfigError, match=match):
        load_benchmark(_bench_yaml(tmp_path, BASE + extra), quick="quick" in extra)


def test_benchmark_unknown_teacher_reference(tmp_path):
    text = BASE.replace("{teachers.t3d}", "{teachers.other}")
    with pytest.raises(ConfigError, match=r"\{teachers.other\}.*\['t3d'\]"):
        load_benchmark(_bench_yaml(tmp_path, text))


def test_default_grid_is_the_issue_grid_and_every_run_config_is_valid():
    cfg, base = load_benchmark(PHANTOM)
    runs = grid(cfg)
    assert len(runs) == 3 * 4 * 2 * 3 and len({r.key for r in runs}) == len(runs)
    assert [r.seed for r in runs[:24]] == [0] * 24  # seed-major: complete method sets come first
    b = Benchmark(cfg, base)
    for r in runs:
        c = b.run_config(r)  # raises on any invalid override
        assert c.seed == r.seed and c.data.train_fraction == r.fraction and c.model.name == r.arch
        assert (c.distill.weight == 0) == (r.method == "baseline")
    fpn = b.run_config(next(r for r in runs if r.arch == "FPN"))
    assert "decoder_channels" not in fpn.model.kwargs
    kd = b.run_config(next(r for r in runs if r.method != "baseline"))
    assert kd.distill.prototypes == str(Path(cfg.output_dir) / "teachers/ct3d/prototypes.pt")


def test_per_run_teachers_get_the_settings_arch_and_fraction(tmp_path):
    text = BASE.replace("teachers: {t3d: {config: " + REPO + "/experiments/teacher.yaml}}",
                        "teachers: {t3d: {config: " + REPO + "/experiments/teacher.yaml},"
                        " s2d: {config: " + REPO + "/experiments/student.yaml, per: [arch, fraction]}}")
    text = text.replace("archs: {Unet: []}", "archs: {Unet: [], FPN: [model.name=FPN, ~model.kwargs.decoder_channels]}")
    text = text.replace("{teachers.t3d}/prototypes.pt", "{teachers.s2d}/x.pt")
    cfg, base = load_benchmark(_bench_yaml(tmp_path, text), ["output_dir=out"])
    b = Benchmark(cfg, base)
    run = next(r for r in grid(cfg) if r.arch == "FPN" and r.method == "kd" and r.fraction == 0.25)
    assert b.teachers_of(run) == ["s2d"]
    assert b.run_config(run).distill.prototypes == "out/teachers/s2d_FPN_f0.25/x.pt"
    t = b.teacher_config("s2d", run)
    assert t.model.name == "FPN" and t.data.train_fraction == 0.25 and t.output_dir == "out/teachers/s2d_FPN_f0.25"
    with pytest.raises(ConfigError, match="per has"):
        load_benchmark(_bench_yaml(tmp_path, text.replace("per: [arch, fraction]", "per: [encoder]")))


# ------------------------------------------------------------------------------------------- resume logic
def _fake_training(monkeypatch, calls):
    """Replace training by a function that records its call and returns results shaped like fit()'s."""
    import lightning_distill.train as train

    def fake_fit(cfg, source=None):
        calls.append(cfg.output_dir)
        seed, frac = int(cfg.seed), float(cfg.data.train_fraction)
        score = 0.5 + 0.1 * frac + 0.01 * seed + (0.02 if cfg.distill.weight else 0.0)
        cases = [{"id": f"c{i}", "dice": {"liver": score + 0.01 * i, "spleen": score}} for i in range(5)]
        return {"test": {"dice": {"liver": score, "spleen": score}, "dice_mean": score, "hd95_mean": 3.0, "num_cases": 5},
                "test_cases": cases, "train_subjects": int(10 * frac), "steps": 1, "wall_time_s": 0.1,
                "val": {"dice_best": score}, "version": "test"}

    monkeypatch.setattr(train, "fit", fake_fit)
    monkeypatch.setattr(Benchmark, "_source", lambda self, cfg: None)


GRID = BASE.replace("archs: {Unet: []}", "archs: {Unet: [], FPN: [model.name=FPN, ~model.kwargs.decoder_channels]}") + """
student: {config: %s/experiments/student.yaml, overrides: ["data.shape=[64,64]", trainer.max_steps=120]}
fractions: [0.1, 0.25, 0.5, 1.0]
seeds: [0, 1]
jobs: 1
""" % REPO


def test_resume_runs_only_missing_keys_and_refuses_changed_configs(tmp_path, monkeypatch):
    calls = []
    _fake_training(monkeypatch, calls)
    out = tmp_path / "bench"
    grid_yaml = _bench_yaml(tmp_path, GRID.replace(f"student: {{config: {REPO}/experiments/student.yaml}}\n", ""))
    cfg, base = load_benchmark(grid_yaml, [f"output_dir={out}", f"report={tmp_path}/report.md"])
    b = Benchmark(cfg, base, command="test")
    b.run(max_runs=5, log=lambda *_: None)  # "killed" after 5 student runs
    assert len(calls) == 1 + 5  # the teacher, then 5 students
    assert len(b.pending()) == 32 - 5
    calls.clear()
    records = Benchmark(cfg, base).run(log=lambda *_: None)
    assert len(calls) == 32 - 5 and not any("teachers" in c for c in calls)  # teacher and finished runs skipped
    keys = [r["key"] for r in records]
    assert len(keys) == len(set(keys)) == 33
    calls.clear()
    Benchmark(cfg, base).run(log=lambda *_: None)
    assert calls == []
    # the report is built from the records: a distilled student 0.02 above its baseline in every case
    path = b.write_report()
    text = path.read_text()
    assert "**32 of 32 student runs finished**" in text
    assert "+0.020 [+0.020, +0.020] | better" in text
    assert (path.parent / "img" / "t_dice_vs_fraction.png").read_bytes()[:4] == b"\x89PNG"
    # a changed run config is an error, not a silent mix of old and new results
    cfg2, _ = load_benchmark(grid_yaml, [f"output_dir={out}", "student.overrides=[trainer.max_steps=7]"])
    with pytest.raises(ConfigError, match=r"different run config.*data.shape: \[64, 64\] -> \[128, 128\]"):
        Benchmark(cfg2, base).run(log=lambda *_: None)


def test_config_changes_ignore_new_schema_keys_at_their_default():
    from lightning_distill.benchmark import config_changes
    from lightning_distill.config import load_config

    new = to_dict(load_config(f"{REPO}/experiments/student.yaml", ["output_dir=a"]))
    old = json.loads(json.dumps(new))
    del old["input_transform"], old["distill"]["method"]  # keys added to the schema after the run
    old["output_dir"] = "b"
    assert config_changes(old, new) == []
    new["distill"]["method"] = "sikd"
    assert config_changes(old, new) == ["distill.method: '(absent)' -> 'sikd'"]
    old["optim"]["lr"] = 0.5
    assert "optim.lr: 0.5 -> 0.001" in config_changes(old, new)


def test_incomplete_grid_report_says_so(tmp_path, monkeypatch):
    calls = []
    _fake_training(monkeypatch, calls)
    grid_yaml = _bench_yaml(tmp_path, GRID.replace(f"student: {{config: {REPO}/experiments/student.yaml}}\n", ""))
    cfg, base = load_benchmark(grid_yaml, [f"output_dir={tmp_path}/b", f"report={tmp_path}/r.md"])
    b = Benchmark(cfg, base)
    b.run(max_runs=3, log=lambda *_: None)
    text = b.write_report().read_text()
    assert "**3 of 32 student runs finished**" in text and "**Incomplete**" in text


# ------------------------------------------------------------------------------------------- end to end
def _student_lines(path):
    return [r for r in read_records(path) if r["kind"] == "student"] if path.exists() else []


@pytest.mark.slow
def test_quick_benchmark_killed_midway_resumes_and_writes_a_wellformed_report(tmp_path):
    """The real --quick grid in a subprocess, SIGKILLed after a few runs, then completed by a re-run."""
    out = tmp_path / "bench"
    total = len(grid(load_benchmark(PHANTOM, quick=True)[0]))
    args = [sys.executable, "-m", "lightning_distill.cli", "benchmark", PHANTOM, "--quick", f"output_dir={out}"]
    results = Path(f"{out}-quick") / "results.jsonl"
    proc = subprocess.Popen(args, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"}, start_new_session=True)
    deadline = time.time() + 300
    while len(_student_lines(results)) < 3 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)  # the benchmark and its worker processes, as a pre-empted job
    proc.wait()
    time.sleep(1.0)
    before = results.read_text()
    done_before = len(_student_lines(results))
    assert 3 <= done_before < total, "the kill should land mid-grid"
    r = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"{done_before} already finished, {total - done_before} to run" in r.stdout
    assert results.read_text().startswith(before)  # earlier lines untouched
    keys = [x["key"] for x in _student_lines(results)]
    assert len(keys) == len(set(keys)) == total
    report = Path(f"{out}-quick") / "report.md"
    text = report.read_text()
    assert f"**{total} of {total} student runs finished**" in text
    table = [ln for ln in text.splitlines() if ln.startswith("| Unet |") or ln.startswith("| FPN |")]
    assert len(table) >= 4 and all(ln.count("|") == table[0].count("|") for ln in table[:4])
    for png in ("phantom_dice_vs_fraction.png", "phantom_organs.png"):
        assert (report.parent / "img" / png).read_bytes()[:4] == b"\x89PNG"
    assert bench_report.OWN_TEST and json.loads(results.read_text().splitlines()[0])["kind"] == "teacher"


@pytest.mark.slow
def test_quick_benchmark_with_two_parallel_jobs(tmp_path):
    from lightning_distill.cli import main

    out = tmp_path / "par"
    args = ["--quick", "--jobs", "2", f"output_dir={out}", "seeds=[0]"]
    total = len(grid(load_benchmark(PHANTOM, args[3:], quick=True)[0]))
    assert main(["benchmark", PHANTOM, *args]) == 0
    records = read_records(Path(f"{out}-quick") / "results.jsonl")
    keys = [r["key"] for r in records if r["kind"] == "student"]
    assert len(keys) == len(set(keys)) == total
    assert f"**{total} of {total} student runs finished**" in (Path(f"{out}-quick") / "report.md").read_text()


CMEDL_BENCH = os.path.join(REPO, "experiments/benchmarks/cmedl.yaml")


def test_cmedl_grid_is_valid_and_pairs_cmedl_with_the_plain_model():
    cfg, base = load_benchmark(CMEDL_BENCH)
    runs = grid(cfg)
    assert len(runs) == 2 * 2 * 3 and sorted(set(r.seed for r in runs)) == [0, 1, 2]
    b = Benchmark(cfg, base)
    for r in runs:
        c = b.run_config(r)
        assert c.distill.method == ("cmedl" if r.method == "cmedl" else "prototype")
        assert c.data.phantom.modality == "CT" and c.cmedl.target.phantom.modality == "MR"
        assert c.data.phantom.seed != c.cmedl.target.phantom.seed  # unpaired: other subjects
        assert (c.distill.weight == 0) == (r.method == "baseline")


@pytest.mark.slow
def test_quick_cmedl_benchmark_reports_three_metrics_and_translated_images(tmp_path):
    from lightning_distill.cli import main

    out = tmp_path / "cmedl"
    assert main(["benchmark", CMEDL_BENCH, "--quick", f"output_dir={out}", "seeds=[0]"]) == 0
    report = (Path(f"{out}-quick") / "report.md").read_text()
    assert "Surface Dice and HD95 per setting" in report and "cmedl_translations.png" in report
    assert (Path(f"{out}-quick") / "img" / "cmedl_translations.png").stat().st_size > 1000
    records = [r for r in read_records(Path(f"{out}-quick") / "results.jsonl") if r["kind"] == "student"]
    assert {r["method"] for r in records} == {"baseline", "cmedl"}
    assert all(r["test"].get("surface_dice_mean") is not None for r in records)
