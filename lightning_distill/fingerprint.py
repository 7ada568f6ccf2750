"""What a checkpoint records about its training data, and the intensity check of new inputs.

The *intensity fingerprint* is a small summary of the training images as the network sees them
(after preprocessing, before augmentation): the quantiles of every sample at fixed levels (on a
deterministic voxel subsample), their median over the samples (the reference profile), and how far
each training sample lies from it. The distance of two quantile profiles is the mean absolute
difference of their quantiles (a discrete Wasserstein-1 distance between the intensity
distributions). ``predict`` and ``test`` compute the same profile of their inputs and warn when an
input is farther from the reference than the threshold, naming the preprocessing override to try.

Checkpoints also record the training subjects and which data they came from, so ``test --all``
can say how many of the evaluated subjects the checkpoint was trained on.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

import numpy as np

LEVELS = (1.0, 5.0, 10.0, 25.0, 50.0, 75.0, 90.0, 95.0, 99.0)
MAX_SAMPLES = 64  # training samples of the fingerprint (evenly spaced over the training ids)
MAX_VOXELS = 65536  # voxels per sample (a seeded random subsample of larger images)
HU_P1 = -50.0  # a raw 1 % quantile (the lowest level) below this (air, fat) looks like CT in Hounsfield units


def quantile_profile(image: np.ndarray, levels: Sequence[float] = LEVELS, max_voxels: int = MAX_VOXELS) -> np.ndarray:
    """The quantiles of one image at ``levels`` (percent).

    Args:
        image: any shape, e.g. ``(C, *spatial)``; every voxel of every channel counts.
        levels: quantile levels in percent.
        max_voxels: larger images are subsampled (seeded, so the profile is deterministic).

    Returns:
        ``(len(levels),)`` float64.
    """
    flat = np.asarray(image, dtype=np.float32).ravel()
    if flat.size > max_voxels:
        flat = flat[np.random.default_rng(0).integers(0, flat.size, max_voxels)]
    return np.percentile(flat, levels).astype(np.float64)


def profile_distance(a: Sequence[float], b: Sequence[float]) -> float:
    """Mean absolute difference of two quantile profiles (a discrete Wasserstein-1 distance)."""
    return float(np.mean(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def evenly_spaced(ids: Sequence[str], n: int = MAX_SAMPLES) -> List[str]:
    """At most ``n`` of ``ids``, evenly spaced (all of them when there are fewer)."""
    if len(ids) <= n:
        return list(ids)
    return [ids[i] for i in np.unique(np.linspace(0, len(ids) - 1, n).round().astype(int))]


def intensity_fingerprint(load: Callable[[str], np.ndarray], ids: Sequence[str], preprocessing: Mapping[str, Any],
                          raw_profiles: Optional[Mapping[str, np.ndarray]] = None) -> Dict[str, Any]:
    """The intensity fingerprint of training samples.

    Args:
        load: sample id -> the preprocessed image ``(C, *spatial)`` the network sees (no augmentation).
        ids: the training sample ids (at most :data:`MAX_SAMPLES`, evenly spaced, are used).
        preprocessing: the intensity preprocessing that produced the images (``source`` and
            :meth:`lightning_distill.data.preprocess.Preprocess.intensity_settings`).
        raw_profiles: sample id -> quantile profile of the raw image before intensity scaling,
            when the source keeps them (NIfTI); their median is recorded as ``raw``.

    Returns:
        A dict of plain numbers and lists (it goes into checkpoints and ``results.json``):
        ``levels``, ``reference`` (median profile), ``distances`` (per sample), ``max_distance``,
        ``threshold`` (``max(1.5 x max_distance, 0.05 x (reference p99 - p1))``), ``num_samples``,
        ``preprocessing`` and ``raw`` (reference raw profile or ``None``).
    """
    chosen = evenly_spaced(list(ids))
    if not chosen:
        raise ValueError("an intensity fingerprint needs at least one training sample")
    profiles = np.stack([quantile_profile(load(i)) for i in chosen])
    reference = np.median(profiles, axis=0)
    distances = [profile_distance(p, reference) for p in profiles]
    raw = None
    if raw_profiles:
        known = [raw_profiles[i] for i in chosen if i in raw_profiles]
        raw = np.median(np.stack(known), axis=0).tolist() if known else None
    return {"levels": list(LEVELS), "reference": reference.tolist(), "distances": distances,
            "max_distance": max(distances),
            "threshold": max(1.5 * max(distances), 0.05 * float(reference[-1] - reference[0])),
            "num_samples": len(chosen), "preprocessing": dict(preprocessing), "raw": raw}


def fingerprint_summary(fp: Mapping[str, Any]) -> Dict[str, Any]:
    """The small part of a fingerprint for ``results.json`` (no per-sample distances)."""
    return {k: fp[k] for k in ("levels", "reference", "raw", "max_distance", "threshold", "num_samples", "preprocessing")}


def data_identity(cfg) -> Dict[str, Any]:
    """Which data ``cfg`` reads: ``{"source": "nifti", "root": <absolute path>}`` or
    ``{"source": "phantom", "seed": <population seed>}`` (same seed: same subjects, any modality)."""
    d = cfg.data
    if d.source == "nifti":
        return {"source": "nifti", "root": str(Path(str(d.nifti.root)).expanduser().resolve())}
    return {"source": "phantom", "seed": int(d.phantom.seed)}


def training_record(cfg, dm, load: Callable[[str], np.ndarray], preprocessing: Mapping[str, Any],
                    raw: Optional[Mapping[str, np.ndarray]] = None, identities: Sequence[str] = ()) -> Dict[str, Any]:
    """What a checkpoint records about its training data (``checkpoint["lightning_distill"]``):
    ``intensity`` (the fingerprint of ``dm``'s training samples, read with ``load``, made by
    ``preprocessing``; ``raw``: their raw quantile profiles by sample id, when the source has them),
    ``train_subjects`` (sorted subject ids), ``data`` (:func:`data_identity`) and ``train_identities``
    (every subject a training sample came from, extra training sources included, across the datasets derived
    from one another: :mod:`lightning_distill.data.provenance`)."""
    return {"intensity": intensity_fingerprint(load, dm.train_ids, preprocessing, raw),
            "train_subjects": sorted(dm.train_subject_ids), "data": data_identity(cfg),
            "train_identities": sorted(set(identities))}


# ------------------------------------------------------------------------------------------------
# checking inputs


def _p(profile: Optional[Sequence[float]], levels: Sequence[float]) -> str:
    """``p1/p50/p99`` of a profile as ``a/b/c`` (``unknown`` without one)."""
    if profile is None:
        return "unknown"
    at = dict(zip(levels, profile))
    return "/".join(f"{at[q]:.3g}" for q in (1.0, 50.0, 99.0))


def _looks_hu(raw: Optional[Sequence[float]]) -> bool:
    """Whether a raw quantile profile looks like CT in Hounsfield units (its 1 % quantile below :data:`HU_P1`)."""
    return raw is not None and raw[0] < HU_P1


def _train_is_hu(fp: Mapping[str, Any]) -> bool:
    """Whether the training images were CT in Hounsfield units (from their raw profile, or the
    preprocessing when the raw one was not recorded: the CT phantom, a window reaching below 0 HU)."""
    pre = fp["preprocessing"]
    if fp.get("raw") is not None:
        return _looks_hu(fp["raw"])
    return pre["modality"] == "CT" and (pre["source"] == "phantom" or pre["ct_window"][0] < HU_P1)


def advice(fp: Mapping[str, Any], raw: Optional[Sequence[float]]) -> str:
    """Which override to try for an input whose raw quantile profile is ``raw`` (``None``: unknown)."""
    pre = fp["preprocessing"]
    phantom = pre["source"] == "phantom"
    window_key = "data.window" if phantom else "data.nifti.ct_window"
    modality_key = "data.phantom.modality" if phantom else "data.nifti.modality"
    input_hu = _looks_hu(raw)
    if pre["modality"] == "CT":
        trained = "CT scaled by the window [{:g}, {:g}]".format(*pre["ct_window"])
        if raw is None:
            return f"the model was trained on {trained}: check {window_key}=[lo,hi] (or {modality_key})"
        if input_hu and not _train_is_hu(fp):
            return (f"the input looks like CT in HU but the training data were not in HU ({trained}): try {window_key}=[lo,hi] "
                    "with the HU window the training images were scaled from (e.g. [-175,250], an abdominal window)")
        if not input_hu and _train_is_hu(fp):
            return (f"the input has no HU-like negative values but the model was trained on HU {trained}: if it is MR, "
                    f"this CT model does not fit it ({modality_key}=MR only normalises it per image); if it is CT in other "
                    f"units, set {window_key}=[lo,hi] to its equivalent of the training window")
        return (f"the model was trained on {trained}: try {window_key}=[lo,hi] mapping the input's range to the training's, "
                f"or {modality_key}=MR if the input is MR")
    if pre["modality"] == "MR":
        what = "CT (HU)" if input_hu else "another kind of image"
        norm = "" if phantom else " and data.nifti.mr_norm / data.nifti.percentiles"
        return (f"the model was trained on MR normalised per image ({pre['mr_norm']}); the input may be {what}: "
                f"check {modality_key}{norm}")
    return (f"the model was trained on unscaled intensities (data.nifti.modality=none): try {modality_key}=CT with "
            f"{window_key}=[lo,hi] or {modality_key}=MR to bring the input to the training's range")


def describe(fp: Mapping[str, Any], profile: Sequence[float], raw: Optional[Sequence[float]]) -> str:
    """Raw and preprocessed p1/p50/p99 of an input next to the training's, and :func:`advice`."""
    lv = fp["levels"]
    return (f"raw p1/p50/p99 {_p(raw, lv)} (training {_p(fp.get('raw'), lv)}), preprocessed {_p(profile, lv)} "
            f"(training {_p(fp['reference'], lv)}); {advice(fp, raw)}")


