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
from lightning_distill.lab import bench_report
from lightning_distill.lab.stats import case_scores, paired_bootstrap, verdict
from lightning_distill.lab.bench_config import load_benchmark
from lightning_distill.lab.bench_grid import append_record, grid, read_records
from lightning_distill.lab.benchmark import Benchmark
from lightning_distill.config import ConfigError, load_config, to_dict

PHANTOM = os.path.join(REPO, "experiments/benchmarks/phantom.yaml")
ROUTES = os.path.join(REPO, "experiments/benchmarks/phantom_routes.yaml")


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
    ("test_sets: {late: {checkpoint: final}}\n", "test_sets.late.checkpoint must be 'best' or 'last'"),
])
def test_benchmark_config_errors(tmp_path, extra, match):
    with pytest.raises(ConfigError, match=match):
        load_benchmark(_bench_yaml(tmp_path, BASE + extra), quick="quick" in extra)


def test_benchmark_unknown_teacher_reference(tmp_path):
    text = BASE.replace("{teachers.t3d}", "{teachers.other}")
    with pytest.raises(ConfigError, match=r"\{teachers.other\}.*\['t3d'\]"):
        load_benchmark(_bench_yaml(tmp_path, text))


def test_default_grid_is_the_issue_grid_and_every_run_config_is_valid():
    """Issue 33's main grid: >= 5 seeds at 30 and 100 subjects, 200 test subjects, the baseline, the paper's
    prototype route, the 3D teacher's slices and their control (the same volumes' slices from a 2D teacher)."""
    cfg, base = load_benchmark(PHANTOM)
    runs = grid(cfg)
    assert len(cfg.seeds) >= 5 and len(runs) == 5 * 4 * 2 and len({r.key for r in runs}) == len(runs)
    assert [r.seed for r in runs[:8]] == [0] * 8  # seed-major: complete method sets come first
    b = Benchmark(cfg, base)
    configs = {}
    for r in runs:
        c = b.run_config(r)  # raises on any invalid override
        assert c.seed == r.seed and c.data.train_fraction == r.fraction and c.model.name == r.arch
        assert c.data.spatial_augment == "affine" and c.trainer.max_steps == 600  # students are trained as users train them
        assert c.data.test_subjects == 200 and c.data.num_subjects - 200 - c.data.val_subjects == 100
        configs[r.method] = c
    assert configs["baseline"].distill.weight == 0 and configs["baseline"].transfer.slices is None
    assert configs["prob"].distill.prototypes == str(Path(cfg.output_dir) / "teachers/ct3d/prototypes.pt")
    assert configs["soft"].transfer.slices == str(Path(cfg.output_dir) / "slices/s3d") and configs["soft"].distill.weight == 0
    assert configs["soft-2d"].transfer.slices == str(Path(cfg.output_dir) / "slices/s2d")
    assert b.slices_config("s2d").model.path == str(Path(cfg.output_dir) / "teachers/t2d/checkpoints/best.ckpt")
    # both teachers can be scored on the students' slices: the students' in-plane grid
    for name in ("ct3d", "t2d"):
        t = b.teacher_config(name)
        assert cfg.teachers[name].score_on_students and list(t.data.shape)[:2] == list(configs["prob"].data.shape)
        assert t.data.phantom.seed != configs["prob"].data.phantom.seed  # unpaired: other subjects
    assert all(m in cfg.methods for pair in cfg.contrasts for m in pair)
    assert Path(cfg.headroom_from).is_file()


