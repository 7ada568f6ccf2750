"""Score a 3D teacher on the very test slices a 2D student is scored on.

Whether 3D->2D distillation can transfer knowledge depends on a teacher that knows more than the 2D
student *on the same images*. For the phantom (``data.source=phantom`` in both configs) every test
subject of the student is rendered as a volume on the teacher's grid with one axial plane exactly
through the subject's slice (:func:`~lightning_distill.data.phantom.render_volume` with
``through=slice_z``; its labels on that plane are the student's label map, which is checked). The
teacher segments the whole volume, and its prediction on that plane is scored against the student's
test label with the student's metrics (per case Dice, HD95 and surface Dice, the student's spacing).
The volumes are acquired like the student's population (its phantom seed, phase, noise and HU
window), so the teacher meets the student's scans, not its own population's. A 2D teacher (a
control: the same abundant data without the third dimension) is simply run on the student's test
images.

For NIfTI data (``data.source=nifti``, e.g. CHAOS) a 3D teacher predicts each test subject's whole
volume from the teacher's data folder with its own preprocessing (``predict``'s path: probabilities
mapped back to the volume's grid); the prediction is then cut and preprocessed exactly as the
student's test sample was: the slice of ``lightning-distill slices`` (its ``dataset.json`` records
which one) for single-slice files, every axial slice for ``data.nifti.slice_mode=all``. The ground
truth taken the same way must equal the student's test label (checked). A 2D teacher is run on the
student's test images and needs the student's ``data.shape``.

Phantom requirements (a ``ValueError`` names what differs): both configs use the phantom; the teacher's
in-plane grid equals the student's ``data.shape``; the class names agree; the student's test set has
no domain shift (a 2D shift has no 3D counterpart here); both use the same modality and HU window.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Dict, Optional

import numpy as np
import torch
from omegaconf import DictConfig

from lightning_distill.data.phantom import hu_window, render_volume, sample_subject
from lightning_distill.data.sources import mr_percentile_normalise


def score_teacher_on_student_slices(teacher_checkpoint: str, student_cfg: DictConfig, out: Optional[str] = None,
                                    device: str = "cpu") -> Dict[str, Any]:
    """Test a 3D teacher checkpoint on the test slices of ``student_cfg`` (see the module docstring).

    Args:
        teacher_checkpoint: a 3D teacher's ``.ckpt`` written by ``lightning-distill fit``.
        student_cfg: the student's run config (its ``data`` defines the test slices).
        out: write the results (``results.json`` format, ``stage: teacher_on_student_slices``) here.
        device: where the teacher runs.

    Returns:
        ``{"test": summary (metrics.summarize), "test_cases": per-case rows, "checkpoint",
        "test_ids", "wall_time_s"}`` (the keys of a student's ``results.json``).
    """
    from lightning_distill.checkpoints import load_checkpoint, load_network
    from lightning_distill.modules import check_checkpoint
    from lightning_distill.data.build import build_datamodule, build_source, class_names

    t0 = time.time()
    ckpt, tcfg = load_checkpoint(teacher_checkpoint)
    where = f"teacher checkpoint {teacher_checkpoint}"
    if tcfg.data.source == "nifti" and student_cfg.data.source == "nifti":
        return _score_nifti(ckpt, tcfg, student_cfg, teacher_checkpoint, out, device, t0)
    if tcfg.data.source != "phantom" or student_cfg.data.source != "phantom":
        raise ValueError(f"{where}: scoring a teacher on the student's slices is implemented for the phantom only "
                         f"(teacher data.source={tcfg.data.source}, student data.source={student_cfg.data.source})")
    tshape, sshape = list(tcfg.data.shape), list(student_cfg.data.shape)
    if len(tshape) not in (2, 3) or len(sshape) != 2:
        raise ValueError(f"{where}: needs a 3D (or 2D) teacher (data.shape {tshape}) and a 2D student (data.shape {sshape})")
    if tshape[:2] != sshape:
        raise ValueError(f"{where}: the teacher's in-plane grid {tshape[:2]} differs from the student's data.shape {sshape}; "
                         "train the teacher at the student's in-plane size (experiments/teacher.yaml: data.shape)")
    if list(tcfg.data.window) != list(student_cfg.data.window) or tcfg.data.phantom.modality != student_cfg.data.phantom.modality:
        raise ValueError(f"{where}: the teacher was trained on {tcfg.data.phantom.modality} windowed {list(tcfg.data.window)}, the "
                         f"student's images are {student_cfg.data.phantom.modality} windowed {list(student_cfg.data.window)}; "
                         "the teacher would see other intensities than it learned")
    source = build_source(student_cfg)
    if not source.shift.identity:
        raise ValueError(f"{where}: the student's test set has a domain shift ({source.shift}); it has no 3D counterpart here")
    names = class_names(student_cfg, source)
    check_checkpoint(ckpt, names, where)
    net = load_network(ckpt, tcfg).to(device)
    dm = build_datamodule(student_cfg, source, training=False)
    test_ids = list(dm.splits["test"])
    preds = []
    for sid in test_ids:
        idx = int(sid.rsplit("_", 1)[1])
        sample = source.load(sid)
        if len(tshape) == 2:  # a 2D teacher: the student's own test image
            pred = _predict_2d(net, sample, device)
        else:
            vol = render_volume(source.spec, idx, tshape, through=sample_subject(source.spec, idx).slice_z)
            plane = vol["label"][..., vol["z_index"]].astype(np.int64)
            if not np.array_equal(plane, sample["label"]):
                raise RuntimeError(f"{sid}: the volume's plane does not match the student's slice (phantom rendering changed?)")
            img = mr_percentile_normalise(vol["image"]) if source.spec.modality == "MR" else hu_window(vol["image"], *source.window)
            with torch.no_grad():
                logits = net(torch.from_numpy(np.ascontiguousarray(img))[None, None].to(device))
            pred = logits.argmax(1)[..., vol["z_index"]].cpu()  # (1, X, Y)
        preds.append((pred, sample))
    what = "the student's test images" if len(tshape) == 2 else "the plane through it of the subject's volume"
    return _results(names, test_ids, preds, student_cfg, teacher_checkpoint, what, out, t0)


def _predict_2d(net, sample: Dict[str, Any], device: str) -> torch.Tensor:
    """A 2D teacher's label map ``(1, X, Y)`` of the student's own test image."""
    with torch.no_grad():
        return net(torch.from_numpy(np.ascontiguousarray(sample["image"]))[None].to(device)).argmax(1).cpu()


def _results(names, test_ids, preds, student_cfg: DictConfig, teacher_checkpoint, what: str, out: Optional[str],
             t0: float) -> Dict[str, Any]:
    """Score ``preds`` (``(label map (1, X, Y), the student's sample)`` per test id) with the student's
    metrics and spacing; write ``out`` when given."""
    from lightning_distill.io import write_json
    from lightning_distill.metrics import collect_cases, per_case_dice, per_case_surface_metrics, summarize

    k, tol = len(names), student_cfg.get("surface_tolerance_mm")
    dice, hd, sd = [], [], []
    for pred, sample in preds:
        label = torch.from_numpy(np.asarray(sample["label"]).astype(np.int64))[None]
        spacing = np.asarray(sample["spacing"], float)[None]
        dice.append(per_case_dice(pred, label, k).cpu())
        case_hd, case_sd = per_case_surface_metrics(pred, label, k, spacing, tol)
        hd.append(case_hd)
        sd.append(case_sd)
    dice_t, hd_t, sd_t = torch.cat(dice), torch.cat(hd), torch.cat(sd)
    organs = list(names[1:])
    summary = summarize(dice_t, hd_t, organs, surface_dice=sd_t)
    results = {"stage": "teacher_on_student_slices", "test": summary, "checkpoint": str(teacher_checkpoint),
               "test_cases": collect_cases(test_ids, dice_t, hd_t, organs, surface_dice=sd_t),
               "test_set": f"{len(test_ids)} student test slices, each scored on {what}",
               "test_ids": test_ids, "wall_time_s": round(time.time() - t0, 1)}
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        write_json(out, results)
    return results


def _score_nifti(ckpt: dict, tcfg: DictConfig, student_cfg: DictConfig, teacher_checkpoint: str, out: Optional[str],
                 device: str, t0: float) -> Dict[str, Any]:
    """The NIfTI path of :func:`score_teacher_on_student_slices` (see the module docstring)."""
    import json

    from lightning_distill.data.nifti import discover, read_case
    from lightning_distill.checkpoints import load_network
    from lightning_distill.inference import predict_array
    from lightning_distill.modules import check_checkpoint
    from lightning_distill.slices import to_ras
    from lightning_distill.data.build import build_datamodule, build_source, class_names

    where = f"teacher checkpoint {teacher_checkpoint}"
    tshape, sshape = list(tcfg.data.shape), list(student_cfg.data.shape)
    if len(sshape) != 2 or len(tshape) not in (2, 3):
        raise ValueError(f"{where}: needs a 3D (or 2D) teacher (data.shape {tshape}) and a 2D student (data.shape {sshape})")
    if len(tshape) == 2 and tshape != sshape:
        raise ValueError(f"{where}: a 2D teacher is run on the student's test images: its data.shape {tshape} must be "
                         f"the student's {sshape}")
    if tcfg.data.nifti.modality != student_cfg.data.nifti.modality:
        raise ValueError(f"{where}: the teacher was trained on {tcfg.data.nifti.modality} images, the student's are "
                         f"{student_cfg.data.nifti.modality}")
    source = build_source(student_cfg)
    names = class_names(student_cfg, source)
    check_checkpoint(ckpt, names, where)
    net = load_network(ckpt, tcfg).to(device).eval()
    test_ids = list(build_datamodule(student_cfg, source, training=False).splits["test"])
    volumes = {c.case_id: c for c in discover(tcfg.data.nifti.root, tcfg.data.nifti.layout, tcfg.data.nifti.image_pattern,
                                               tcfg.data.nifti.label_pattern, require_labels=False).cases}
    chosen: Dict[str, int] = {}
    if source.slice_mode == "file" and len(tshape) == 3:
        meta = Path(student_cfg.data.nifti.root) / "dataset.json"
        chosen = json.loads(meta.read_text()).get("slices", {}) if meta.is_file() else {}
    predicted: Dict[str, Dict[str, np.ndarray]] = {}  # subject -> {sample id: the teacher's label on the student's grid}

    def teacher_labels(subject: str) -> Dict[str, np.ndarray]:
        if subject not in volumes:
            raise ValueError(f"{where}: the student's test subject {subject!r} has no volume in the teacher's data "
                             f"{tcfg.data.nifti.root}")
        image, label, affine, _ = read_case(volumes[subject], 3, source.mapping, require_foreground=False)
        with torch.no_grad():
            pred = predict_array(net, tcfg, image[0] if image.shape[0] == 1 else image, affine).astype(np.int64)
        if source.slice_mode == "all":
            mine, truth = source._per_slice(image, pred, affine), source._per_slice(image, label, affine)
            return {f"{subject}@{z}": (mine["label"][..., z], truth["label"][..., z]) for z in range(mine["label"].shape[-1])}
        if subject not in chosen:
            raise ValueError(f"{where}: {student_cfg.data.nifti.root}/dataset.json does not say which slice of {subject!r} "
                             "the student's file is (write single-slice data with `lightning-distill slices`)")
        z = int(chosen[subject])
        case = source.cases[subject]
        s_image, _, s_affine, _ = read_case(case, 3, source.mapping, require_foreground=False)
        planes = []
        for vol in (pred, label):
            canon, _ = to_ras(vol, affine)
            planes.append(canon[:, :, z:z + 1])
        if planes[0].shape[:2] != s_image.shape[1:3]:
            raise ValueError(f"{where}: slice {z} of {subject}'s volume has shape {planes[0].shape[:2]}, the student's file "
                             f"{s_image.shape[1:3]}")
        out_ = [source.preprocess(s_image, s_affine, plane)[1].as_tensor()[0, ..., 0].numpy() for plane in planes]
        return {subject: tuple(out_)}

    preds = []
    for sid in test_ids:
        sample = source.load(sid)
        subject = sid.split("@", 1)[0]
        if len(tshape) == 2:  # a 2D teacher: the student's own test image
            pred = _predict_2d(net, sample, device)
        else:
            if subject not in predicted:
                predicted[subject] = teacher_labels(subject)
            mine, truth = predicted[subject][sid]
            if not np.array_equal(truth.astype(np.int64), np.asarray(sample["label"]).astype(np.int64)):
                raise RuntimeError(f"{sid}: the teacher's volume, cut like the student's sample, does not give the "
                                   "student's label (another slice or preprocessing?)")
            pred = torch.from_numpy(np.ascontiguousarray(mine.astype(np.int64)))[None]
        preds.append((pred, sample))
    what = ("the student's test images" if len(tshape) == 2 else
            "the teacher's prediction of the whole volume, cut and preprocessed like the student's sample")
    return _results(names, test_ids, preds, student_cfg, teacher_checkpoint, what, out, t0)


def compare_on_student_slices(student_run: str, teacher_checkpoint: str, baseline_run: Optional[str] = None,
                              bootstrap: int = 2000) -> str:
    """A markdown table of per-organ test Dice: the student, the 3D teacher on the same slices
    (:func:`score_teacher_on_student_slices`, written to ``<student_run>/results_teacher_slices.json``)
    and, when given, the baseline; with paired differences over the slices (bootstrap 95% CIs).
    The table is also written to ``<student_run>/comparison.md``.

    A baseline whose test slices are not the student's is refused (``ValueError``).
    """
    from lightning_distill.lab.stats import case_scores, fmt_ci, organ_scores, paired_bootstrap
    from lightning_distill.config.run import load_config
    from lightning_distill.io import write_text
    from lightning_distill.lab.report import load_results

    run = Path(student_run)
    student = load_results(run)
    cfg = load_config(str(run / "config.yaml"))
    teacher = score_teacher_on_student_slices(teacher_checkpoint, cfg, out=str(run / "results_teacher_slices.json"))
    ids = [c["id"] for c in student["test_cases"]]
    if sorted(ids) != sorted(teacher["test_ids"]):
        raise ValueError(f"{run}: the student's results.json tests other slices than its config.yaml gives (re-run the student)")
    cols = [("student", student), ("3D teacher", teacher)]
    if baseline_run is not None:
        base = load_results(baseline_run)
        bids = [c["id"] for c in base.get("test_cases", [])]
        if sorted(bids) != sorted(ids):
            raise ValueError(f"{baseline_run}: the baseline was tested on other slices than the student {run} "
                             f"({len(bids)} vs {len(ids)} test cases, {len(set(bids) & set(ids))} in common); "
                             "train both with the same data settings")
        cols.insert(1, ("baseline", base))
    organs = list(student["test"]["dice"])

    def f(v):
        return "n/a" if v is None else f"{v:.3f}"

    def d(a, b, organ=None):
        sa = case_scores(a["test_cases"]) if organ is None else organ_scores(a["test_cases"], organ)
        sb = case_scores(b["test_cases"]) if organ is None else organ_scores(b["test_cases"], organ)
        return fmt_ci(paired_bootstrap({0: sa}, {0: sb}, n=bootstrap))

    pairs = [("student", "3D teacher")]
    if baseline_run is not None:
        pairs = [("student", "baseline"), ("3D teacher", "baseline")] + pairs
    by = dict(cols)
    lines = [f"Test Dice on the same {len(ids)} student test slices ({cfg.data.source}; the 3D teacher segments each "
             "subject's volume and is scored on the plane through the slice). Differences: mean paired difference "
             "over the slices, [bootstrap 95% CI]; 'mean' rows use each slice's mean over the organs present.", "",
             "| organ | " + " | ".join(n for n, _ in cols) + " | " + " | ".join(f"{a} − {b}" for a, b in pairs) + " |",
             "|---|" + "---|" * (len(cols) + len(pairs))]
    for o in organs:
        lines.append(f"| {o} | " + " | ".join(f(r["test"]["dice"].get(o)) for _, r in cols) + " | "
                     + " | ".join(d(by[a], by[b], o) for a, b in pairs) + " |")
    lines.append("| **mean** | " + " | ".join(f"**{f(r['test'].get('dice_mean'))}**" for _, r in cols) + " | "
                 + " | ".join(d(by[a], by[b]) for a, b in pairs) + " |")
    if baseline_run is None:
        lines += ["", "(no baseline: `make train-baseline` adds it)"]
    text = "\n".join(lines) + "\n"
    write_text(run / "comparison.md", text)
    return text
