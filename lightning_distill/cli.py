"""Command line: ``lightning-distill fit CONFIG.yaml [key=value ...]``.

Overrides use OmegaConf's dotlist form, the same ``key=value`` words a W&B sweep agent passes with
``${args_no_hyphens}``.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path
from typing import List, Optional

from lightning_distill import __version__


class _ConfigKeysHelp(argparse.RawDescriptionHelpFormatter):
    """Help whose epilog names a config schema (``BankBuildConfig``, ``TeachConfig``): its keys are listed
    only when the help is printed, so no other command pays for reading the schemas."""

    def add_text(self, text):
        if text in ("BankBuildConfig", "TeachConfig"):
            from lightning_distill.config import commands
            from lightning_distill.config.load import schema_help

            text = "config keys (key = default):\n" + "\n".join(schema_help(getattr(commands, text)))
        super().add_text(text)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lightning-distill", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"lightning_distill {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    f = sub.add_parser("fit", help="train (teacher or student, by the config's `stage`), then test and write results")
    f.add_argument("config", help="YAML run config (see experiments/)")
    f.add_argument("overrides", nargs="*", help="key=value overrides, e.g. data.train_fraction=0.25 distill.weight=0")
    r = sub.add_parser("report", help="print a markdown table comparing finished runs (their results.json)")
    r.add_argument("runs", nargs="+", help="run output directories (or results.json files)")
    r.add_argument("--names", nargs="+", help="column names (default: directory names)")
    r.add_argument("--plot", help="also save a PNG: per-organ Dice bars (or, with --grid, Dice vs training subjects)")
    r.add_argument("--grid", action="store_true", help="pool runs over seeds: mean ± std per method and training size")
    r.add_argument("--results-name", default="results.json", help="with --grid: which results file of each run")
    r.add_argument("--bank-plot", nargs=2, metavar=("BANK", "PNG"), help="also save a heatmap of a prototypes.pt")
    sl = sub.add_parser("slices", help="extract one axial slice per subject from 3D volumes into a 2D NIfTI dataset",
                        description="Extract one axial slice per subject. Labels are copied as they are, or mapped to "
                        "the experiment's classes with the same keys as a run config: classes=[background,...] "
                        "data.nifti.label_map={5: liver} data.nifti.unmapped=background|ignore|error "
                        "data.nifti.on_missing=error|warn (or --config RUN.yaml). Folder layout: "
                        "data.nifti.image_pattern='images/image_{case}.nii.gz' "
                        "data.nifti.label_pattern='labels/label_{case}.nii.gz' ({case} = the case id).")
    sl.add_argument("src", help="dataset folder of 3D volumes (nnU-Net, MSD or plain folder layout)")
    sl.add_argument("dst", help="output folder (nnU-Net layout of 2D NIfTI files + dataset.json)")
    rule = sl.add_mutually_exclusive_group(required=True)
    rule.add_argument("--index", type=int, help="fixed axial index (RAS, from inferior)")
    rule.add_argument("--fraction", type=float, help="fraction of the z range (0 = most inferior)")
    rule.add_argument("--max-area", metavar="CLASS", help="the slice where this class (after mapping; without classes: "
                      "a label name of the dataset) is largest")
    rule.add_argument("--list", metavar="FILE", help="text file of '<case> <index>' lines")
    sl.add_argument("--config", help="take classes and data.nifti.* (label map, patterns) from this run config")
    sl.add_argument("--layout", choices=["auto", "nnunet", "msd", "folder"], help="= data.nifti.layout (default auto)")
    sl.add_argument("--image-pattern", help="= data.nifti.image_pattern: folder layout glob, {case} marks the case id")
    sl.add_argument("--label-pattern", help="= data.nifti.label_pattern: folder layout label path with {case}")
    sl.add_argument("--no-labels", action="store_true", help="write images only (no label file is read)")
    sl.add_argument("--overwrite", action="store_true", help="replace a non-empty destination (once the new one is complete)")
    sl.add_argument("overrides", nargs="*", help="classes=[...] and data.nifti.* key=value overrides")
    pr = sub.add_parser("predict", help="predict masks for a NIfTI file or folder with a trained checkpoint",
                        description="Predict masks. Every input is checked (header, 2D/3D, complete data) before any "
                        "inference; a folder's masks are moved into the output folder only when all are predicted, so "
                        "a failure leaves it as it was. Masks keep the input's file name with an nnU-Net channel suffix "
                        "_0000 dropped (case_0000.nii.gz -> case.nii.gz); two inputs with the same mask name (a.nii.gz "
                        "and a_0000.nii.gz) are refused. Inputs whose intensities are unlike the training data's get a "
                        "warning naming the override to try (e.g. data.nifti.ct_window=[lo,hi]).")
    pr.add_argument("checkpoint", help="a .ckpt written by `lightning-distill fit` (e.g. runs/student/checkpoints/best.ckpt)")
    pr.add_argument("input", help="a .nii/.nii.gz file or a folder of them; or a DICOM file, series folder or folder of "
                    "series (one mask per series, named <SeriesInstanceUID>.nii.gz)")
    pr.add_argument("output", help="output file (for one input file) or folder; masks are named like their inputs "
                    "without _0000 (case_0000.nii.gz -> case.nii.gz)")
    pr.add_argument("overrides", nargs="*", help="key=value overrides of the checkpoint's config (e.g. preprocessing)")
    pr.add_argument("--device", default="auto", help="auto (CUDA when available; bf16/fp16 autocast there), cpu, cuda, cuda:N")
    pr.add_argument("--batch-size", type=int, default=16, help="slices per forward of a 2D model (default 16)")
    pr.add_argument("--sw-batch-size", type=int, help="windows per forward of a 3D model (default: the config's sw_batch_size)")
    pr.add_argument("--dicom-seg", action="store_true", help="DICOM inputs: also write each series' mask as a DICOM "
                    "Segmentation referencing the series (<uid>.seg.dcm, one segment per class found)")
    ev = sub.add_parser("test", help="evaluate a checkpoint on the test split of its config (with overrides)")
    ev.add_argument("checkpoint")
    ev.add_argument("overrides", nargs="*", help="key=value overrides, e.g. data.nifti.slice_mode=all")
    ev.add_argument("--out", help="results file (default: <output_dir>/results_test.json)")
    ev.add_argument("--all", action="store_true", help="test on every subject of the data, not the config's test split")
    ev.add_argument("--device", default="auto", help="auto (one CUDA device when available), cpu, cuda, cuda:N")
    cd = sub.add_parser("check-data", help="read and check every case of a config's NIfTI data up front, in parallel; "
                        "write a report of bad cases, good cases and the label map",
                        description="Every case read, checked and preprocessed as a run would (data.nifti.open=eager does "
                        "it at every start); exit status 1 when a case is bad. Writes data_check.json and data_check.md.")
    cd.add_argument("config")
    cd.add_argument("overrides", nargs="*")
    cd.add_argument("--jobs", type=int, default=1, help="worker processes (default 1)")
    cd.add_argument("--out", help="report folder (default: <output_dir>/data_check)")
    ph = sub.add_parser("phantom", help="write a config's phantom population as a NIfTI dataset (nnU-Net, or a plain folder)")
    ph.add_argument("config")
    ph.add_argument("dst")
    ph.add_argument("overrides", nargs="*")
    ph.add_argument("--overwrite", action="store_true")
    ph.add_argument("--layout", choices=["nnunet", "folder"], default="nnunet",
                    help="folder: images/image_<case>.nii.gz and labels/label_<case>.nii.gz, label ids without names")
    b = sub.add_parser("benchmark", help="run (or resume) a benchmark grid and write its report (see experiments/benchmarks/)")
    b.add_argument("config", help="benchmark YAML, e.g. experiments/benchmarks/phantom.yaml")
    b.add_argument("overrides", nargs="*", help="key=value overrides of the benchmark YAML, e.g. seeds=[0] output_dir=runs/b")
    b.add_argument("--quick", action="store_true", help="tiny sizes and a small grid (the same code path, about a minute)")
    b.add_argument("--report-only", action="store_true", help="only rebuild the report from the finished runs")
    b.add_argument("--max-runs", type=int, help="stop after this many new student runs (the rest resume next time)")
    b.add_argument("--jobs", type=int, help="student runs at once, each in its own process (default: the YAML's `jobs`)")
    sw = sub.add_parser("sweep", help="check a W&B sweep YAML, or run its trials here without a W&B server (--local)")
    sw.add_argument("sweep", help="W&B sweep YAML, e.g. experiments/sweeps/student.yaml")
    sw.add_argument("overrides", nargs="*", help="key=value overrides appended to every trial (e.g. trainer.max_steps=100)")
    sw.add_argument("--local", action="store_true", help="sample the sweep's space here and run the trials one by one")
    sw.add_argument("--count", type=int, help="trials (random/bayes: required; grid: at most this many)")
    sw.add_argument("--seed", type=int, default=0, help="seed of the random draws")
    sw.add_argument("--out", help="folder of the trials and results.md (default: runs/sweeps/<sweep name>)")
    sw.add_argument("--dry-run", action="store_true", help="print the trial command lines only")
    bk = sub.add_parser("bank", help="compute a prototype bank from a trained 3D model over a folder of volumes, or inspect one")
    bsub = bk.add_subparsers(dest="bank_command", required=True)
    bb = bsub.add_parser("build", help="a bank from a trained 3D model (our checkpoint, a MONAI network state_dict, a MONAI "
                         "bundle or TorchScript) over labelled or unlabelled volumes; resumable, multi-process",
                         description="Compute a prototype bank from a trained 3D model over a folder of NIfTI volumes "
                         "(see docs/bank.md); overrides key=value.",
                         epilog="BankBuildConfig",
                         formatter_class=_ConfigKeysHelp)
    bb.add_argument("config", nargs="?", help="bank build YAML, e.g. experiments/bank.yaml (or only key=value overrides)")
    bb.add_argument("overrides", nargs="*", help="key=value overrides, e.g. data.root=/data/ct processes=2")
    bm = bsub.add_parser("merge", help="one bank from banks built over disjoint sets of volumes (e.g. one folder per "
                         "intensity scale, each built with its own data.preprocess): each row the mean over all their voxels",
                         description="Merge prototype banks of `bank build` (or of teacher runs) into one: every row is the "
                         "count-weighted mean of the banks' rows, the row one build over all their volumes would give. "
                         "The banks must have the same classes, space and temperatures.")
    bm.add_argument("output", help="the merged bank (.pt), written whole or not at all")
    bm.add_argument("banks", nargs="+", help="two or more banks (prototypes.pt)")
    bm.add_argument("--overwrite", action="store_true", help="replace an existing output")
    bi = bsub.add_parser("inspect", help="print per-class rows (entropy, off-diagonal mass, reliability) and the bank's "
                         "distance from the identity under every geometry and temperature; write a PNG",
                         description="Print a bank's diagnostics (markdown) and write a PNG. A distance from the identity "
                         "near 0 means a loss in that geometry is almost blind to what the bank knows beyond the labels.")
    bi.add_argument("bank", help="a prototypes.pt (or a checkpoint of `lightning-distill fit`, which carries its run's bank)")
    bi.add_argument("--png", help="where to write the figure (default: <bank>_inspect.png beside the bank)")
    cv = sub.add_parser("convert", help="DICOM cases (an image series with a DICOM-SEG or per-organ DICOM masks) into an "
                        "nnU-Net dataset", description="Convert a folder of DICOM cases, one subfolder each (an image "
                        "series and its masks: a DICOM-SEG, or a folder of per-organ mask series), into an nnU-Net dataset "
                        "whose dataset.json names every label found; map them to a run's classes with data.nifti.label_map "
                        "(docs/data.md).")
    cv.add_argument("source", help="a folder with one subfolder per case")
    cv.add_argument("output", help="the nnU-Net dataset folder to write (whole or not at all)")
    cv.add_argument("--masks", default="MASKS_DICOM", help="the per-organ mask folder of a case (default MASKS_DICOM)")
    cv.add_argument("--overwrite", action="store_true", help="replace an existing output")
    ex = sub.add_parser("export", help="a checkpoint's network as ONNX (.onnx) or TorchScript (.pt/.ts), batch and "
                        "spatial size free, with its classes and preprocessing in the file's metadata",
                        description="Export a checkpoint's network for deployment without this package (docs/cli.md "
                        "shows a prediction with onnxruntime alone).")
    ex.add_argument("checkpoint", help="a .ckpt of `lightning-distill fit`")
    ex.add_argument("output", help="model.onnx (ONNX) or model.pt / model.ts (TorchScript)")
    ex.add_argument("--overwrite", action="store_true", help="replace an existing output")
    te = sub.add_parser("teach", help="2D training slices of volumes labelled by a trained 3D (or 2D) model, for a student's "
                        "transfer.slices (or ground-truth slices only: model.format=none, the union route)",
                        description="Run a trained model (our checkpoint, a MONAI network state_dict, a MONAI bundle or "
                        "TorchScript; a 2D checkpoint as the control of the third dimension) over a folder of volumes "
                        "(or phantom volumes rendered on the fly) and write axial slices at chosen levels, each "
                        "preprocessed as the student's, with the model's probabilities and confidence (docs/methods.md). "
                        "Resumable, multi-process, written whole or not at all; overrides key=value "
                        "(experiments/teach.yaml explains the keys).",
                        epilog="TeachConfig",
                        formatter_class=_ConfigKeysHelp)
    te.add_argument("config", nargs="?", help="teach YAML, e.g. experiments/teach.yaml (or only key=value overrides)")
    te.add_argument("overrides", nargs="*", help="key=value overrides, e.g. data.num_subjects=50 processes=2")
    cp = sub.add_parser("compare", help="a student beside its 3D teacher (and the baseline) on the same test slices",
                        description="Score the 3D teacher on the student's own test slices (each subject rendered as a "
                        "volume with a plane through the slice; phantom only) and print per-organ Dice of the student, "
                        "the baseline (if given) and the teacher, with paired differences and bootstrap 95%% CIs. "
                        "Writes <student_run>/comparison.md and results_teacher_slices.json.")
    cp.add_argument("student_run", help="the student's run directory (results.json, config.yaml), e.g. runs/student")
    cp.add_argument("--teacher", required=True, help="the 3D teacher's checkpoint, e.g. runs/teacher/checkpoints/best.ckpt")
    cp.add_argument("--baseline", help="the baseline's run directory (same test slices), e.g. runs/baseline")
    c = sub.add_parser("config", help="print the resolved config (defaults + file + overrides) and exit")
    c.add_argument("config")
    c.add_argument("overrides", nargs="*")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    # key=value words after an option (e.g. `test CKPT --out f.json a=b`) are overrides too
    if extra and hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
        args.overrides = list(args.overrides) + extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach a model hub at run time
    warnings.filterwarnings("ignore", message=r".*treespec, LeafSpec.*")  # Lightning-internal deprecation noise
    warnings.formatwarning = _format_warning
    try:
        return _COMMANDS[args.command](args)
    except (ValueError, FileNotFoundError, FileExistsError, KeyError) as e:
        # bad input, config or files: one clear line (ConfigError and DataError are ValueErrors)
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"lightning-distill: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: one line, no traceback (outputs are written whole or not at all)
        print(f"lightning-distill: interrupted ({args.command})", file=sys.stderr)
        return 130


_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
_format_other = warnings.formatwarning


def _format_warning(message, category, filename, lineno, line=None) -> str:
    """The package's own warnings as one line that starts with the command (the message names the file or setting
    it is about; the package's source line would tell a user nothing); other libraries' as Python prints them."""
    if os.path.abspath(filename).startswith(_PACKAGE_DIR + os.sep) and issubclass(category, UserWarning):
        return f"lightning-distill: warning: {message}\n"
    return _format_other(message, category, filename, lineno, line)


def _load(args):
    from lightning_distill.config.run import load_config

    return load_config(args.config, args.overrides)


def _fit(args) -> int:
    from lightning_distill.train import fit

    fit(_load(args))
    return 0


def _config(args) -> int:
    from omegaconf import OmegaConf

    print(OmegaConf.to_yaml(_load(args), resolve=True), end="")
    return 0


def _predict(args) -> int:
    from lightning_distill.inference import predict

    written = predict(args.checkpoint, args.input, args.output, args.overrides, device=args.device,
                      batch_size=args.batch_size, sw_batch_size=args.sw_batch_size, dicom_seg=args.dicom_seg)
    print(f"wrote {len(written)} mask(s): {written[0] if len(written) == 1 else args.output}")
    return 0


def _test(args) -> int:
    from lightning_distill.train import evaluate

    evaluate(args.checkpoint, args.overrides, args.out, all_subjects=args.all, device=args.device)
    return 0


def _slices(args) -> int:
    from omegaconf import OmegaConf

    from lightning_distill.config.run import load_config
    from lightning_distill.slices import extract_slices

    used = [o for o in args.overrides if not o.lstrip("~").startswith(("classes=", "data.nifti."))]
    if used:
        raise ValueError(f"slices takes only classes=... and data.nifti.* overrides, got {used}")
    cfg = load_config(args.config, args.overrides)
    n = cfg.data.nifti
    rule = next(r for r in ("index", "fraction", "max_area", "list") if getattr(args, r) is not None)
    chosen = extract_slices(args.src, args.dst, rule.replace("_", "-"), getattr(args, rule),
                            layout=args.layout or n.layout, overwrite=args.overwrite,
                            image_pattern=args.image_pattern or n.image_pattern,
                            label_pattern=args.label_pattern if args.label_pattern is not None else n.label_pattern,
                            classes=list(cfg.classes) if cfg.classes else None,
                            label_map=OmegaConf.to_container(n.label_map), unmapped=n.unmapped, on_missing=n.on_missing,
                            labels=not args.no_labels)
    print(f"wrote {len(chosen)} single-slice cases to {args.dst}")
    return 0


def _report(args) -> int:
    from lightning_distill.lab.report import compare_table, grid_table, plot_bank, plot_dice, plot_grid

    print(grid_table(args.runs, args.results_name) if args.grid else compare_table(args.runs, args.names), end="")
    if args.plot and args.grid:
        plot_grid(args.runs, args.plot, args.results_name)
    elif args.plot:
        plot_dice(args.runs, args.plot, args.names)
    if args.bank_plot:
        plot_bank(*args.bank_plot)
    return 0


def _compare(args) -> int:
    from lightning_distill.lab.teacher_slices import compare_on_student_slices

    print(compare_on_student_slices(args.student_run, args.teacher, args.baseline), end="")
    return 0


def _bank(args) -> int:
    if args.bank_command == "build":
        return _bank_build(args)
    if args.bank_command == "merge":
        return _bank_merge(args)
    from lightning_distill.lab.bank_inspect import inspect_bank

    text, png = inspect_bank(args.bank, args.png)
    print(text, end="")
    print(f"figure: {png}")
    return 0


def _bank_build(args) -> int:
    from lightning_distill.bank.build import describe, run_bank_build
    from lightning_distill.config.commands import load_bank_build_config
    from lightning_distill.bank.format import load_bank

    config, overrides = args.config, list(args.overrides)
    if config is not None and "=" in config:  # only overrides
        config, overrides = None, [config, *overrides]
    path = run_bank_build(load_bank_build_config(config, overrides))
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun: one report
        print(describe(load_bank(path)))
        print(f"wrote {path}")
    return 0


def _bank_merge(args) -> int:
    from lightning_distill.bank.format import load_bank, merge_banks, save_bank

    out = Path(args.output)
    if out.exists() and not args.overwrite:
        raise FileExistsError(f"{out} exists; pass --overwrite to replace it")
    bank = merge_banks([load_bank(b) for b in args.banks], sources=list(args.banks))
    save_bank(out, bank)
    for src in bank.meta["merged_from"]:
        print(f"{src['bank']}: {int(sum(src['counts']))} voxels ({src['mode']}; data {src['data']}; preprocess {src['preprocess']})")
    print("voxels per class: " + ", ".join(f"{n} {c}" for n, c in bank.meta["class_voxels"].items()))
    print(f"wrote {out} (merged from {len(args.banks)} banks)")
    return 0


def _convert(args) -> int:
    from lightning_distill.convert import convert, describe

    found = convert(args.source, args.output, masks=args.masks, overwrite=args.overwrite)
    print(describe(found))
    print(f"wrote {len(found)} case(s) to {args.output}")
    return 0


def _export(args) -> int:
    from lightning_distill.export import export

    out = export(args.checkpoint, args.output, overwrite=args.overwrite)
    print(f"wrote {out}")
    return 0


def _teach(args) -> int:
    from lightning_distill.config.commands import load_teach_config
    from lightning_distill.teach import describe, run_teach

    config, overrides = args.config, list(args.overrides)
    if config is not None and "=" in config:  # only overrides
        config, overrides = None, [config, *overrides]
    cfg = load_teach_config(config, overrides)
    meta = run_teach(cfg)
    if meta:  # under torchrun: rank 0 reports
        print(describe(meta))
        print(f"wrote {cfg.output}")
    return 0


def _benchmark(args) -> int:
    from lightning_distill.lab.bench_config import load_benchmark
    from lightning_distill.lab.benchmark import Benchmark

    cfg, base = load_benchmark(args.config, args.overrides, quick=args.quick)
    words = ["lightning-distill benchmark", args.config, *(["--quick"] if args.quick else []), *args.overrides]
    bench = Benchmark(cfg, base, quick=args.quick, command=" ".join(words))
    records = None if args.report_only else bench.run(max_runs=args.max_runs, jobs=args.jobs)
    path = bench.write_report(records)
    print(f"report: {path}")
    return 0


def _check_data(args) -> int:
    from pathlib import Path

    from lightning_distill.data.check import bad_lines, check_data

    cfg = _load(args)
    out = Path(args.out or Path(cfg.output_dir) / "data_check")
    report = check_data(cfg, out, jobs=args.jobs)
    print(f"{report['root']}: {report['cases']} cases, {report['good']} good, {len(report['bad'])} bad "
          f"({report['seconds']} s, {args.jobs} process(es)); report: {out / 'data_check.md'}")
    for p in report["coverage_problems"]:
        print(f"  coverage: {p}")
    if report["bad"]:
        print("\n".join(bad_lines(report)))
        return 1
    return 0


def _phantom(args) -> int:
    from lightning_distill.data.sources import PhantomSource, export_phantom
    from lightning_distill.data.build import build_source

    src = build_source(_load(args))
    if not isinstance(src, PhantomSource):
        raise ValueError(f"{args.config}: data.source is not the phantom")
    n = export_phantom(src, args.dst, overwrite=args.overwrite, layout=args.layout)
    print(f"wrote {n} phantom cases to {args.dst}")
    if args.layout == "folder":
        print("label ids: " + ", ".join(f"{i} {name}" for i, name in enumerate(src.class_names)))
    return 0


def _sweep(args) -> int:
    from pathlib import Path

    from lightning_distill.lab.sweep import command_for, load_sweep, run_local, sample

    sweep = load_sweep(args.sweep)
    if not args.local:
        points = sample(sweep, args.count or (None if sweep["method"] == "grid" else 1), args.seed)
        print(f"{args.sweep}: valid {sweep['method']} sweep of {len(sweep['parameters'])} parameters, metric "
              f"{sweep['metric']['name']} ({sweep['metric']['goal']}); an agent would run e.g.:\n  "
              + " ".join(command_for(sweep, points[0])))
        print("With a W&B server: make sweep SWEEP=FILE, then make agent SWEEP_ID=...; without: add --local --count N")
        return 0
    out = args.out or str(Path("runs") / "sweeps" / str(sweep.get("name") or Path(args.sweep).stem))
    records = run_local(args.sweep, args.count, out, seed=args.seed, extra=args.overrides, dry_run=args.dry_run)
    if records:
        print(f"results: {Path(out) / 'results.md'}")
    return 0 if all(r["returncode"] == 0 for r in records) else 1


_COMMANDS = {"fit": _fit, "config": _config, "predict": _predict, "test": _test, "slices": _slices,
             "report": _report, "bank": _bank, "export": _export, "convert": _convert, "compare": _compare, "phantom": _phantom, "benchmark": _benchmark, "sweep": _sweep,
             "check-data": _check_data, "teach": _teach}


if __name__ == "__main__":
    sys.exit(main())