def test_the_companion_grid_extends_the_main_one_and_reuses_its_runs():
    """phantom_routes.yaml (``extends: phantom.yaml``): every route of issue 33, the main grid's runs with the same
    keys and configs in the same output folder (so they are not trained again), SIKD's teacher per size."""
    main_cfg, base = load_benchmark(PHANTOM)
    cfg, _ = load_benchmark(ROUTES)
    assert cfg.name == "phantom-routes" and cfg.output_dir == main_cfg.output_dir and cfg.report != main_cfg.report
    assert set(cfg.methods) == {"baseline", "balanced", "prob", "logprob", "logprob-identity", "soft", "hard", "soft-2d",
                                "truth", "union", "soft+prob", "sikd"}
    assert list(cfg.seeds) == list(main_cfg.seeds) and list(cfg.fractions) == list(main_cfg.fractions)
    main_b, b = Benchmark(main_cfg, base), Benchmark(cfg, base)
    runs = {r.key: r for r in grid(cfg)}
    for r in grid(main_cfg):
        assert to_dict(b.run_config(runs[r.key])) == to_dict(main_b.run_config(r))
    for name in main_cfg.slices:
        assert to_dict(b.slices_config(name)) == to_dict(main_b.slices_config(name))
    c = {r.method: b.run_config(r) for r in runs.values() if r.fraction == 0.3 and r.seed == 0}
    assert c["truth"].transfer.target == "truth" and c["hard"].transfer.mode == "hard"
    assert c["union"].transfer.union == str(Path(cfg.output_dir) / "slices/s3d") and c["union"].transfer.slices is None
    assert c["soft+prob"].distill.weight == 1 and c["soft+prob"].transfer.slices is not None
    assert c["logprob-identity"].distill.bank_control == "identity"
    assert c["balanced"].loss.class_balance == "inverse_frequency"
    sikd = next(r for r in runs.values() if r.method == "sikd" and r.fraction == 0.3)
    assert c["sikd"].distill.method == "sikd" and b.teachers_of(sikd) == ["sikd2d"]
    t = b.teacher_config("sikd2d", sikd)  # the SIKD teacher sees its student's training subjects only
    assert t.data.train_fraction == 0.3 and t.data.num_subjects == c["sikd"].data.num_subjects
    assert t.data.test_subjects == c["sikd"].data.test_subjects and t.input_transform == "class_mean"


def test_a_benchmark_file_extends_another(tmp_path):
    base = _bench_yaml(tmp_path, BASE)
    child = tmp_path / "child.yaml"
    child.write_text(f"extends: {base.name}\nname: child\nseeds: [3]\nmethods: {{other: [distill.weight=0]}}\n")
    cfg, _ = load_benchmark(child)
    assert cfg.name == "child" and list(cfg.seeds) == [3] and set(cfg.methods) == {"baseline", "kd", "other"}
    child.write_text(f"extends: {base.name}\nseedz: [3]\n")
    with pytest.raises(ConfigError, match=r"child.yaml.*seedz"):
        load_benchmark(child)


def test_students_wait_only_for_the_teachers_they_need():
    """The schedule: baselines need no teacher (they train beside the 3D teacher), the prototype route waits for
    the 3D teacher, the slices for their teacher, and the slices' students for their slices."""
    cfg, base = load_benchmark(PHANTOM)
    b = Benchmark(cfg, base)
    runs = grid(cfg)
    tasks = ([("teacher", "ct3d", runs[0]), ("teacher", "t2d", runs[0]), ("slices", "s3d"), ("slices", "s2d")]
             + [("student", r) for r in runs])
    needs = b._needs(tasks)
    assert needs[:4] == [set(), set(), {0}, {1}]
    expected = {"baseline": set(), "prob": {0}, "soft": {2}, "soft-2d": {3}}
    for task, need in zip(tasks[4:], needs[4:]):
        assert need == expected[task[1].method], task[1].method
    # a teacher already trained (not among the tasks) is not waited for
    assert all(n == set() for n in b._needs([("student", r) for r in runs]))


