"""predict on a folder is whole-or-nothing; test says how many tested subjects were training subjects."""

import json
import os
import re
import shutil
import warnings

import nibabel as nib
import numpy as np
import pytest
import torch

from conftest import REPO, TINY_STUDENT
from lightning_distill.cli import main

STUDENT_YAML = os.path.join(REPO, "experiments/student.yaml")


@pytest.fixture(scope="module")
def student(tmp_path_factory):
    """A tiny phantom student (8 training subjects of 16); returns its output folder."""
    out = tmp_path_factory.mktemp("student")
    assert main(["fit", STUDENT_YAML, f"output_dir={out}", *TINY_STUDENT, "distill.weight=0", "distill.prototypes=null"]) == 0
    return out


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Six phantom slices of the student's population as an nnU-Net folder (``imagesTr/*_0000.nii.gz``)."""
    dst = tmp_path_factory.mktemp("export") / "ds"
    assert main(["phantom", STUDENT_YAML, str(dst), "data.num_subjects=6", "data.shape=[64,64]"]) == 0
    return dst / "imagesTr"


@pytest.fixture
def inputs(tmp_path, exported):
    return shutil.copytree(exported, tmp_path / "in")


@pytest.fixture
def previous(tmp_path):
    """An output folder with masks from an earlier run (one of them has the name of a new mask)."""
    out = tmp_path / "masks"
    out.mkdir()
    (out / "phantom2_0000.nii.gz").write_bytes(b"earlier mask")
    (out / "other.nii.gz").write_bytes(b"unrelated mask")
    return out


def _files(folder):
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def _truncate(path, ending):
    if ending == ".nii":  # an uncompressed file cut short
        img = nib.load(str(path))
        img = nib.Nifti1Image(np.asarray(img.dataobj), img.affine)
        path.unlink()
        path = path.with_name(path.name.replace(".nii.gz", ".nii"))
        nib.save(img, str(path))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])
    return path


def _nan_image(path):
    img = nib.load(str(path))
    data = np.asarray(img.dataobj, np.float32)
    data[10:20, 10:20] = np.nan
    nib.save(nib.Nifti1Image(data, img.affine), str(path))
    return path


def _four_d(path):
    img = nib.load(str(path))
    data = np.asarray(img.dataobj)
    nib.save(nib.Nifti1Image(np.stack([data, data], -1)[:, :, None], img.affine), str(path))  # (X, Y, 1, 2)
    return path


BAD = {
    "truncated .nii.gz": (lambda p: _truncate(p, ".nii.gz"), "corrupt or truncated"),
    "truncated .nii": (lambda p: _truncate(p, ".nii"), "truncated"),
    "4 dimensions": (_four_d, r"expected a 2D or 3D image, got shape \(64, 64, 1, 2\)"),
    "NaN voxels (found when read)": (_nan_image, "100 NaN or Inf voxels"),
}


@pytest.mark.parametrize("kind", list(BAD))
def test_a_bad_input_in_the_middle_leaves_the_output_folder_as_it_was(student, inputs, previous, kind, capsys):
    make_bad, problem = BAD[kind]
    bad = make_bad(inputs / "phantom2_0003_0000.nii.gz")
    before = _files(previous)
    rc = main(["predict", str(student / "checkpoints" / "last.ckpt"), str(inputs), str(previous)])
    err = capsys.readouterr().err
    assert rc == 2
    assert re.search(f"error: {re.escape(str(bad))}: .*{problem}", err), err
    assert _files(previous) == before  # no new mask, the earlier ones byte-identical
    assert not [p.name for p in previous.parent.iterdir() if ".partial-" in p.name]


def test_a_bad_input_leaves_no_output_folder_when_there_was_none(student, inputs, tmp_path):
    _nan_image(inputs / "phantom2_0004_0000.nii.gz")  # the fifth of six: four masks were predicted before it
    assert main(["predict", str(student / "checkpoints" / "last.ckpt"), str(inputs), str(tmp_path / "new")]) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]


def test_every_mask_is_written_named_without_the_channel_suffix(student, inputs, previous):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(["predict", str(student / "checkpoints" / "last.ckpt"), str(inputs), str(previous)]) == 0
    names = [f"phantom2_{i:04d}.nii.gz" for i in range(6)]
    assert sorted(_files(previous)) == sorted(names + ["other.nii.gz"])  # masks of earlier runs are kept
    assert (previous / "other.nii.gz").read_bytes() == b"unrelated mask"
    for name in names:
        mask, image = nib.load(str(previous / name)), nib.load(str(inputs / name.replace(".nii.gz", "_0000.nii.gz")))
        assert mask.shape == image.shape and mask.get_data_dtype() == np.uint8
    # the student's own population: no intensity warning
    assert not [w for w in caught if "intensities unlike" in str(w.message)]


