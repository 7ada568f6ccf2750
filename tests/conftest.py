import json
import os
import subprocess
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("PYTHONHASHSEED", "0")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

# at most 2 threads unless OMP_NUM_THREADS says otherwise (make test-portable runs the suite with 1 and 2:
# the thread count changes how BLAS splits a sum, and so the last bits of float32 results)
if "OMP_NUM_THREADS" not in os.environ:
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def _seeded_global_rng(request):
    """Every test draws the same unseeded random inputs on every run (seeded from its own id), so a
    failure reproduces; tolerances still have to hold for any draw, this only makes a miss repeatable."""
    import zlib

    seed = zlib.crc32(request.node.nodeid.encode())
    torch.manual_seed(seed)
    np.random.seed(seed)

# Small sizes so that teacher and student runs take seconds on 2 CPU cores.
TINY_TEACHER = [
    "data.num_subjects=8", "data.shape=[32,32,16]", "data.val_subjects=2", "data.test_subjects=2",
    "data.batch_size=2", "model.kwargs.channels=[8,16,32]", "model.kwargs.strides=[2,2]",
    "trainer.max_steps=4", "trainer.check_val_every_n_epoch=1", "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false", "trainer.log_every_n_steps=1",
]
TINY_STUDENT = [
    "data.num_subjects=16", "data.shape=[64,64]", "data.val_subjects=4", "data.test_subjects=4",
    "data.batch_size=4", "model.encoder=resnet18", "model.kwargs.decoder_channels=[32,16,16,8,8]",
    "trainer.max_steps=4", "trainer.check_val_every_n_epoch=1", "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false", "trainer.log_every_n_steps=1",
]


class FakeTrainer:
    """The Trainer attributes a PrototypeBank callback reads: one process, step 0 of 10."""

    world_size = 1
    max_steps = 10
    max_epochs = None
    global_step = 0
    current_epoch = 0
    is_global_zero = True


@pytest.fixture
def tiny_teacher():
    return list(TINY_TEACHER)


@pytest.fixture
def tiny_student():
    return list(TINY_STUDENT)


@pytest.fixture(scope="session")
def teacher_bank(tmp_path_factory):
    """A real bank from a tiny teacher run through the CLI (shared by the tests that need one)."""
    from lightning_distill.cli import main

    out = tmp_path_factory.mktemp("teacher")
    rc = main(["fit", os.path.join(REPO, "experiments/teacher.yaml"), f"output_dir={out}", *TINY_TEACHER])
    assert rc == 0
    return out


@pytest.fixture(scope="session")
def teach_folder(teacher_bank, tmp_path_factory):
    """Teacher-labelled slices (`lightning-distill teach`) of six phantom volumes of the tiny teacher's population,
    five per volume at the student's levels, preprocessed as experiments/student.yaml's (64 x 64)."""
    from lightning_distill.cli import main

    out = tmp_path_factory.mktemp("teach") / "slices"
    ckpt = teacher_bank / "checkpoints" / "best.ckpt"
    rc = main(["teach", os.path.join(REPO, "experiments/teach.yaml"), f"model.path={ckpt}",
               f"student={os.path.join(REPO, 'experiments/student.yaml')}", "data.num_subjects=6",
               "data.shape=[32,32,16]", f"output={out}"])
    assert rc == 0
    return out