def test_fractions_of_and_contrasts_are_checked(tmp_path):
    with pytest.raises(ConfigError, match="fractions_of names 'nope'"):
        load_benchmark(_bench_yaml(tmp_path, BASE + "fractions_of: {nope: [1.0]}\n"))
    with pytest.raises(ConfigError, match=r"fractions_of.kd has \[0.3\]"):
        load_benchmark(_bench_yaml(tmp_path, BASE + "fractions: [0.5, 1.0]\nfractions_of: {kd: [0.3]}\n"))
    with pytest.raises(ConfigError, match="contrasts must be"):
        load_benchmark(_bench_yaml(tmp_path, BASE + "contrasts: [[kd, other]]\n"))
    cfg, _ = load_benchmark(_bench_yaml(tmp_path, BASE + "fractions: [0.5, 1.0]\nfractions_of: {kd: [1.0]}\nseeds: [0]\n"))
    assert [(r.method, r.fraction) for r in grid(cfg)] == [("baseline", 0.5), ("baseline", 1.0), ("kd", 1.0)]


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
        late = frac == 0.1 and not cfg.distill.weight  # the small-data baseline still rises in its last quarter
        curve = [[st, score - (0.1 * (40 - st) / 30 if late else 0.0), {}] for st in (10, 20, 30, 40)]
        return {"test": {"dice": {"liver": score, "spleen": score}, "dice_mean": score, "hd95_mean": 3.0, "num_cases": 5},
                "test_cases": cases, "train_subjects": int(10 * frac), "steps": 40, "wall_time_s": 0.1,
                "val": {"dice_best": score}, "val_curve": curve, "version": "test"}

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
    # learning curves and the convergence check: only the small-data baseline rose late, so only it is flagged
    conv = text.split("## Convergence check")[1].split("##")[0]
    flagged = [ln for ln in conv.splitlines() if "flagged" in ln and ln.startswith("| ")]
    assert [ln.split("|")[2].strip() for ln in flagged] == ["0.1 (1)", "0.1 (1)"]  # Unet and FPN
    assert (path.parent / "img" / "t_learning_curves.png").read_bytes()[:4] == b"\x89PNG"
    assert (path.parent / "img" / "t_dice_vs_fraction.png").read_bytes()[:4] == b"\x89PNG"
    # a changed run config is an error, not a silent mix of old and new results
    cfg2, _ = load_benchmark(grid_yaml, [f"output_dir={out}", "student.overrides=[trainer.max_steps=7]"])
    with pytest.raises(ConfigError, match=r"different run config.*trainer.max_steps: 120 -> 7"):
        Benchmark(cfg2, base).run(log=lambda *_: None)


def test_config_changes_ignore_new_schema_keys_at_their_default():
    from lightning_distill.lab.bench_config import config_changes
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


def test_report_shows_hand_notes_and_the_teachers_bank(tmp_path, monkeypatch):
    """`notes:` adds a hand-written section marked as such; a teacher record's bank becomes a K x K
    table (rows: labelled class, bold diagonal, voxels, held-out Dice); a missing notes file is refused."""
    _fake_training(monkeypatch, [])
    (tmp_path / "notes.md").write_text("The spleen row is the teacher's weakest.")
    text = GRID.replace(f"student: {{config: {REPO}/experiments/student.yaml}}\n", "") + "notes: notes.md\n"
    cfg, base = load_benchmark(_bench_yaml(tmp_path, text), [f"output_dir={tmp_path}/b", f"report={tmp_path}/r.md",
                                                             "seeds=[0]", "fractions=[1.0]"])
    b = Benchmark(cfg, base)
    records = b.run(log=lambda *_: None)
    teacher = next(r for r in records if r["kind"] == "teacher")
    teacher["bank"] = {"classes": ["background", "liver", "spleen"], "tau": 1.0, "counts": [900, 80, 20],
                       "matrix": [[0.9, 0.05, 0.05], [0.1, 0.8, 0.1], [0.3, 0.5, 0.2]],
                       "reliability": {"liver": {"dice": 0.85}, "spleen": {"dice": 0.1}}}
    report = b.write_report(records).read_text()
    assert "## Notes" in report and "Written by hand" in report and "The spleen row is the teacher's weakest." in report
    assert "## What the teachers' banks hold" in report
    assert "| spleen | 0.300 | 0.500 | **0.200** | 20 | 0.100 |" in report
    assert "| background | **0.900** | 0.050 | 0.050 | 900 | n/a |" in report
    assert "| Unet | 1 (10) | kd |" in report  # one row per method in the test-Dice tables
    with pytest.raises(ConfigError, match="notes file"):
        load_benchmark(_bench_yaml(tmp_path, text.replace("notes.md", "missing.md")))