class IntensityCheck:
    """Compares inputs with a checkpoint's fingerprint (``fp``; ``None``: nothing is checked).

    Use :meth:`add` once per preprocessed network input of the current file (a 2D model predicting
    a volume slice by slice adds every slice), then :meth:`finish` to warn once for that file.
    """

    def __init__(self, fp: Optional[Mapping[str, Any]]):
        self.fp = fp
        self.profiles: List[np.ndarray] = []

    def add(self, image: np.ndarray) -> None:
        if self.fp is not None:
            self.profiles.append(quantile_profile(image, self.fp["levels"]))

    def finish(self, name: str, raw_image: np.ndarray) -> Optional[float]:
        """Warn if the inputs added since the last call are farther from the training reference than
        the threshold (the median of their distances: single slices see one level of the body).
        Returns that distance (``None`` when nothing is checked)."""

        profiles, self.profiles = self.profiles, []
        if self.fp is None or not profiles:
            return None
        fp = self.fp
        dist = float(np.median([profile_distance(p, fp["reference"]) for p in profiles]))
        if dist > fp["threshold"]:
            raw = quantile_profile(raw_image, fp["levels"])
            warnings.warn(f"{name}: intensities unlike the training data's (distance {dist:.3g} > threshold "
                          f"{fp['threshold']:.3g}): {describe(fp, np.median(profiles, axis=0), raw)}; predictions may be "
                          "poor", stacklevel=3)
        return dist