# ------------------------------------------------------------------------------------------ comparing floats
# Which comparisons are exact (docs/development.md, "Comparing floats"): bitwise only where both sides run
# the very same computation on the same machine (a resumed run vs the uninterrupted one, a cache hit vs the
# computation it cached, MONAI's metadata tracking on vs off, a checkpoint's numbers vs the file they came
# from). Two *different* computations of one quantity (another summation order, batch split, process count,
# kernel, fused vs unfused) agree to the precision of their inputs, not bit for bit: the order in which a
# CPU accumulates float32 products depends on its instruction set, its BLAS kernel and the thread count
# (issue 30: AMD EPYC with MKL's default kernels summed the bank's einsum in another order than the
# machine the tests were written on; `make test-portable` runs such tests under other kernels here).
#
# The bound: ``rel`` of the magnitude of what is compared (its largest absolute value), elementwise also
# ``rel`` of each element. For float32 inputs rel = 1e-6, about 8 eps (2^-23 = 1.2e-7): the rounding of a
# blocked or pairwise sum of n float32 terms grows like eps * log(n) (at worst eps * n) of the sum of their
# magnitudes; on the sizes tested here the two computations differ by 1-5 eps (measured 1e-7 to 6.4e-7
# relative). Sums of thousands of terms per entry take rel = 1e-5, with the count beside them.
REL = {torch.float64: 1e-12, torch.float32: 1e-6, torch.bfloat16: 1e-2, torch.float16: 1e-3}


def assert_close_to_precision(actual, expected, inputs=torch.float32, rel=None, msg=None):
    """Assert that two computations of one float quantity agree to the precision of their inputs.

    Args:
        actual, expected: tensors, arrays or numbers of the same shape.
        inputs: the dtype whose rounding the two computations differ by (float32 for sums of float32
            products even when they are accumulated in float64).
        rel: the bound relative to the magnitude (default ``REL[inputs]``); give a larger one, with the
            reason beside it, where a computation amplifies rounding (a Pearson correlation, a gradient).
        msg: added to the failure message.
    """
    a, e = (torch.as_tensor(x.detach() if torch.is_tensor(x) else np.asarray(x)).double() for x in (actual, expected))
    rel = REL[inputs] if rel is None else rel
    scale = float(e.abs().max()) if e.numel() else 0.0
    torch.testing.assert_close(a, e, rtol=rel, atol=rel * scale, equal_nan=True,
                               msg=(lambda m: f"{m}\n{msg}") if msg else None)


# ------------------------------------------------------------------------------------------ runs in a subprocess
# The CLI in its own process (resume after SIGKILL, DDP), its checkpoints, and which files each DDP rank wrote.

# Records every file this process (a DDP rank) opens for writing or renames into place under LD_AUDIT_ROOT.
AUDIT_SITECUSTOMIZE = """
import atexit, json, os, sys
_root, _log, _seen = os.environ["LD_AUDIT_ROOT"], os.environ["LD_AUDIT_LOG"], []
def _hook(event, args):
    if event == "open":
        path, mode, flags = args
        writes = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
            mode is None and isinstance(flags, int) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))
    elif event == "os.rename":
        path, writes = args[1], True
    else:
        return
    if writes and isinstance(path, (str, bytes, os.PathLike)) and os.fsdecode(path).startswith(_root):
        _seen.append(os.fsdecode(path))
sys.addaudithook(_hook)
@atexit.register
def _dump():
    rank = os.environ.get("LOCAL_RANK", "0")
    with open(f"{_log}.{os.getpid()}", "w") as f:
        json.dump({"rank": rank, "files": sorted(set(_seen))}, f)
"""