def test_two_inputs_with_one_mask_name_are_refused(student, inputs, tmp_path, capsys):
    shutil.copy(inputs / "phantom2_0001_0000.nii.gz", inputs / "phantom2_0001.nii.gz")
    assert main(["predict", str(student / "checkpoints" / "last.ckpt"), str(inputs), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert f"{inputs / 'phantom2_0001_0000.nii.gz'}: its mask would be named phantom2_0001.nii.gz, like the mask of " \
           f"{inputs / 'phantom2_0001.nii.gz'}" in err
    assert not (tmp_path / "out").exists()


def _test(capsys, *args):
    assert main(["test", *map(str, args)]) == 0
    return capsys.readouterr().out


def test_test_all_counts_the_checkpoints_training_subjects(student, tmp_path, capsys):
    ckpt = student / "checkpoints" / "last.ckpt"
    out = _test(capsys, ckpt, "--all", "--out", tmp_path / "all.json")
    res = json.loads((tmp_path / "all.json").read_text())
    assert res["training_subjects_in_test"] == 8
    assert res["test_set"] == "16 samples of every subject (8 of the 16 subjects are training subjects of this checkpoint)"
    assert res["test_set"] in out and "held-out" not in out
    _test(capsys, ckpt, "--out", tmp_path / "split.json")  # the config's own test split
    res = json.loads((tmp_path / "split.json").read_text())
    assert res["training_subjects_in_test"] == 0 and res["test_set"] == "4 held-out samples"
    _test(capsys, ckpt, "--all", "--out", tmp_path / "other.json", "data.phantom.seed=9")  # another population
    res = json.loads((tmp_path / "other.json").read_text())
    assert res["training_subjects_in_test"] == 0 and res["test_set"].endswith("none of a training subject of this checkpoint")


def test_a_checkpoint_without_the_record_says_the_overlap_is_unknown(student, tmp_path, capsys):
    ckpt = torch.load(student / "checkpoints" / "last.ckpt", weights_only=False)
    del ckpt["lightning_distill"]["train_identities"]  # as written by 0.4.0: subject ids and the data they were of
    torch.save(ckpt, tmp_path / "ids.ckpt")
    _test(capsys, tmp_path / "ids.ckpt", "--all", "--out", tmp_path / "same.json")  # the training data: the ids count
    assert json.loads((tmp_path / "same.json").read_text())["training_subjects_in_test"] == 8
    _test(capsys, tmp_path / "ids.ckpt", "--all", "--out", tmp_path / "other.json", "data.phantom.seed=9")  # other data:
    res = json.loads((tmp_path / "other.json").read_text())  # ids of another dataset say nothing (was: "none")
    assert res["training_subjects_in_test"] is None and "records subject ids only" in res["test_set"]
    for key in ("train_subjects", "data", "intensity"):  # as written by an earlier version still
        del ckpt["lightning_distill"][key]
    torch.save(ckpt, tmp_path / "old.ckpt")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _test(capsys, tmp_path / "old.ckpt", "--all", "--out", tmp_path / "all.json")
    res = json.loads((tmp_path / "all.json").read_text())
    assert res["training_subjects_in_test"] is None and "unknown how many are of training subjects" in res["test_set"]
    assert not [w for w in caught if "intensities unlike" in str(w.message)]  # no fingerprint: not checked


def test_without_a_validation_split_the_warning_says_so(tmp_path):
    with pytest.warns(UserWarning, match="there is no validation split") as caught:
        assert main(["fit", STUDENT_YAML, f"output_dir={tmp_path}", *TINY_STUDENT, "distill.weight=0",
                     "distill.prototypes=null", "data.val_subjects=0", "trainer.max_steps=2"]) == 0
    msg = next(str(w.message) for w in caught if "validation split" in str(w.message))
    assert "testing the last weights" in msg and "max_steps" not in msg
    assert not (tmp_path / "checkpoints" / "best.ckpt").exists()


def test_predict_takes_dicom_a_series_a_folder_of_series_or_one_file(student, tmp_path, capsys):
    """DICOM in (issue 35): a series folder gives the mask of the same image as its NIfTI (the slices ordered along
    the DICOM normal: compared in RAS), a folder of two series one mask each, one file a one-slice mask; a series
    with a missing slice is refused before any mask is written."""
    from conftest import write_dicom_series

    ckpt = student / "checkpoints" / "last.ckpt"
    assert main(["phantom", STUDENT_YAML, str(tmp_path / "ph"), "data.num_subjects=1", "data.shape=[64,64,6]"]) == 0
    src = tmp_path / "ph" / "imagesTr" / "phantom2_0000_0000.nii.gz"
    img = nib.load(str(src))
    hu = np.asarray(img.dataobj, np.float32)
    a = write_dicom_series(tmp_path / "dcm" / "a", hu, img.affine, series_number=1)
    b = write_dicom_series(tmp_path / "dcm" / "b", hu[:, :, :3], img.affine, series_number=2)
    assert main(["predict", str(ckpt), str(src), str(tmp_path / "nifti.nii.gz")]) == 0
    assert main(["predict", str(ckpt), str(tmp_path / "dcm" / "a"), str(tmp_path / "one")]) == 0
    from_dicom = nib.as_closest_canonical(nib.load(str(tmp_path / "one" / f"{a}.nii.gz")))
    from_nifti = nib.as_closest_canonical(nib.load(str(tmp_path / "nifti.nii.gz")))
    np.testing.assert_allclose(from_dicom.affine, from_nifti.affine, atol=1e-4)
    got, want = np.asarray(from_dicom.dataobj), np.asarray(from_nifti.dataobj)
    assert got.shape == want.shape and (got != want).mean() <= 1e-3  # another batch order: ties only
    assert main(["predict", str(ckpt), str(tmp_path / "dcm"), str(tmp_path / "two")]) == 0
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == sorted([f"{a}.nii.gz", f"{b}.nii.gz"])
    assert nib.load(str(tmp_path / "two" / f"{b}.nii.gz")).shape == (64, 64, 3)
    one_file = sorted((tmp_path / "dcm" / "a").iterdir())[2]
    assert main(["predict", str(ckpt), str(one_file), str(tmp_path / "slice.nii.gz")]) == 0
    assert nib.load(str(tmp_path / "slice.nii.gz")).shape == (64, 64, 1)
    (tmp_path / "dcm" / "a" / "slice003.dcm").unlink()  # a gap in series a
    capsys.readouterr()
    assert main(["predict", str(ckpt), str(tmp_path / "dcm"), str(tmp_path / "gap")]) == 2
    assert "1 slice(s) missing between" in capsys.readouterr().err and not (tmp_path / "gap").exists()


def test_predict_writes_a_dicom_seg_that_reads_back_onto_its_series(student, tmp_path, capsys):
    """DICOM-SEG out (issue 35): one segment per class found, named; its frames are the source slices (same
    positions, same orientation) and hold exactly the NIfTI mask's labels."""
    import highdicom as hd
    import pydicom

    from conftest import write_dicom_series

    ckpt = student / "checkpoints" / "last.ckpt"
    assert main(["phantom", STUDENT_YAML, str(tmp_path / "ph"), "data.num_subjects=1", "data.shape=[64,64,4]"]) == 0
    img = nib.load(str(tmp_path / "ph" / "imagesTr" / "phantom2_0000_0000.nii.gz"))
    uid = write_dicom_series(tmp_path / "dcm", np.asarray(img.dataobj, np.float32), img.affine)
    assert main(["predict", str(ckpt), str(tmp_path / "dcm"), str(tmp_path / "out"), "--dicom-seg"]) == 0
    mask = np.asarray(nib.load(str(tmp_path / "out" / f"{uid}.nii.gz")).dataobj)
    seg = hd.seg.segread(str(tmp_path / "out" / f"{uid}.seg.dcm"))
    classes = torch.load(ckpt, weights_only=False)["hyper_parameters"]["class_names"]
    present = [k for k in range(1, len(classes)) if (mask == k).any()]
    assert [seg.get_segment_description(n).segment_label for n in seg.segment_numbers] == [classes[k] for k in present]
    assert seg.SeriesInstanceUID != uid and seg.ReferencedSeriesSequence[0].SeriesInstanceUID == uid
    sources = {pydicom.dcmread(str(f)).SOPInstanceUID: pydicom.dcmread(str(f)) for f in (tmp_path / "dcm").iterdir()}
    for frame, item in enumerate(seg.PerFrameFunctionalGroupsSequence):
        ref = item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        src = sources[ref]
        np.testing.assert_allclose(item.PlanePositionSequence[0].ImagePositionPatient, src.ImagePositionPatient, atol=1e-4)
        n = int(item.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        iop = np.asarray(src.ImageOrientationPatient, dtype=float)
        along = {u: float(np.dot(np.asarray(d.ImagePositionPatient, dtype=float), np.cross(iop[:3], iop[3:])))
                 for u, d in sources.items()}  # the mask's z order: positions along the slice normal
        z = sorted(along, key=along.get).index(ref)
        np.testing.assert_array_equal(seg.pixel_array[frame].T.astype(bool), mask[:, :, z] == present[n - 1])
    assert main(["predict", str(ckpt), str(tmp_path / "ph" / "imagesTr"), str(tmp_path / "nii"), "--dicom-seg"]) == 2
    assert "--dicom-seg writes a DICOM Segmentation of DICOM inputs" in capsys.readouterr().err
