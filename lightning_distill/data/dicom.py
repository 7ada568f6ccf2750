"""DICOM images in: a file, a series folder, or a folder of several series, as arrays with a NIfTI affine.

pydicom reads the files (headers, pixel data and its decompression); this module groups them into series,
puts each series' slices in order and computes its geometry from the DICOM attributes, as the standard
defines them (PS3.3 C.7.6.2.1.1): ``ImageOrientationPatient`` gives the row and column directions,
``ImagePositionPatient`` each slice's first voxel, ``PixelSpacing`` the in-plane spacing; the slice spacing
is the distance between consecutive positions along the normal. Stored values become modality values (HU
for CT) through ``RescaleSlope`` and ``RescaleIntercept``. The affine maps voxel ``(x = column, y = row,
z = slice)`` to RAS millimetres, as NIfTI's does (DICOM's patient axes are LPS).

Refused with the file and the problem named: a series with slices of other sizes or orientations (mixed),
missing slices (a gap along the normal), a stack that is not axial, pixel data compressed in a way pydicom
cannot decode without a plugin (the plugin named). Localizers (``ImageType`` LOCALIZER) and non-image
objects (segmentations, structure sets, reports) are left out and listed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np

from lightning_distill.data.nifti import DataError
from lightning_distill.io import atomic_write, listed

# type 2 patient and study attributes a DICOM-SEG copies from its source images
TYPE2_COPIED = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime", "StudyID",
                "AccessionNumber", "ReferringPhysicianName")
AXIAL_COS = 0.95  # an axial stack's normal is within ~18 degrees of the patient's head-foot axis
SPACING_TOLERANCE = 0.05  # slice positions may deviate this fraction of the spacing from a regular grid
NOT_AN_IMAGE = "not an image ({})"  # find_series' reason for leaving out an object of this Modality (SEG, ...)
# decoders pydicom needs a plugin for, by transfer syntax name fragment (pydicom's own message is kept too)
PLUGINS = (("JPEG 2000", "pylibjpeg pylibjpeg-openjpeg"), ("JPEG-LS", "pylibjpeg pylibjpeg-libjpeg"),
           ("JPEG Lossless", "pylibjpeg pylibjpeg-libjpeg"), ("JPEG", "pylibjpeg pylibjpeg-libjpeg"),
           ("RLE", "pylibjpeg pylibjpeg-rle"), ("HTJ2K", "pylibjpeg pylibjpeg-openjpeg"))


@dataclass(eq=False)  # one series is one object (a dict key of predict's outputs)
class Series:
    """The image files of one DICOM series (``SeriesInstanceUID``), in no particular order."""

    uid: str
    files: List[Path]
    description: str = ""
    number: Optional[int] = None
    patient: str = ""
    modality: str = ""
    skipped: Dict[str, List[Path]] = field(default_factory=dict)  # why -> files left out of this series

    @property
    def name(self) -> str:
        """A file name for the series' outputs: its instance UID (unique, and found in any PACS)."""
        return self.uid


def _pydicom():
    # deferred: only DICOM inputs need pydicom
    import pydicom

    return pydicom


def read_header(path: Path):
    """The header of a DICOM file (pixel data not read), or ``None`` when ``path`` is not DICOM. A file with the
    ``DICM`` preamble whose header does not read raises pydicom's error; one without it is tried once."""
    pydicom = _pydicom()
    if not path.is_file():
        return None
    if pydicom.misc.is_dicom(str(path)):
        return pydicom.dcmread(str(path), stop_before_pixels=True)
    try:
        return pydicom.dcmread(str(path), stop_before_pixels=True, force=False)
    except Exception:  # noqa: BLE001 - not DICOM
        return None


def is_dicom(path: Path) -> bool:
    """Whether ``path`` is a DICOM file (its ``DICM`` preamble, or a readable header without one)."""
    try:
        return read_header(path) is not None
    except Exception:  # noqa: BLE001 - a DICM preamble before an unreadable header
        return True


def find_series(path: str | Path) -> List[Series]:
    """The image series of a DICOM file, a series folder or a folder of several series (searched recursively).

    Raises:
        DataError: no DICOM image found (naming what was found instead).
    """
    root = Path(path)
    files = [root] if root.is_file() else sorted(f for f in root.rglob("*") if f.is_file() and not f.name.startswith("."))
    series: Dict[str, Series] = {}
    skipped: Dict[str, List[Path]] = {}
    for f in files:
        ds = read_header(f)
        if ds is None:
            continue
        kind = str(getattr(ds, "Modality", ""))
        image_type = [str(v).upper() for v in getattr(ds, "ImageType", [])]
        if not hasattr(ds, "Rows") or kind in ("SEG", "RTSTRUCT", "SR", "PR", "KO", "RTPLAN"):
            skipped.setdefault(NOT_AN_IMAGE.format(kind or "no modality"), []).append(f)
            continue
        if "LOCALIZER" in image_type:
            skipped.setdefault("localizer", []).append(f)
            continue
        uid = str(getattr(ds, "SeriesInstanceUID", "") or f"no-series-uid-{f.parent.name}")
        s = series.setdefault(uid, Series(uid, [], str(getattr(ds, "SeriesDescription", "")),
                                          int(ds.SeriesNumber) if getattr(ds, "SeriesNumber", None) not in (None, "") else None,
                                          str(getattr(ds, "PatientID", "")), kind))
        s.files.append(f)
    if not series:
        what = "; ".join(f"{why}: {listed([str(p) for p in fs], 3)}" for why, fs in skipped.items())
        raise DataError(f"{root}: no DICOM image series found" + (f" (left out: {what})" if what else
                                                                  " (no DICOM file at all)"))
    out = sorted(series.values(), key=lambda s: (s.patient, s.number if s.number is not None else -1, s.uid))
    for s in out:
        s.skipped = skipped
    return out