def subprocess_env(**extra):
    """The environment of a CLI subprocess: one thread, fixed hash seed, the repository (and ``PYTHONPATH`` in
    ``extra``) importable."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0", "MPLBACKEND": "Agg", **extra}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (extra.get("PYTHONPATH"), REPO, os.environ.get("PYTHONPATH")) if p)
    return env


def run_cli(args, env=None, script=None, timeout=600):
    """``lightning-distill ARGS`` (or ``python SCRIPT ARGS``) in a subprocess; the ``CompletedProcess``."""
    cmd = [sys.executable, script] if script else [sys.executable, "-m", "lightning_distill.cli"]
    return subprocess.run(cmd + list(args), env=env or subprocess_env(), capture_output=True, text=True, timeout=timeout)


def load_ckpt(path):
    return torch.load(path, map_location="cpu", weights_only=False)


def max_weight_diff(a, b):
    sa, sb = load_ckpt(a)["state_dict"], load_ckpt(b)["state_dict"]
    assert sa.keys() == sb.keys()
    return max((sa[k].double() - sb[k].double()).abs().max().item() for k in sa if sa[k].numel())


def audit_env(tmp_path, root):
    """A subprocess environment whose processes record the files they write under ``root`` (see ``writes_by_rank``)."""
    site = tmp_path / "audit_site"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(AUDIT_SITECUSTOMIZE)
    return subprocess_env(PYTHONPATH=str(site), LD_AUDIT_ROOT=str(root), LD_AUDIT_LOG=str(tmp_path / "audit"))


def writes_by_rank(tmp_path):
    """``{rank: [files written under the audited root]}`` of the processes run with ``audit_env(tmp_path, ...)``."""
    by_rank = {}
    for p in tmp_path.glob("audit.*"):
        rec = json.loads(p.read_text())
        by_rank.setdefault(rec["rank"], []).extend(rec["files"])
    return by_rank


# ------------------------------------------------------------------------------------------ DICOM written offline
@pytest.fixture(scope="session")
def phantom_ct(tmp_path_factory):
    """A phantom CT volume in HU, its label map and its affine (the teacher population's subject 0, 32 x 32 x 12,
    LAS like every phantom export): the source of the tests' DICOM."""
    import nibabel as nib

    from lightning_distill.cli import main

    root = tmp_path_factory.mktemp("phantom_ct")
    assert main(["phantom", os.path.join(REPO, "experiments/teacher.yaml"), str(root / "ph"), "data.num_subjects=1",
                 "data.shape=[32,32,12]"]) == 0
    img = nib.load(str(root / "ph" / "imagesTr" / "phantom1_0000_0000.nii.gz"))
    lbl = nib.load(str(root / "ph" / "labelsTr" / "phantom1_0000.nii.gz"))
    return np.asarray(img.dataobj, np.float32), np.asarray(lbl.dataobj).astype(np.uint8), img.affine


def write_dicom_series(folder, hu, affine, uid=None, series_number=1, orientation=None, rescale=(1.0, -1024.0)):
    """Write an ``(X, Y, Z)`` HU volume with its RAS ``affine`` as a CT series of one file per axial slice (pydicom;
    stored as signed 16-bit, ``RescaleSlope``/``RescaleIntercept`` = ``rescale``). ``orientation``: an
    ``ImageOrientationPatient`` to write instead of the affine's (a non-axial stack). Returns the series UID."""
    from pathlib import Path

    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    uid = uid or generate_uid()
    study, frame = generate_uid(), generate_uid()
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ np.asarray(affine, dtype=np.float64)
    sx, sy = np.linalg.norm(lps[:3, 0]), np.linalg.norm(lps[:3, 1])
    iop = list(orientation) if orientation is not None else [*(lps[:3, 0] / sx), *(lps[:3, 1] / sy)]
    slope, intercept = rescale
    for k in range(hu.shape[2]):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
        ds.SOPClassUID = CTImageStorage
        ds.Modality, ds.PatientID, ds.ImageType = "CT", "phantom", ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.PatientName, ds.PatientBirthDate, ds.PatientSex = "Phantom^CT", "", "O"
        ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber, ds.ReferringPhysicianName = "20261206", "120000", "1", "", ""
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SeriesNumber, ds.InstanceNumber = study, uid, series_number, k + 1
        ds.FrameOfReferenceUID = frame
        ds.ImageOrientationPatient = [float(v) for v in iop]
        ds.ImagePositionPatient = [float(v) for v in (lps @ [0.0, 0.0, k, 1.0])[:3]]
        ds.PixelSpacing = [float(sy), float(sx)]  # (spacing between rows, between columns)
        ds.SliceThickness = float(np.linalg.norm(lps[:3, 2]))
        ds.Rows, ds.Columns = hu.shape[1], hu.shape[0]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1  # signed
        ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
        stored = np.round((hu[:, :, k] - intercept) / slope).astype(np.int16).T  # (rows = y, columns = x)
        ds.PixelData = stored.tobytes()
        ds.save_as(folder / f"slice{k:03d}.dcm", enforce_file_format=True)
    return uid
