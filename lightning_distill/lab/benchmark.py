"""Quality benchmarks: a grid of methods x training fractions x architectures x seeds from one YAML.

``lightning-distill benchmark experiments/benchmarks/phantom.yaml`` (``make benchmark``):

1. runs the ``prepare`` commands whose outputs are missing (e.g. extracting single slices);
2. trains each teacher the methods refer to, once (``{teachers.NAME}`` in a method's overrides is
   replaced by that teacher's output folder, e.g. ``distill.prototypes={teachers.ct3d}/prototypes.pt``),
   and writes each set of teacher-labelled slices they refer to (``{slices.NAME}``: a ``lightning-distill
   teach`` run with that teacher's best checkpoint, or none, in the students' preprocessing) once its
   teacher is trained;
3. trains every student of the grid, in order seed -> fraction -> architecture -> method, so that an
   interrupted benchmark has complete method pairs, and evaluates it on the extra ``test_sets``;
4. appends one JSON line per finished run to ``<output_dir>/results.jsonl`` (written atomically);
   a re-run skips the keys already there, so a killed benchmark resumes where it stopped. A finished
   run whose resolved config differs from what the YAML asks for now is an error, not a silent mix;
5. writes the markdown report and its PNG plots from the JSON lines (:mod:`lightning_distill.lab.bench_report`).

Paths of run configs in the benchmark YAML are relative to the YAML file; output paths are relative
to the working directory (like ``output_dir`` in run configs). ``--quick`` applies the ``quick:``
section (tiny sizes, a smaller grid) and writes elsewhere: it exercises the same code path in a
couple of minutes and is what the tests run.
"""

from __future__ import annotations

import json
import logging
import math
import re
import shutil
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

from omegaconf import DictConfig, OmegaConf

from lightning_distill.lab.bench_config import (MISSING_VALUE, RESULTS_FILE, BenchmarkConfig, config_changes, slices_refs,
                                                teacher_refs)
from lightning_distill.lab.bench_grid import GridRun, among, append_record, cpu_count, grid, read_records
from lightning_distill.config.load import ConfigError, flat_keys, to_dict
from lightning_distill.config.run import load_config
from lightning_distill.io import claim, read_claim, release