def test_the_share_of_the_headroom_reads_a_headroom_benchmarks_runs(tmp_path, monkeypatch):
    """`headroom_from`: Δ / (ceiling − plain model at the same number of subjects) of another benchmark's runs CSV,
    with a bootstrap CI; n/a where that benchmark has no run at this size or its headroom's CI reaches 0."""
    _fake_training(monkeypatch, [])
    rows = ["benchmark,test_set,method,arch,fraction,train_subjects,seed,dice_mean"]
    for n, vals in ((5, (0.60, 0.62)), (10, (0.70, 0.70)), (40, (0.68, 0.70))):
        rows += [f"h,test,baseline,Unet,0,{n},{i},{v}" for i, v in enumerate(vals)]
    (tmp_path / "h_runs.csv").write_text("\n".join(rows) + "\n")
    text = GRID.replace(f"student: {{config: {REPO}/experiments/student.yaml}}\n", "") + "headroom_from: h_runs.csv\n"
    cfg, base = load_benchmark(_bench_yaml(tmp_path, text), [f"output_dir={tmp_path}/b", f"report={tmp_path}/r.md",
                                                             "archs={Unet: []}"])
    b = Benchmark(cfg, base)
    report = b.write_report(b.run(log=lambda *_: None)).read_text()
    assert "share of headroom(n) [95% CI]" in report
    row = next(ln for ln in report.splitlines() if ln.startswith("| Unet | 0.5 (5) | kd |"))
    assert row.endswith("+25% [+20%, +33%] |"), row  # Δ = +0.02 exactly; headroom 0.69 − 0.61 = 0.08, each mean resampled over its 2 seeds
    assert next(ln for ln in report.splitlines() if ln.startswith("| Unet | 0.1 (1) | kd |")).endswith(" n/a |")
    assert "reaches 0)" in next(ln for ln in report.splitlines() if ln.startswith("| Unet | 1 (10) | kd |"))
    assert (tmp_path / "img" / "t_route_gains.png").read_bytes()[:4] == b"\x89PNG"  # every route's gain, headroom lines
    assert "t_route_gains.png" in report
    # the achieved precision: kd's Δ is +0.02 on every case, so its CI has no width; 2 seeds of 5 test cases
    assert "| own test split | Unet | 0.5 (5) | 2 | 5 | 0.0000 | 0.0000 (kd) | yes |" in report
    # the low-data check pairs each method at the smallest size with the baseline at the largest: kd at 0.1 scores
    # 0.5 + 0.01 + 0.02 per seed, the baseline at 1.0 0.5 + 0.1, the same case offsets: -0.07 on every case
    low = next(ln for ln in report.split("### Low-data check (own test split)")[1].splitlines() if ln.startswith("| Unet | 0.605 | kd |"))
    assert low.endswith("| -0.070 [-0.070, -0.070] | worse |"), low
    with pytest.raises(ConfigError, match="headroom_from file"):
        load_benchmark(_bench_yaml(tmp_path, text.replace("h_runs.csv", "none.csv")))


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
    own = text.split("## Test Dice: own test split")[1].split("###")[0]
    table = [ln for ln in own.splitlines() if ln.startswith("| Unet |")]
    settings = {(x["fraction"], x["method"]) for x in _student_lines(results)}  # one row per method and fraction
    assert len(table) == len(settings) and all(ln.count("|") == table[0].count("|") for ln in table)
    for section in ("## Teachers on the students' test slices", "## Convergence check",
                    "## Which part of a gain needs the teacher's content", "## Organs where 3D context matters"):
        assert section in text
    assert "| Δ ct3d − baseline |" in text and "| Δ t2d − baseline |" in text
    for png in ("phantom_dice_vs_fraction.png", "phantom_organs.png", "phantom_learning_curves.png"):
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
    # records are appended as runs finish: a distilled student's comes after its teacher's
    position = {r["key"]: i for i, r in enumerate(records)}
    for r in records:
        if r["kind"] == "student" and r["method"] not in ("baseline", "balanced"):
            teacher = "t2d" if r["method"] == "logprob-2d-teacher" else "ct3d"
            assert position[f"teacher|{teacher}"] < position[r["key"]], r["key"]
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
    assert "| Dice | surface Dice | HD95 (mm) |" in report and "cmedl_translations.png" in report
    assert (Path(f"{out}-quick") / "img" / "cmedl_translations.png").stat().st_size > 1000
    records = [r for r in read_records(Path(f"{out}-quick") / "results.jsonl") if r["kind"] == "student"]
    assert {r["method"] for r in records} == {"baseline", "cmedl"}
    assert all(r["test"].get("surface_dice_mean") is not None for r in records)


def test_late_rise_and_organ_scores():
    from lightning_distill.lab.stats import late_rise, organ_scores

    curve = [[10, 0.5, {}], [20, 0.7, {}], [30, 0.72, {}], [40, 0.71, {}]]
    assert late_rise(curve, 40) == pytest.approx(0.0)  # the best came before the last quarter
    assert late_rise(curve + [[50, 0.8, {}]], 50) == pytest.approx(0.08)  # 0.8 after step 37.5, 0.72 before
    assert late_rise([[40, 0.5, {}]], 40) is None and late_rise(None, 40) is None
    assert late_rise([[10, None, {}], [20, 0.6, {}], [40, 0.61, {}]], 40) == pytest.approx(0.01)
    cases = [{"id": "a", "dice": {"liver": 0.8, "spleen": None}}, {"id": "b", "dice": {"liver": 0.6, "spleen": 0.4}}]
    assert organ_scores(cases, "spleen") == {"b": 0.4} and organ_scores(cases, "liver") == {"a": 0.8, "b": 0.6}