def _decoded(ds, f: Path) -> np.ndarray:
    try:
        return ds.pixel_array
    except Exception as e:  # noqa: BLE001 - pydicom raises several kinds for a missing decoder
        ts = ds.file_meta.TransferSyntaxUID if hasattr(ds, "file_meta") and "TransferSyntaxUID" in ds.file_meta else None
        name = getattr(ts, "name", str(ts))
        plugin = next((p for frag, p in PLUGINS if frag.lower() in str(name).lower()), None)
        hint = f"; install a decoder: pip install {plugin}" if plugin else ""
        raise DataError(f"{f}: its pixel data ({name}, {ts}) could not be decoded ({type(e).__name__}: {e}){hint}") from None


def read_series(series: Series, pixels: bool = True) -> Tuple[Optional[np.ndarray], np.ndarray]:
    """The series as a float32 ``(X, Y, Z)`` array of modality values (HU for CT) and its RAS affine
    (``pixels=False``: the checks and the affine only, from the headers; the array is ``None``).

    Raises:
        DataError: mixed slice sizes or orientations, a missing slice, a stack that is not axial, a slice
            without position or orientation, undecodable pixel data; the message names the series and file.
    """
    pydicom = _pydicom()
    where = f"DICOM series {series.uid}" + (f" ({series.description})" if series.description else "")
    slices = []
    for f in series.files:
        ds = pydicom.dcmread(str(f), stop_before_pixels=not pixels)
        for tag in ("ImageOrientationPatient", "ImagePositionPatient", "PixelSpacing"):
            if tag not in ds:
                raise DataError(f"{f}: no {tag}: its place in the patient is unknown ({where})")
        if int(getattr(ds, "NumberOfFrames", 1) or 1) > 1:
            raise DataError(f"{f}: a multi-frame image ({ds.NumberOfFrames} frames); this reader takes one slice per file")
        slices.append((f, ds))
    f0, d0 = slices[0]
    iop = np.asarray(d0.ImageOrientationPatient, dtype=np.float64)
    for f, ds in slices[1:]:
        if (ds.Rows, ds.Columns) != (d0.Rows, d0.Columns):
            raise DataError(f"{where}: mixed series: {f} is {ds.Rows} x {ds.Columns}, {f0} {d0.Rows} x {d0.Columns}")
        if not np.allclose(np.asarray(ds.ImageOrientationPatient, dtype=np.float64), iop, atol=1e-4):
            raise DataError(f"{where}: mixed series: {f} and {f0} have other orientations "
                            f"({list(ds.ImageOrientationPatient)} vs {list(d0.ImageOrientationPatient)})")
    row, col = iop[:3], iop[3:]
    normal = np.cross(row, col)
    if abs(normal[2]) < AXIAL_COS:
        raise DataError(f"{where}: not an axial stack (slice normal {np.round(normal, 3).tolist()} in LPS; this package "
                        "takes axial slices, the head-foot axis across them)")
    pos = np.array([np.dot(np.asarray(ds.ImagePositionPatient, dtype=np.float64), normal) for _, ds in slices])
    order = np.argsort(pos)
    slices, pos = [slices[i] for i in order], pos[order]
    series.files = [f for f, _ in slices]  # in the array's z order (a DICOM-SEG's frames follow it)
    if len(slices) > 1:
        steps = np.diff(pos)
        if np.any(steps < 1e-3):
            dup = [str(slices[i][0]) for i in np.flatnonzero(steps < 1e-3)[:3]]
            raise DataError(f"{where}: mixed series: several slices at one position ({', '.join(dup)}, ...)")
        dz = float(np.median(steps))
        off = np.abs(steps - dz) > SPACING_TOLERANCE * dz
        if off.any():
            i = int(np.flatnonzero(off)[0])
            missing = int(round(steps[i] / dz)) - 1
            what = (f"{missing} slice(s) missing between" if missing >= 1 else "irregular spacing between")
            raise DataError(f"{where}: {what} {slices[i][0].name} and {slices[i + 1][0].name} (positions "
                            f"{pos[i]:.2f} and {pos[i + 1]:.2f} mm along the normal, spacing {dz:.2f} mm)")
    else:
        dz = float(getattr(d0, "SpacingBetweenSlices", None) or getattr(d0, "SliceThickness", None) or 1.0)
    ps = [float(v) for v in slices[0][1].PixelSpacing]  # (row spacing: along a column, column spacing: along a row)
    lps = np.eye(4)
    lps[:3, 0], lps[:3, 1], lps[:3, 2] = row * ps[1], col * ps[0], normal * dz
    lps[:3, 3] = np.asarray(slices[0][1].ImagePositionPatient, dtype=np.float64)
    affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps  # LPS -> RAS
    if not pixels:
        return None, affine
    planes = []
    for f, ds in slices:
        values = _decoded(ds, f).astype(np.float32)
        slope, intercept = float(getattr(ds, "RescaleSlope", 1) or 1), float(getattr(ds, "RescaleIntercept", 0) or 0)
        planes.append(values * slope + intercept)
    data = np.stack(planes, axis=-1).transpose(1, 0, 2)  # (rows, columns, z) -> (x = column, y = row, z)
    if not np.all(np.isfinite(data)):
        raise DataError(f"{where}: NaN or Inf values after rescaling")
    return data.astype(np.float32), affine


