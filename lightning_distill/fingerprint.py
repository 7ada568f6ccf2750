"""What a checkpoint records about its training data, and the intensity check of new inputs.

The *intensity fingerprint* is a small summary of the training images as the network sees them
(after preprocessing, before augmentation): the quantiles of every sample at fixed levels (on a
deterministic voxel subsample), their median over the samples (the reference profile), and how far
each training sample lies from it. The distance of two quantile profiles is the mean absolute
difference of their quantiles (a discrete Wasserstein-1 distance between the intensity
distributions).

The warning threshold is calibrated on held-out data of the training kind: the run's validation
samples (never trained on) are measured the same way, and the threshold is :data:`MARGIN` times the
farthest training or validation sample (at least 5 % of the reference's p1..p99 range). ``predict`` and
``test`` measure their inputs and judge each subject by its sample closest to the training data: a 2D
model trained on one level of the body sees other levels in a volume, whose intensities are of the
training's kind although their mix of tissues is not; a scale that is wrong (HU into a 0..255 model,
MR into a CT model) moves every slice. The warning names the setting that brings the input to the
training's scale, computed from the raw intensities, or says that the scales already agree (then no
intensity setting helps: the images show something else).

Checkpoints also record the training subjects and which data they came from, so ``test --all``
can say how many of the evaluated subjects the checkpoint was trained on.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

LEVELS = (1.0, 5.0, 10.0, 25.0, 50.0, 75.0, 90.0, 95.0, 99.0)
MAX_SAMPLES = 64  # training samples of the fingerprint (evenly spaced over the training ids)
MAX_VOXELS = 65536  # voxels per sample (a seeded random subsample of larger images)
HU_P1 = -50.0  # a raw 1 % quantile (the lowest level) below this (air, fat) looks like CT in Hounsfield units
MARGIN = 1.5  # the threshold: this times the farthest training or held-out (validation) sample
SAME_WINDOW = 0.05  # a suggested window within this fraction of the window's width of the current one is the same


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
                          raw_profiles: Optional[Mapping[str, np.ndarray]] = None,
                          held_out: Optional[Mapping[str, Callable[[], np.ndarray]]] = None) -> Dict[str, Any]:
    """The intensity fingerprint of training samples, its threshold calibrated on held-out ones.

    Args:
        load: sample id -> the preprocessed image ``(C, *spatial)`` the network sees (no augmentation).
        ids: the training sample ids (at most :data:`MAX_SAMPLES`, evenly spaced, are used).
        preprocessing: the intensity preprocessing that produced the images (``source`` and
            :meth:`lightning_distill.data.preprocess.Preprocess.intensity_settings`).
        raw_profiles: sample id -> quantile profile of the raw image before intensity scaling,
            when the source keeps them (NIfTI); their median is recorded as ``raw``.
        held_out: held-out samples of the training kind (the validation split): sample id -> a function
            returning its preprocessed image (at most :data:`MAX_SAMPLES`, evenly spaced, are used).

    Returns:
        A dict of plain numbers and lists (it goes into checkpoints and ``results.json``):
        ``levels``, ``reference`` (median training profile), ``distances`` (per training sample),
        ``max_distance``, ``held_out_distances`` (per held-out sample; empty without any), ``threshold``
        (``max(MARGIN x the farthest of both, 0.05 x (reference p99 - p1))``), ``num_samples``,
        ``preprocessing`` and ``raw`` (reference raw profile or ``None``).
    """
    chosen = evenly_spaced(list(ids))
    if not chosen:
        raise ValueError("an intensity fingerprint needs at least one training sample")
    profiles = np.stack([quantile_profile(load(i)) for i in chosen])
    reference = np.median(profiles, axis=0)
    distances = [profile_distance(p, reference) for p in profiles]
    held = [profile_distance(quantile_profile(held_out[i]()), reference) for i in evenly_spaced(sorted(held_out or {}))]
    raw = None
    if raw_profiles:
        known = [raw_profiles[i] for i in chosen if i in raw_profiles]
        raw = np.median(np.stack(known), axis=0).tolist() if known else None
    return {"levels": list(LEVELS), "reference": reference.tolist(), "distances": distances,
            "max_distance": max(distances), "held_out_distances": held,
            "threshold": max(MARGIN * max(distances + held), 0.05 * float(reference[-1] - reference[0])),
            "num_samples": len(chosen), "preprocessing": dict(preprocessing), "raw": raw}


def fingerprint_summary(fp: Mapping[str, Any]) -> Dict[str, Any]:
    """The small part of a fingerprint for ``results.json`` (no per-sample distances)."""
    keys = ("levels", "reference", "raw", "max_distance", "threshold", "num_samples", "preprocessing")
    out = {k: fp[k] for k in keys}
    if fp.get("held_out_distances"):
        out["held_out_max_distance"] = max(fp["held_out_distances"])
    return out


def ct_window_of(cfg) -> List[float]:
    """The CT window a run config scales its images with (``data.window`` for the phantom, else
    ``data.nifti.ct_window``)."""
    d = cfg.data
    return [float(v) for v in (d.window if d.source == "phantom" else d.nifti.ct_window)]


def data_identity(cfg) -> Dict[str, Any]:
    """Which data ``cfg`` reads: ``{"source": "nifti", "root": <absolute path>}`` or
    ``{"source": "phantom", "seed": <population seed>}`` (same seed: same subjects, any modality)."""
    d = cfg.data
    if d.source == "nifti":
        return {"source": "nifti", "root": str(Path(str(d.nifti.root)).expanduser().resolve())}
    return {"source": "phantom", "seed": int(d.phantom.seed)}


def training_record(cfg, dm, load: Callable[[str], np.ndarray], preprocessing: Mapping[str, Any],
                    raw: Optional[Mapping[str, np.ndarray]] = None, identities: Sequence[str] = (),
                    held_out: Optional[Mapping[str, Callable[[], np.ndarray]]] = None) -> Dict[str, Any]:
    """What a checkpoint records about its training data (``checkpoint["lightning_distill"]``):
    ``intensity`` (the fingerprint of ``dm``'s training samples, read with ``load``, made by
    ``preprocessing``; ``raw``: their raw quantile profiles by sample id, when the source has them; its
    threshold calibrated on the ``held_out`` samples), ``train_subjects`` (sorted subject ids), ``data`` (:func:`data_identity`) and ``train_identities``
    (every subject a training sample came from, extra training sources included, across the datasets derived
    from one another: :mod:`lightning_distill.data.provenance`)."""
    return {"intensity": intensity_fingerprint(load, dm.train_ids, preprocessing, raw, held_out),
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


def suggested_window(fp: Mapping[str, Any], raw: Sequence[float]) -> Optional[List[float]]:
    """The CT window that scales an input whose raw profile is ``raw`` as the training window scaled the training
    images: the training window carried through the affine map of the training's raw p1..p99 onto the input's
    (``None`` without a training raw profile, or when either range is empty)."""
    train = fp.get("raw")
    if train is None or fp["preprocessing"].get("modality") != "CT":
        return None
    (t1, t99), (i1, i99) = (train[0], train[-1]), (raw[0], raw[-1])
    if t99 - t1 <= 0 or i99 - i1 <= 0:
        return None
    a = (i99 - i1) / (t99 - t1)
    return [float(i1 + a * (w - t1)) for w in fp["preprocessing"]["ct_window"]]


def _same_window(a: Sequence[float], b: Sequence[float]) -> bool:
    width = abs(b[1] - b[0]) or 1.0
    return abs(a[0] - b[0]) <= SAME_WINDOW * width and abs(a[1] - b[1]) <= SAME_WINDOW * width


def advice(fp: Mapping[str, Any], raw: Optional[Sequence[float]], window: Optional[Sequence[float]] = None,
           keys: Optional[Mapping[str, str]] = None) -> str:
    """What to do about an input whose raw quantile profile is ``raw`` (``None``: unknown), preprocessed with
    ``window`` (the CT window in use; default: the training's): the setting that brings it to the training's
    scale, or, when its scale already is the training's, that no intensity setting will help. ``keys``: the
    command's names of the ``window`` and ``modality`` settings (default: a run config's)."""
    pre = fp["preprocessing"]
    phantom = pre["source"] == "phantom"
    window_key = (keys or {}).get("window", "data.window" if phantom else "data.nifti.ct_window")
    modality_key = (keys or {}).get("modality", "data.phantom.modality" if phantom else "data.nifti.modality")
    input_hu = _looks_hu(raw)
    content = ("its raw intensities are on the training data's scale ({why}), so no intensity setting brings it closer: "
               "the images show something the training images did not (another body region, contrast phase, scanner "
               "or kind of image)")
    if pre["modality"] == "CT":
        trained = "CT scaled by the window [{:g}, {:g}]".format(*pre["ct_window"])
        window = list(window if window is not None else pre["ct_window"])
        if raw is None:
            return f"the model was trained on {trained}: check {window_key}=[lo,hi] (or {modality_key})"
        if input_hu and not _train_is_hu(fp):
            return (f"the input looks like CT in HU but the training data were not in HU ({trained}): set {window_key}=[lo,hi] "
                    "to the HU window the training images were scaled from (e.g. [-175,250], an abdominal window)")
        if not input_hu and _train_is_hu(fp):
            return (f"the input has no HU-like negative values but the model was trained on HU {trained}: if it is MR, "
                    f"this CT model does not fit it ({modality_key}=MR only normalises it per image); if it is CT in other "
                    f"units, set {window_key}=[lo,hi] to its equivalent of the training window")
        suggested = suggested_window(fp, raw)
        if suggested is None:  # no raw training profile (the phantom): both in HU is all that is known
            return content.format(why="both CT in HU") if input_hu else (
                f"the model was trained on {trained}: try {window_key}=[lo,hi] mapping the input's range to the training's")
        if _same_window(suggested, window):
            return content.format(why=f"the window that would match it, [{suggested[0]:.4g}, {suggested[1]:.4g}], is the one in use")
        fix = (f"the model was trained on {trained}; to scale this input as the training images were, set "
               f"{window_key}=[{suggested[0]:.4g},{suggested[1]:.4g}] (the training window carried through the input's raw "
               "p1..p99 onto the training's)")
        if input_hu:  # both in HU: another window, not another kind of image
            return fix
        return (fix + f"; if the input is MR, this CT model does not fit it ({modality_key}=MR only normalises it per "
                "image): neither image is in HU, so their kinds cannot be told apart from the intensities")
    if pre["modality"] == "MR":
        if input_hu:
            return (f"the model was trained on MR normalised per image ({pre['mr_norm']}); the input looks like CT (HU): "
                    f"this MR model does not fit it")
        return content.format(why=f"MR normalised per image ({pre['mr_norm']}), as in training") + (
            "" if phantom else "; check data.nifti.mr_norm / data.nifti.percentiles if the training used others")
    return (f"the model was trained on unscaled intensities (data.nifti.modality=none): try {modality_key}=CT with "
            f"{window_key}=[lo,hi] or {modality_key}=MR to bring the input to the training's range")


def describe(fp: Mapping[str, Any], profile: Sequence[float], raw: Optional[Sequence[float]],
             window: Optional[Sequence[float]] = None, keys: Optional[Mapping[str, str]] = None) -> str:
    """Raw and preprocessed p1/p50/p99 of an input next to the training's, and :func:`advice`."""
    lv = fp["levels"]
    return (f"raw p1/p50/p99 {_p(raw, lv)} (training {_p(fp.get('raw'), lv)}), preprocessed {_p(profile, lv)} "
            f"(training {_p(fp['reference'], lv)}); {advice(fp, raw, window, keys)}")