# ---------------------------------------------------------------------------------------- running
class Benchmark:
    """Runs (or resumes) one benchmark and writes its report.

    Args:
        cfg: from :func:`~lightning_distill.lab.bench_config.load_benchmark`.
        base: folder the run-config paths are relative to.
        quick: the ``quick:`` overrides are applied to every run.
        command: the command line to quote in the report.
    """

    def __init__(self, cfg: DictConfig, base: Path, quick: bool = False, command: str = ""):
        self.cfg, self.base, self.quick, self.command = cfg, Path(base), quick, command
        self.out = Path(cfg.output_dir)
        self.results_path = self.out / RESULTS_FILE
        self._sources: Dict[str, Any] = {}

    # -- configs
    def _stage_config(self, spec: DictConfig, extra: Sequence[str]) -> DictConfig:
        ovr = [*spec.overrides, *(spec.quick_overrides if self.quick else []), *extra]
        return load_config(self.base / spec.config, ovr)

    def teacher_instance(self, name: str, run: Optional[GridRun] = None) -> Tuple[str, List[str]]:
        """The folder name of teacher ``name`` for ``run`` and the grid overrides it trains with."""
        per = list(self.cfg.teachers[name].per)
        if per and run is None:
            raise ValueError(f"teacher {name!r} is trained per {per}: it needs a grid run")
        inst, extra = name, []
        if "arch" in per:
            inst += f"_{run.arch}"
            extra += list(self.cfg.archs[run.arch])
        if "fraction" in per:
            inst += f"_f{run.fraction:g}"
            extra.append(f"data.train_fraction={run.fraction}")
        if "seed" in per:
            inst += f"_s{run.seed}"
            extra.append(f"seed={run.seed}")
        return inst, extra

    def teacher_dir(self, instance: str) -> Path:
        return self.out / "teachers" / instance

    def teacher_config(self, name: str, run: Optional[GridRun] = None) -> DictConfig:
        inst, extra = self.teacher_instance(name, run)
        return self._stage_config(self.cfg.teachers[name], [*extra, f"output_dir={self.teacher_dir(inst)}"])

    def _resolve(self, override: str, run: GridRun) -> str:
        for name in teacher_refs(override):
            override = override.replace(f"{{teachers.{name}}}", str(self.teacher_dir(self.teacher_instance(name, run)[0])))
        for name in slices_refs(override):
            override = override.replace(f"{{slices.{name}}}", str(self.slices_dir(name)))
        return override

    # -- teacher-labelled slices
    def slices_dir(self, name: str) -> Path:
        return self.out / "slices" / name

    def slices_of(self, run: GridRun) -> List[str]:
        return sorted({n for o in self.cfg.methods[run.method] for n in slices_refs(o)})

    def slices_config(self, name: str) -> DictConfig:
        """The teach config of slices ``name`` (``student`` set to a YAML this writes beside the folder: the
        first grid run's resolved student config)."""
        from lightning_distill.config.commands import load_teach_config

        spec = self.cfg.slices[name]
        first = grid(self.cfg)[0]
        student_yaml = self.out / "slices" / f"{name}.student.yaml"
        student = to_dict(self.run_config(first))
        if not student_yaml.is_file() or OmegaConf.to_container(OmegaConf.load(student_yaml)) != student:
            from lightning_distill.io import atomic_write

            student_yaml.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(student_yaml, lambda tmp: OmegaConf.save(OmegaConf.create(student), tmp))
        model = (["model.format=none"] if spec.teacher is None else
                 [f"model.path={self.teacher_dir(spec.teacher) / 'checkpoints' / 'best.ckpt'}"])
        ovr = [*spec.overrides, *(spec.quick_overrides if self.quick else []), *model, f"student={student_yaml}",
               f"output={self.slices_dir(name)}", "overwrite=true"]
        return load_teach_config(self.base / spec.config, ovr)

    def run_overrides(self, run: GridRun) -> List[str]:
        c = self.cfg
        at_fraction = next((list(v) for f, v in c.fraction_overrides.items() if among(run.fraction, [f])), [])
        return [*c.archs[run.arch], *(self._resolve(o, run) for o in c.methods[run.method]), *at_fraction,
                f"seed={run.seed}", f"data.train_fraction={run.fraction}", f"output_dir={self.out / 'runs' / run.dirname}"]

    def run_config(self, run: GridRun) -> DictConfig:
        return self._stage_config(self.cfg.student, self.run_overrides(run))

    def teachers_of(self, run: GridRun) -> List[str]:
        return sorted({n for o in self.cfg.methods[run.method] for n in teacher_refs(o)})

    def needs_of(self, task: Tuple) -> List[str]:
        """The keys of the teacher and slices tasks ``task`` waits for."""
        if task[0] == "slices":
            t = self.cfg.slices[task[1]].teacher
            return [] if t is None else [f"teacher|{t}"]
        if task[0] == "student":
            return ([f"teacher|{self.teacher_instance(n, task[1])[0]}" for n in self.teachers_of(task[1])]
                    + [f"slices|{n}" for n in self.slices_of(task[1])])
        return []

    def _source(self, cfg: DictConfig):
        """One data source per distinct data config, shared by the runs (NIfTI sources read once)."""
        from lightning_distill.data.build import build_source

        data = to_dict(cfg.data)
        for k in ("train_fraction", "train_subjects", "batch_size", "eval_batch_size", "num_workers", "augment",
                  "patch_size", "val_subjects", "test_subjects", "split_seed", "splits"):
            data.pop(k, None)
        key = json.dumps([data, cfg.classes and list(cfg.classes)], sort_keys=True, default=str)
        if key not in self._sources:
            self._sources[key] = build_source(cfg)
        return self._sources[key]

    # -- state
    def finished(self) -> Dict[str, Dict[str, Any]]:
        return {r["key"]: r for r in read_records(self.results_path)}

    def pending(self) -> List[GridRun]:
        done = self.finished()
        return [r for r in grid(self.cfg) if r.key not in done]

    def _check_same_config(self, key: str, record: Dict[str, Any], cfg: DictConfig) -> None:
        changes = config_changes(record.get("config", {}), to_dict(cfg))
        if changes:
            raise ConfigError(f"{self.results_path}: run {key!r} was finished with a different run config than "
                              f"{self.cfg.name!r} now asks for ({'; '.join(changes[:5])}"
                              f"{'; ...' if len(changes) > 5 else ''}); use another output_dir (output_dir=...) or "
                              "delete the old results to start over")

    # -- running
    def run(self, max_runs: Optional[int] = None, log=print, jobs: Optional[int] = None) -> List[Dict[str, Any]]:
        """Prepare, train the teachers and every pending student run; returns all records.

        Args:
            max_runs: stop after this many new student runs.
            log: progress printer.
            jobs: runs at once (default ``cfg.jobs``), each in its own process with ``cores // jobs``
                torch threads. Teachers start first; a student starts once the teachers it needs have
                finished, so runs that need none (baselines) train beside a teacher.
        """
        jobs = int(self.cfg.jobs if jobs is None else jobs)
        if jobs < 1:
            raise ValueError(f"jobs must be >= 1, got {jobs}")
        t0 = time.time()
        self.out.mkdir(parents=True, exist_ok=True)
        for name in ("lightning.pytorch", "lightning.pytorch.utilities.rank_zero", "lightning.fabric"):
            logging.getLogger(name).setLevel(logging.WARNING)  # one line per run instead of Lightning's banners
        self._prepare(log)
        done = self.finished()
        runs = grid(self.cfg)
        todo = []
        for r in runs:
            if r.key in done:
                self._check_same_config(r.key, done[r.key], self.run_config(r))
            else:
                todo.append(r)
        log(f"benchmark {self.cfg.name}: {len(runs)} student runs, {len(runs) - len(todo)} already finished, "
            f"{len(todo)} to run -> {self.results_path}")
        selected = todo[:max_runs] if max_runs is not None else todo
        teachers: Dict[str, Tuple[str, GridRun]] = {}  # every teacher a pending run needs, each trained once
        for r in selected:
            for name in self.teachers_of(r):
                inst = self.teacher_instance(name, r)[0]
                if f"teacher|{inst}" in done:
                    self._check_same_config(f"teacher|{inst}", done[f"teacher|{inst}"], self.teacher_config(name, r))
                else:
                    teachers.setdefault(inst, (name, r))
        distilled = {n for ovr in self.cfg.methods.values() for o in ovr for n in teacher_refs(o)}
        for name, spec in self.cfg.teachers.items():  # a reference no method distils from: scored on the slices only
            if spec.score_on_students and not spec.per and name not in distilled:
                if f"teacher|{name}" in done:
                    self._check_same_config(f"teacher|{name}", done[f"teacher|{name}"], self.teacher_config(name))
                else:
                    teachers[name] = (name, None)

        for name in sorted({n for r in runs for n in self.slices_of(r)}):  # finished runs' slices too: same config
            if f"slices|{name}" in done:
                self._check_same_slices(name, done[f"slices|{name}"])
        slices: List[str] = []  # every set of teacher-labelled slices a pending run needs, each written once
        for r in selected:
            for name in self.slices_of(r):
                if f"slices|{name}" not in done and name not in slices:
                    slices.append(name)
                    t = self.cfg.slices[name].teacher
                    if t is not None and f"teacher|{t}" not in done:
                        teachers.setdefault(t, (t, None))

        finished = len(runs) - len(todo)

        def report(task: Tuple, rec: Dict[str, Any]) -> None:
            nonlocal finished
            if rec.get("skipped"):
                log(f"{rec['key']}: skipped, {rec['skipped']}")
                return
            if task[0] == "slices":
                log(f"slices {rec['name']}: {rec['num_slices']} slices of {rec['num_volumes']} volumes, labelled by "
                    f"{rec['labelled_by']} ({rec['wall_time_s']:.0f} s)")
                return
            dice, secs = _fmt(rec["test"].get("dice_mean")), rec["wall_time_s"]
            if task[0] == "teacher":
                log(f"teacher {rec['instance']}: test Dice {dice} ({secs:.0f} s)")
                return
            r = task[1]
            finished += 1
            log(f"[{finished}/{len(runs)}] {r.method:>16} {r.arch:>14} fraction {r.fraction:<5g} "
                f"seed {r.seed}: test Dice {dice} ({secs:.0f} s)")

        tasks = ([("teacher", name, r) for name, r in teachers.values()] + [("slices", name) for name in slices]
                 + [("student", r) for r in selected])
        if slices:
            log(f"writing {len(slices)} set(s) of teacher-labelled slices once their teachers are trained: {', '.join(slices)}")
        if teachers:
            log(f"training {len(teachers)} teacher(s): {', '.join(teachers)}"
                + (" (students that need no teacher run beside them)" if jobs > 1 else ""))
        if jobs == 1 or len(tasks) <= 1:
            for task in tasks:  # teachers first, then students in grid order
                report(task, self._task(task))
        else:
            self._run_parallel(tasks, jobs, report, self._needs(tasks))
        log(f"benchmark {self.cfg.name}: this invocation took {time.time() - t0:.0f} s")
        return read_records(self.results_path)

    def _task_key(self, task: Tuple) -> str:
        if task[0] == "slices":
            return f"slices|{task[1]}"
        return f"teacher|{self.teacher_instance(task[1], task[2])[0]}" if task[0] == "teacher" else task[1].key

    def claim_path(self, key: str) -> Path:
        """The claim file of run ``key``: ``<output_dir>/claims/<key>.claim``."""
        return self.out / "claims" / (re.sub(r"[^A-Za-z0-9._=-]+", "_", key) + ".claim")

    def _task(self, task: Tuple) -> Dict[str, Any]:
        """Train one teacher or student run, unless another benchmark process has claimed it.

        The run's claim file is created exclusively before anything is trained or deleted, so two
        processes on a shared file system (SLURM array tasks, nodes) never train the same run or remove
        each other's checkpoints; it is removed when the run ends (finished or failed). A claim of a dead
        process on this host is taken over; one of another host stays until its holder ends (delete the
        file by hand if that host died). A student whose teacher is not finished is left for later.
        """
        key = self._task_key(task)
        path = self.claim_path(key)
        if not claim(path):
            info = read_claim(path)
            return {"key": key, "skipped": f"claimed by {info.get('host', '?')} pid {info.get('pid', '?')} since "
                                           f"{info.get('since', '?')} ({path})"}
        try:
            if key in self.finished():  # finished by another process between our listing and our claim
                return {"key": key, "skipped": "finished by another process"}
            done = self.finished()
            missing = [m for m in self.needs_of(task) if m not in done]
            if missing:
                return {"key": key, "skipped": f"{', '.join(missing)} is not finished (trained elsewhere?)"}
            if task[0] == "slices":
                return self._slices(task[1])
            return self._teacher(task[1], task[2]) if task[0] == "teacher" else self._student(task[1])
        finally:
            release(path)

    def _needs(self, tasks: Sequence[Tuple]) -> List[set]:
        """For each task, the indices of the teacher and slices tasks in ``tasks`` it has to wait for."""
        index = {self._task_key(t): i for i, t in enumerate(tasks) if t[0] != "student"}
        return [{index[k] for k in self.needs_of(t) if k in index} for t in tasks]

    def _run_parallel(self, tasks: Sequence[Tuple], jobs: int, report, needs: Sequence[set]) -> None:
        """Run tasks in ``jobs`` worker processes (``cores // jobs`` torch threads each); report in finishing order.

        A task starts as soon as a worker is free and the teachers it needs (``needs[i]``, indices into
        ``tasks``) have finished: teachers first, and runs that need no teacher (baselines) fill the other
        workers while a long teacher trains instead of leaving cores idle.
        """
        import concurrent.futures as cf
        import multiprocessing as mp

        threads = max(1, cpu_count() // jobs)
        gpus = visible_gpus()
        counter = mp.get_context("spawn").Value("i", 0)  # worker numbers: worker i trains on GPU i % len(gpus)
        state = (OmegaConf.to_container(self.cfg, resolve=True), str(self.base), self.quick, threads, counter, gpus)
        waiting, done = list(range(len(tasks))), set()
        with cf.ProcessPoolExecutor(jobs, mp_context=mp.get_context("spawn"), initializer=_worker_init,
                                    initargs=state) as pool:
            running: Dict[Any, int] = {}
            try:
                while waiting or running:
                    while len(running) < jobs:
                        ready = next((i for i in waiting if needs[i] <= done), None)
                        if ready is None:
                            break
                        waiting.remove(ready)
                        running[pool.submit(_worker_run, tasks[ready])] = ready
                    if not running:  # cannot happen: teachers wait for nothing, slices for a teacher
                        raise RuntimeError("benchmark schedule: tasks wait for teachers that are not scheduled")
                    finished, _ = cf.wait(running, return_when=cf.FIRST_COMPLETED)
                    for f in finished:
                        i = running.pop(f)
                        rec = f.result()
                        done.add(i)
                        report(tasks[i], rec)
            except BaseException:
                for f in running:
                    f.cancel()
                raise

    def _prepare(self, log) -> None:
        """Run the ``prepare`` commands whose outputs are missing, each as ``lightning-distill ARGS`` in a
        child process (the benchmark drives the CLI from outside, it does not import it)."""
        import subprocess
        import sys

        for p in self.cfg.prepare:
            if Path(p.creates).exists():
                continue
            log(f"prepare: lightning-distill {' '.join(p.command)}")
            rc = subprocess.run([sys.executable, "-m", "lightning_distill.cli", *[str(a) for a in p.command]]).returncode
            if rc != 0 or not Path(p.creates).exists():
                raise RuntimeError(f"prepare step `lightning-distill {' '.join(p.command)}` failed (exit {rc}) "
                                   f"or did not create {p.creates}")

    def _teacher(self, name: str, run: GridRun) -> Dict[str, Any]:
        from lightning_distill.train import fit

        inst, _ = self.teacher_instance(name, run)
        cfg = self.teacher_config(name, run)
        res = fit(cfg, source=self._source(cfg))
        rec = self._record(f"teacher|{inst}", "teacher", cfg, res, {"teacher": name, "instance": inst})
        summary = bank_summary(Path(cfg.output_dir) / cfg.bank.export)
        if summary is not None:  # what the students are distilled from, for the report (regenerable from records)
            rec["bank"] = summary
        if self.cfg.teachers[name].score_on_students:
            from lightning_distill.config.load import apply_overrides
            from lightning_distill.lab.teacher_slices import score_teacher_on_student_slices

            first = GridRun(self.cfg.baseline, next(iter(self.cfg.archs)), max(self.cfg.fractions), self.cfg.seeds[0])
            scfg = self.run_config(first)
            on = score_teacher_on_student_slices(res["checkpoint"], scfg,
                                                 out=str(Path(cfg.output_dir) / "results_student_slices.json"))
            rec["student_slices"] = {"test": on["test"], "test_cases": on["test_cases"]}
            for ts_name, ts in self.cfg.test_sets.items():  # the extra test sets the students' best checkpoints meet
                if ts.checkpoint != "best" or ts.all_subjects:
                    continue
                on = score_teacher_on_student_slices(res["checkpoint"], apply_overrides(scfg.copy(), list(ts.overrides)),
                                                     out=str(Path(cfg.output_dir) / f"results_student_slices_{ts_name}.json"))
                rec.setdefault("student_slices_sets", {})[ts_name] = {"test": on["test"], "test_cases": on["test_cases"]}
        append_record(self.results_path, rec)
        return rec

    def _slices_record_config(self, cfg: DictConfig) -> Dict[str, Any]:
        """What a slices record compares on resume: the teach config without where it writes, and what teach
        reads of the student's config (preprocessing, grid, classes, levels), not the first run's seed or method."""
        from lightning_distill.data.build import make_preprocess
        from lightning_distill.teach import preprocess_record

        c = OmegaConf.to_container(cfg)
        for k in ("output", "overwrite", "processes", "student"):
            c.pop(k, None)
        st = load_config(cfg.student)
        student = {"shape": list(st.data.shape), "classes": None if st.classes is None else list(st.classes),
                   "source": st.data.source, "slice_z": list(st.data.phantom.slice_z),
                   "preprocess": preprocess_record(make_preprocess(st))}
        return {"teach": c, "student": student}

    def _check_same_slices(self, name: str, record: Dict[str, Any]) -> None:
        now = self._slices_record_config(self.slices_config(name))
        if record.get("config") != now:
            changed = sorted(k for k in set(flat_keys(now)) | set(flat_keys(record.get("config") or {}))
                             if flat_keys(now).get(k, MISSING_VALUE) != flat_keys(record.get("config") or {}).get(k, MISSING_VALUE))
            raise ConfigError(f"{self.results_path}: slices {name!r} were written with another config than {self.cfg.name!r} "
                              f"now asks for ({', '.join(changed[:5])}{', ...' if len(changed) > 5 else ''}); use another "
                              "output_dir (output_dir=...) or delete the old results to start over")

    def _slices(self, name: str) -> Dict[str, Any]:
        from lightning_distill.teach import run_teach

        cfg = self.slices_config(name)
        t0 = time.time()
        meta = run_teach(cfg)
        rec = {"key": f"slices|{name}", "kind": "slices", "name": name, "config": self._slices_record_config(cfg),
               "num_slices": meta["num_slices"], "num_volumes": meta["num_volumes"], "labelled_by": meta["labelled_by"],
               "model": meta["model"], "seconds": meta["seconds"], "wall_time_s": round(time.time() - t0, 1),
               "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}
        append_record(self.results_path, rec)
        return rec

    def _student(self, r: GridRun) -> Dict[str, Any]:
        from lightning_distill.train import evaluate, fit

        cfg = self.run_config(r)
        t0 = time.time()
        res = fit(cfg, source=self._source(cfg))
        extra: Dict[str, Any] = {}
        for name, ts in self.cfg.test_sets.items():
            ckpt = res.get("checkpoint") if ts.checkpoint == "best" else str(Path(cfg.output_dir) / "checkpoints" / "last.ckpt")
            if not ckpt or not Path(ckpt).is_file():
                raise RuntimeError(f"run {r.key}: no {ts.checkpoint} checkpoint to evaluate on test set {name!r} ({ckpt}; "
                                   "the last one needs checkpoint.save_last=true)")
            ev = evaluate(ckpt, list(ts.overrides), out=str(Path(cfg.output_dir) / f"results_{name}.json"),
                          all_subjects=ts.all_subjects)
            extra[name] = {"test": ev["test"], "test_cases": ev["test_cases"]}
        if not self.cfg.keep_checkpoints:
            shutil.rmtree(Path(cfg.output_dir) / "checkpoints", ignore_errors=True)
        rec = self._record(r.key, "student", cfg, res, {"method": r.method, "arch": r.arch, "fraction": r.fraction,
                                                          "seed": r.seed, "test_sets": extra})
        rec["wall_time_s"] = round(time.time() - t0, 1)
        append_record(self.results_path, rec)
        return rec

    @staticmethod
    def _record(key: str, kind: str, cfg: DictConfig, res: Dict[str, Any], fields: Dict[str, Any]) -> Dict[str, Any]:
        return {"key": key, "kind": kind, **fields, "train_subjects": res.get("train_subjects"),
                "steps": res.get("steps"), "test": res["test"], "test_cases": res["test_cases"],
                "val_dice_best": res.get("val", {}).get("dice_best"), "val_curve": res.get("val_curve"),
                "wall_time_s": res["wall_time_s"],
                "config": to_dict(cfg), "version": res.get("version"),
                **({"translations": res["translations"]} if res.get("translations") else {}),
                "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}

    def write_report(self, records: Optional[List[Dict[str, Any]]] = None) -> Path:
        from lightning_distill.lab.bench_report import write_report

        records = read_records(self.results_path) if records is None else records
        return write_report(self.cfg, records, self.command, quick=self.quick)


def bank_summary(path: str | Path) -> Optional[Dict[str, Any]]:
    """A probability bank as a record entry (classes, tau, the K x K matrix, voxels per row, the
    teacher's held-out reliability); ``None`` for a missing file or a feature-space bank."""
    from lightning_distill.bank.format import load_bank

    if not Path(path).is_file():
        return None
    bank = load_bank(path)
    if bank.space != "prob":
        return None
    return {"classes": list(bank.class_names), "tau": bank.tau, "matrix": bank.prototypes.tolist(),
            "counts": bank.counts.tolist(), "reliability": bank.meta.get("reliability")}


_WORKER: Optional[Benchmark] = None


def visible_gpus() -> List[str]:
    """The CUDA devices this process may use, as ``CUDA_VISIBLE_DEVICES`` entries, without initialising CUDA."""
    import os

    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [d.strip() for d in env.split(",") if d.strip() and d.strip() != "-1"]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []


def gpu_for_worker(index: int, gpus: Sequence[str]) -> Optional[str]:
    """The one GPU benchmark worker ``index`` trains on (round robin; ``None`` without GPUs): with
    ``jobs > 1`` every job would otherwise take every GPU."""
    return gpus[index % len(gpus)] if gpus else None


def _worker_init(cfg: Dict[str, Any], base: str, quick: bool, threads: int, counter=None, gpus: Sequence[str] = ()) -> None:
    import os
    import warnings

    if counter is not None:
        with counter.get_lock():
            index = counter.value
            counter.value += 1
        gpu = gpu_for_worker(index, list(gpus))
        if gpu is not None:  # before torch initialises CUDA in this process
            os.environ["CUDA_VISIBLE_DEVICES"] = gpu
    import torch

    global _WORKER
    _die_with_parent()
    torch.set_num_threads(threads)
    warnings.filterwarnings("ignore", message=r".*treespec, LeafSpec.*")  # as in cli.main
    for name in ("lightning.pytorch", "lightning.pytorch.utilities.rank_zero", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    _WORKER = Benchmark(OmegaConf.merge(OmegaConf.structured(BenchmarkConfig), cfg), Path(base), quick=quick)


def _die_with_parent() -> None:
    """Linux: a worker gets SIGKILL when the benchmark process dies (e.g. killed), instead of finishing its run
    as an orphan. Elsewhere a worker finishes its current run; its record is still written once."""
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _worker_run(task: Tuple) -> Dict[str, Any]:
    assert _WORKER is not None
    return _WORKER._task(task)


def _fmt(v: Optional[float]) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}"


def iter_students(records: Sequence[Dict[str, Any]]) -> Iterator[Dict[str, Any]]:
    return (r for r in records if r.get("kind") == "student")