def highdicom():
    """highdicom (the ``dicom`` extra), or a clear error naming the install command."""
    try:
        import highdicom as hd  # deferred: only DICOM-SEG output needs it
    except ImportError:
        raise ValueError("writing DICOM-SEG needs highdicom: pip install 'lightning_distill[dicom]'") from None
    return hd


def _segment_code(name: str):
    """A SNOMED CT code for a class name (``right_kidney`` -> Kidney), or ``None`` when pydicom's dictionary has none."""
    from pydicom.sr.codedict import codes

    words = [w for w in name.replace("-", "_").split("_") if w and w.lower() not in ("left", "right")]
    for key in ("".join(w.capitalize() for w in name.split("_")), "".join(w.capitalize() for w in words)):
        try:
            return getattr(codes.SCT, key)
        except AttributeError:
            continue
    return None


def write_seg(series: Series, mask: np.ndarray, classes: List[str], path: str | Path, software: str) -> Path:
    """Write ``mask`` (the label map of :func:`read_series`'s array, ``(X, Y, Z)``) as a DICOM Segmentation
    (highdicom) that references the series' images: one binary segment per class present except the first
    (background), labelled with the class name and a SNOMED CT code where pydicom knows one (else Tissue).

    Raises:
        ValueError: ``mask`` does not have the series' shape.
    """
    hd = highdicom()
    from pydicom.sr.codedict import codes

    pydicom = _pydicom()
    sources = [pydicom.dcmread(str(f)) for f in series.files]  # the array's z order (read_series sorted them)
    for ds in sources:  # type 2 attributes a SEG copies from its source: present, possibly empty (in memory only)
        for key in TYPE2_COPIED:
            if key not in ds:
                setattr(ds, key, "")
    rows, cols = int(sources[0].Rows), int(sources[0].Columns)
    if mask.shape != (cols, rows, len(sources)):
        raise ValueError(f"DICOM series {series.uid}: a mask of shape {mask.shape} does not fit its {len(sources)} "
                         f"slices of {rows} x {cols}")
    frames = mask.transpose(2, 1, 0)  # (x, y, z) -> (slice, row, column)
    present = [k for k in range(1, len(classes)) if (frames == k).any()]
    algorithm = hd.AlgorithmIdentificationSequence(name="lightning_distill", version=software,
                                                   family=codes.cid7162.ArtificialIntelligence)
    descriptions, labels = [], np.zeros_like(frames, dtype=np.uint8)
    for number, k in enumerate(present, start=1):
        code = _segment_code(classes[k])
        descriptions.append(hd.seg.SegmentDescription(
            segment_number=number, segment_label=classes[k],
            segmented_property_category=codes.SCT.AnatomicalStructure if code is not None else codes.SCT.Tissue,
            segmented_property_type=code if code is not None else codes.SCT.Tissue,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC, algorithm_identification=algorithm))
        labels[frames == k] = number
    if not descriptions:
        raise ValueError(f"DICOM series {series.uid}: the mask holds no class but {classes[0]}: no segment to write")
    try:
        seg = hd.seg.Segmentation(
            source_images=sources, pixel_array=labels, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=descriptions, series_instance_uid=hd.UID(), series_number=int(series.number or 0) + 1000,
            sop_instance_uid=hd.UID(), instance_number=1, manufacturer="lightning_distill",
            manufacturer_model_name="lightning_distill predict", software_versions=software, device_serial_number="none",
            omit_empty_frames=False)
    except (ValueError, AttributeError, TypeError) as e:  # highdicom's checks of the source images
        raise DataError(f"DICOM series {series.uid}: no DICOM Segmentation can reference it: {e}") from None
    out = Path(path)
    atomic_write(out, lambda tmp: seg.save_as(tmp))
    return out