class IntensityCheck:
    """Compares inputs with a checkpoint's fingerprint (``fp``; ``None``: nothing is checked).

    Use :meth:`add` once per preprocessed network input of the current file (a 2D model predicting
    a volume adds every slice), then :meth:`finish` to warn once for that file (``predict``), or
    :meth:`closest` and :meth:`unlike` to decide otherwise (``bank build`` may stop instead). The rule is
    the same either way: the file's input closest to the training data, farther than the threshold.

    Args:
        fp: the checkpoint's fingerprint, or ``None``.
        window: the CT window the inputs are scaled with (default: the training's), for the advice.
        keys: the calling command's own names of the settings the advice names (see :func:`advice`).
    """

    def __init__(self, fp: Optional[Mapping[str, Any]], window: Optional[Sequence[float]] = None,
                 keys: Optional[Mapping[str, str]] = None):
        self.fp, self.window, self.keys = fp, window, keys
        self.profiles: List[np.ndarray] = []

    def add(self, image: np.ndarray) -> None:
        if self.fp is not None:
            self.profiles.append(quantile_profile(image, self.fp["levels"]))

    def closest(self) -> Optional[Tuple[float, np.ndarray, bool]]:
        """``(distance, profile, shifted)`` of the input added since the last call that is closest to the
        training reference (a volume's slice at the training's level), ``shifted`` when that distance is
        above the threshold; ``None`` when nothing is checked. Forgets the added inputs."""
        profiles, self.profiles = self.profiles, []
        if self.fp is None or not profiles:
            return None
        dists = [profile_distance(p, self.fp["reference"]) for p in profiles]
        i = int(np.argmin(dists))
        return float(dists[i]), profiles[i], bool(dists[i] > self.fp["threshold"])

    def unlike(self, dist: float, profile: np.ndarray, raw_image: np.ndarray, of: str = "") -> str:
        """What a shifted input is: its distance, its raw and preprocessed percentiles beside the
        training's, and what to set (``of``: the model's source, named after "training data's")."""
        raw = quantile_profile(raw_image, self.fp["levels"])
        return (f"intensities unlike the training data's{f' of {of}' if of else ''} (distance {dist:.3g} > threshold "
                f"{self.fp['threshold']:.3g}): {describe(self.fp, profile, raw, self.window, self.keys)}")

    def finish(self, name: str, raw_image: np.ndarray) -> Optional[float]:
        """Warn if the inputs added since the last call are farther from the training reference than
        the threshold, judged by the closest of them. Returns that distance (``None`` when nothing is
        checked)."""
        found = self.closest()
        if found is None:
            return None
        dist, profile, shifted = found
        if shifted:
            warnings.warn(f"{name}: {self.unlike(dist, profile, raw_image)}; predictions may be poor", stacklevel=3)
        return dist