def _claimer(path, q):
    from lightning_distill.io import claim

    q.put(claim(path))


def test_a_run_is_claimed_by_exactly_one_process_and_claims_are_honoured(tmp_path, monkeypatch):
    """Benchmark processes sharing an output folder (array tasks, nodes) claim a run by creating its claim file
    exclusively before training: 6 processes racing for one claim, one wins; a run claimed by another host is
    skipped (and the students of a teacher claimed so); a claim of a dead process of this host is taken over."""
    import json
    import multiprocessing as mp
    import socket

    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_claimer, args=(str(tmp_path / "race.claim"), q)) for _ in range(6)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert sorted(q.get() for _ in procs) == [False] * 5 + [True]

    calls = []
    _fake_training(monkeypatch, calls)
    out = tmp_path / "bench"
    grid_yaml = _bench_yaml(tmp_path, GRID.replace(f"student: {{config: {REPO}/experiments/student.yaml}}\n", ""))
    cfg, base = load_benchmark(grid_yaml, [f"output_dir={out}", f"report={tmp_path}/report.md"])
    b = Benchmark(cfg, base)
    runs = b.pending()
    other = {"host": "another-node", "pid": 4242, "since": "2026-12-04T10:00:00"}
    teacher_key = f"teacher|{b.teacher_instance(b.teachers_of(next(r for r in runs if b.teachers_of(r)))[0], runs[0])[0]}"
    b.claim_path(teacher_key).parent.mkdir(parents=True)
    b.claim_path(teacher_key).write_text(json.dumps(other))
    baseline = next(r for r in runs if not b.teachers_of(r))
    dead = {"host": socket.gethostname(), "pid": 2 ** 22 + 12345, "since": "2026-12-04T10:00:00"}  # no such pid
    b.claim_path(baseline.key).write_text(json.dumps(dead))
    lines = []
    records = b.run(log=lines.append)
    done = {r["key"] for r in records}
    assert teacher_key not in done and not any(k in done for k in (r.key for r in runs if b.teachers_of(r)))
    assert {r.key for r in runs if not b.teachers_of(r)} <= done  # baselines ran, the dead holder's one too
    assert any("skipped, claimed by another-node pid 4242" in ln for ln in lines)
    assert any("is not finished" in ln for ln in lines)
    assert sorted(p.name for p in b.claim_path(teacher_key).parent.iterdir()) == [b.claim_path(teacher_key).name]
    # the other node is done: its claim gone, the next invocation trains the teacher and its students
    b.claim_path(teacher_key).unlink()
    calls.clear()
    records = Benchmark(cfg, base).run(log=lambda *_: None)
    assert len(records) == 33 and any("teachers" in c for c in calls)