def check_samples(fp: Optional[Mapping[str, Any]], images: Mapping[str, np.ndarray],
                  raw_profiles: Optional[Mapping[str, np.ndarray]] = None, worst: int = 5) -> Dict[str, float]:
    """Warn once if some of ``images`` (sample id -> preprocessed image) are farther from the
    fingerprint's reference than its threshold: how many, the ``worst`` few, and the override to try.

    Args:
        fp: the checkpoint's fingerprint (``None``: nothing is checked, ``{}`` is returned).
        images: the evaluated samples as the network sees them.
        raw_profiles: sample id -> raw quantile profile, when known.

    Returns:
        Sample id -> distance of the samples above the threshold.
    """

    if fp is None:
        return {}
    profiles = {i: quantile_profile(img, fp["levels"]) for i, img in images.items()}
    dist = {i: profile_distance(p, fp["reference"]) for i, p in profiles.items()}
    over = {i: d for i, d in sorted(dist.items(), key=lambda kv: -kv[1]) if d > fp["threshold"]}
    if over:
        raws = [raw_profiles[i] for i in over if raw_profiles and i in raw_profiles]
        raw = np.median(np.stack(raws), axis=0) if raws else None
        profile = np.median(np.stack([profiles[i] for i in over]), axis=0)
        warnings.warn(f"{len(over)} of {len(images)} test samples have intensities unlike the training data's (distance > "
                      f"threshold {fp['threshold']:.3g}; worst: "
                      + ", ".join(f"{i} {d:.3g}" for i, d in list(over.items())[:worst])
                      + f"); median of those: {describe(fp, profile, raw)}; the metrics may reflect the mismatch", stacklevel=3)
    return over