def check_samples(fp: Optional[Mapping[str, Any]], images: Mapping[str, np.ndarray],
                  raw_profiles: Optional[Mapping[str, np.ndarray]] = None, worst: int = 5,
                  subject_of: Callable[[str], str] = str, window: Optional[Sequence[float]] = None) -> Dict[str, float]:
    """Warn once if some subjects of ``images`` (sample id -> preprocessed image) are farther from the
    fingerprint's reference than its threshold: how many, the ``worst`` few, and what to do.

    Args:
        fp: the checkpoint's fingerprint (``None``: nothing is checked, ``{}`` is returned).
        images: the evaluated samples as the network sees them.
        raw_profiles: sample id -> raw quantile profile, when known.
        subject_of: sample id -> its subject; a subject is judged by its sample closest to the training data
            (every slice of a volume is a sample, and only the training's level looks like the training data).
        window: the CT window the samples were scaled with (default: the training's), for the advice.

    Returns:
        Subject -> distance of its closest sample, for the subjects above the threshold.
    """

    if fp is None:
        return {}
    profiles = {i: quantile_profile(img, fp["levels"]) for i, img in images.items()}
    best: Dict[str, str] = {}
    dist = {i: profile_distance(p, fp["reference"]) for i, p in profiles.items()}
    for i, d in dist.items():
        s = subject_of(i)
        if s not in best or d < dist[best[s]]:
            best[s] = i
    over = {s: dist[i] for s, i in sorted(best.items(), key=lambda kv: -dist[kv[1]]) if dist[i] > fp["threshold"]}
    if over:
        raws = [raw_profiles[best[s]] for s in over if raw_profiles and best[s] in raw_profiles]
        raw = np.median(np.stack(raws), axis=0) if raws else None
        profile = np.median(np.stack([profiles[best[s]] for s in over]), axis=0)
        warnings.warn(f"{len(over)} of {len(best)} test subjects have intensities unlike the training data's (the distance "
                      f"of each one's closest sample > threshold {fp['threshold']:.3g}; worst: "
                      + ", ".join(f"{s} {d:.3g}" for s, d in list(over.items())[:worst])
                      + f"); median of those: {describe(fp, profile, raw, window)}; the metrics may reflect the mismatch",
                      stacklevel=3)
    return over