def test_parallel_benchmark_jobs_get_one_gpu_each(monkeypatch):
    from lightning_distill.lab.benchmark import gpu_for_worker, visible_gpus

    assert [gpu_for_worker(i, ["0", "1"]) for i in range(4)] == ["0", "1", "0", "1"]
    assert gpu_for_worker(3, []) is None
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,5")
    assert visible_gpus() == ["2", "5"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert visible_gpus() == []


# ------------------------------------------------------------------------------------------ headroom (issue 31)
HEADROOM = os.path.join(REPO, "experiments/benchmarks/headroom.yaml")
HEADROOM_05 = os.path.join(REPO, "experiments/benchmarks/headroom_0.5.yaml")


@pytest.mark.parametrize("path,version", [(HEADROOM, "0.3"), (HEADROOM_05, "0.5")])
def test_headroom_grid_trains_10_to_1000_subjects_with_steps_growing_and_fixed_test_subjects(path, version):
    from lightning_distill.data.datamodules import split_ids, train_subset

    cfg, base = load_benchmark(path)
    runs = grid(cfg)
    assert len(runs) == 5 * 3 and {r.method for r in runs} == {"baseline"}
    b = Benchmark(cfg, base)
    ids = [str(i) for i in range(1060)]
    steps, subjects, tests = {}, {}, set()
    for r in runs:
        c = b.run_config(r)
        assert c.distill.weight == 0 and c.data.num_subjects == 1060 and c.data.phantom.version == version
        split = split_ids(ids, c.data.val_subjects, c.data.test_subjects, c.data.split_seed)
        tests.add(tuple(split["test"]))
        steps[r.fraction] = c.trainer.max_steps
        subjects[r.fraction] = len(train_subset(split["train"], c.data.train_fraction))
    assert len(tests) == 1  # the same 40 test subjects at every size and seed
    assert [subjects[f] for f in sorted(subjects)] == [10, 30, 100, 300, 1000]
    assert [steps[f] for f in sorted(steps)] == [600, 600, 600, 900, 3000]
    assert cfg.teachers.ct3d.score_on_students and not any("{teachers." in o for m in cfg.methods.values() for o in m)
    assert b.teacher_config("ct3d").data.phantom.version == version  # the teacher on the students' phantom version


def test_fraction_overrides_must_name_a_fraction(tmp_path):
    with pytest.raises(ConfigError, match=r"fraction_overrides has \[0.3\]"):
        load_benchmark(_bench_yaml(tmp_path, BASE + "fractions: [0.5, 1.0]\nfraction_overrides: {0.3: [trainer.max_steps=9]}\n"))
    cfg, base = load_benchmark(_bench_yaml(tmp_path, BASE + "fractions: [0.5, 1.0]\nfraction_overrides: {1.0: [trainer.max_steps=9]}\n"))
    b = Benchmark(cfg, base)
    assert {r.fraction: b.run_config(r).trainer.max_steps for r in grid(cfg) if r.method == "baseline"}[1.0] == 9
    assert load_benchmark(_bench_yaml(tmp_path, BASE + "fraction_overrides: {1.0: [x=1]}\n"), quick=True)[0].fraction_overrides == {}


def test_quick_headroom_benchmark_trains_the_reference_teacher_and_reports_the_headroom(tmp_path):
    """No method distils from the teacher, yet it is trained and scored on the students' slices; the report's
    headroom is the paired difference of the baseline's per-case scores at the two sizes, computed here again."""
    from lightning_distill.cli import main

    out = tmp_path / "hr"
    assert main(["benchmark", HEADROOM, "--quick", f"output_dir={out}"]) == 0
    records = read_records(Path(f"{out}-quick") / "results.jsonl")
    teacher = [r for r in records if r["kind"] == "teacher"]
    assert len(teacher) == 1 and teacher[0]["student_slices"]["test_cases"]
    report = (Path(f"{out}-quick") / "report.md").read_text()
    assert "## Learning curve and headroom" in report and "Unreachable = teacher − ceiling" in report
    assert "headroom_headroom.png" in report and (Path(f"{out}-quick") / "img" / "headroom_headroom.png").stat().st_size > 1000
    students = [r for r in records if r["kind"] == "student"]
    by = {(r["fraction"], r["seed"]): case_scores(r["test_cases"]) for r in students}
    seeds = sorted({r["seed"] for r in students})
    diffs = [by[(1.0, s)][c] - by[(0.25, s)][c] for s in seeds for c in by[(1.0, s)]]
    row = next(ln for ln in report.split("headroom(n) = ceiling")[1].splitlines() if ln.startswith("| 0.25"))
    # the report prints 3 decimals of the bootstrap's mean (another summation order than np.mean here): within
    # half a printed unit, plus float64 rounding, so a mean at a rounding boundary cannot flip the test
    assert abs(float(row.split("|")[2].split()[0]) - float(np.mean(diffs))) <= 0.0005 + 1e-12


def test_chaos_headroom_grid_trains_2_4_and_8_patients_and_keeps_the_test_patients():
    from lightning_distill.data.datamodules import train_subset

    cfg, base = load_benchmark(os.path.join(REPO, "experiments/benchmarks/chaos_headroom.yaml"))
    runs = grid(cfg)
    assert len(runs) == 3 * 3 and cfg.headroom and cfg.teachers.mr3d.score_on_students
    b = Benchmark(cfg, base)
    chaos = load_benchmark(os.path.join(REPO, "experiments/benchmarks/chaos.yaml"))[0]
    chaos_test = Benchmark(chaos, base).run_config(grid(chaos)[0]).data.splits.test
    sizes = set()
    for r in runs:
        c = b.run_config(r)
        assert c.distill.weight == 0 and list(c.data.splits.test) == list(chaos_test)  # bench-chaos's 6 test patients
        assert not set(c.data.splits.train) & set(c.data.splits.test) and not set(c.data.splits.train) & set(c.data.splits.val)
        sizes.add(len(train_subset(list(c.data.splits.train), c.data.train_fraction)))
    assert sizes == {2, 4, 8}


# ------------------------------------------------------------------------------------------- teacher-labelled slices
SLICES = f"""
name: s
output_dir: OUT
report: OUT/report.md
student:
  config: {REPO}/experiments/student.yaml
  overrides: [data.num_subjects=16, "data.shape=[32,32]", data.val_subjects=4, data.test_subjects=4, data.batch_size=4,
              trainer.max_steps=4, trainer.val_check_interval=2, trainer.check_val_every_n_epoch=null, pictures=0,
              trainer.enable_progress_bar=false, trainer.enable_model_summary=false, checkpoint.weights_only=true]
teachers:
  ct3d:
    config: {REPO}/experiments/teacher.yaml
    overrides: [data.num_subjects=8, "data.shape=[32,32,16]", data.val_subjects=2, data.test_subjects=2,
                "model.kwargs.channels=[8,16,32]", "model.kwargs.strides=[2,2]", trainer.max_steps=4,
                trainer.check_val_every_n_epoch=1, trainer.enable_progress_bar=false, pictures=0]
slices:
  s3d: {{config: {REPO}/experiments/teach.yaml, teacher: ct3d, overrides: [data.num_subjects=4, "data.shape=[32,32,16]"]}}
  gt: {{config: {REPO}/experiments/teach.yaml, teacher: null, overrides: [data.num_subjects=4, "data.shape=[32,32,16]"]}}
methods:
  baseline: [distill.weight=0, distill.prototypes=null]
  soft: [distill.weight=0, distill.prototypes=null, "transfer.slices={{slices.s3d}}"]
  union: [distill.weight=0, distill.prototypes=null, "transfer.union={{slices.gt}}"]
archs: {{Unet: ["model.kwargs.decoder_channels=[32,16,16,8,8]"]}}
fractions: [1.0]
seeds: [0]
"""


def test_slices_are_written_once_after_their_teacher_and_students_wait_for_them(tmp_path):
    text = SLICES.replace("OUT", str(tmp_path / "b"))
    cfg, base = load_benchmark(_bench_yaml(tmp_path, text))
    b = Benchmark(cfg, base)
    runs = {r.method: r for r in grid(cfg)}
    tasks = [("teacher", "ct3d", None), ("slices", "s3d"), ("slices", "gt")] + [("student", r) for r in runs.values()]
    needs = b._needs(tasks)
    assert needs[:3] == [set(), {0}, set()]  # the teacher's slices wait for it; ground truth for nothing
    assert dict(zip(runs, needs[3:])) == {"baseline": set(), "soft": {1}, "union": {2}}
    assert any(o == f"transfer.slices={tmp_path / 'b' / 'slices' / 's3d'}" for o in b.run_overrides(runs["soft"]))
    teach = b.slices_config("s3d")  # the teacher's best checkpoint, the students' own config (resolved) as `student`
    assert teach.model.path == str(tmp_path / "b" / "teachers" / "ct3d" / "checkpoints" / "best.ckpt")
    assert list(load_config(teach.student).data.shape) == [32, 32]
    assert b.slices_config("gt").model.format == "none"
    with pytest.raises(ConfigError, match=r"\{slices.nope\}"):
        load_benchmark(_bench_yaml(tmp_path, text.replace("{slices.gt}", "{slices.nope}")))
    with pytest.raises(ConfigError, match="slices.gt.teacher must be one of the teachers"):
        load_benchmark(_bench_yaml(tmp_path, text.replace("teacher: null", "teacher: t9")))


@pytest.mark.slow
def test_a_benchmark_with_slices_runs_resumes_and_refuses_changed_slices(tmp_path):
    text = SLICES.replace("OUT", str(tmp_path / "b"))
    cfg, base = load_benchmark(_bench_yaml(tmp_path, text))
    b = Benchmark(cfg, base)
    records = b.run(log=lambda *_: None, jobs=1)
    kinds = [(r["kind"], r["key"]) for r in records]
    assert kinds.index(("teacher", "teacher|ct3d")) < kinds.index(("slices", "slices|s3d")) < kinds.index(("student", "soft|Unet|f1|s0"))
    s3d = next(r for r in records if r["key"] == "slices|s3d")
    assert s3d["labelled_by"] == "3D model" and s3d["num_volumes"] == 4 and s3d["num_slices"] > 4
    assert next(r for r in records if r["key"] == "slices|gt")["labelled_by"] == "none"
    assert b.run(log=lambda *_: None, jobs=1) == records  # resumed: nothing left to do
    other_seeds, _ = load_benchmark(_bench_yaml(tmp_path, text), ["seeds=[1]"])  # the grid's first run changes, the slices not
    assert Benchmark(other_seeds, base)._check_same_slices("s3d", next(r for r in records if r["key"] == "slices|s3d")) is None
    changed = text.replace('teacher: null, overrides: [data.num_subjects=4', 'teacher: null, overrides: [data.num_subjects=3')
    cfg2, _ = load_benchmark(_bench_yaml(tmp_path, changed))
    with pytest.raises(ConfigError, match="slices 'gt' were written with another config"):
        Benchmark(cfg2, base).run(log=lambda *_: None, jobs=1)
    b.write_report(records)  # the report reads past the slices records


# ------------------------------------------------------------------------------------------ surface Dice in the report
def test_benchmark_report_shows_surface_dice_and_hd95_per_setting(tmp_path, monkeypatch):
    """Surface Dice and HD95 (mean ± std over seeds) per setting; records without surface Dice show n/a."""
    import lightning_distill.train as train
    from lightning_distill.lab.bench_config import load_benchmark
    from lightning_distill.lab.benchmark import Benchmark

    def fake_fit(cfg, source=None):
        seed, frac = int(cfg.seed), float(cfg.data.train_fraction)
        score = 0.5 + 0.1 * frac + (0.02 if cfg.distill.weight else 0.0)
        test = {"dice": {"liver": score, "spleen": score}, "dice_mean": score, "hd95_mean": 3.0 + seed, "num_cases": 2}
        if frac == 1.0:  # the other runs stand for records written before surface Dice existed
            test.update(surface_dice={"liver": 0.4 + 0.1 * seed, "spleen": 0.4 + 0.1 * seed}, surface_dice_mean=0.4 + 0.1 * seed)
        cases = [{"id": f"c{i}", "dice": {"liver": score, "spleen": score}} for i in range(2)]
        return {"test": test, "test_cases": cases, "train_subjects": int(10 * frac), "steps": 1, "wall_time_s": 0.1,
                "val": {"dice_best": score}, "version": "test"}

    monkeypatch.setattr(train, "fit", fake_fit)
    monkeypatch.setattr(Benchmark, "_source", lambda self, cfg: None)
    grid_yaml = _bench_yaml(tmp_path, GRID.replace(f"student: {{config: {REPO}/experiments/student.yaml}}\n", ""))
    cfg, base = load_benchmark(grid_yaml, [f"output_dir={tmp_path}/b", f"report={tmp_path}/r.md", "bootstrap=20"])
    b = Benchmark(cfg, base)
    b.run(log=lambda *_: None)
    text = b.write_report().read_text()
    lines = text.splitlines()
    i = lines.index("## Test Dice: own test split")
    assert "surface Dice (tolerance one voxel = the case's largest spacing)" in lines[i + 2]
    table = lines[i + 4:i + 4 + 2 + 16]  # header, rule, one row per method and setting
    assert table[0] == "| arch | fraction (subjects) | method | Dice | surface Dice | HD95 (mm) | Δ Dice − baseline [95% CI] | verdict |"
    assert all(ln.count("|") == table[0].count("|") for ln in table)
    assert "| Unet | 1 (10) | baseline | 0.600 ± 0.000 | 0.450 ± 0.071 | 3.5 ± 0.7 | — | — |" in table
    assert "| Unet | 1 (10) | kd | 0.620 ± 0.000 | 0.450 ± 0.071 | 3.5 ± 0.7 |" in " ".join(table)
    assert "| Unet | 0.1 (1) | kd | 0.530 ± 0.000 | n/a | 3.5 ± 0.7 |" in " ".join(table)
    assert "surface Dice (mean ± std) | HD95 mm (mean ± std) |" in text  # the per-organ table
    assert "Surface Dice (normalised surface distance)" in text and "use Dice only" in text
