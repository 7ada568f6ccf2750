"""`lightning-distill convert` (issue 35): DICOM cases with a DICOM-SEG or per-organ DICOM masks into an nnU-Net
dataset whose labels are exactly the masks', named."""

import json
import shutil

import nibabel as nib
import numpy as np
import pytest

from conftest import write_dicom_series
from lightning_distill.cli import main
from lightning_distill.data.dicom import find_series, read_series, write_seg
from lightning_distill.data.nifti import DataError, discover
from lightning_distill.data.phantom import CLASS_NAMES


def _case(folder, phantom_ct, organs=None, seg=False):
    """A case: its CT series in CT/; per-organ masks (0/255) in MASKS_DICOM/<organ>/ or a DICOM-SEG of every class.
    Returns the label map in the order the DICOM reader puts the slices."""
    hu, label, affine = phantom_ct
    write_dicom_series(folder / "CT", hu, affine)
    write_dicom_series(folder / ".order", label.astype(np.float32), affine, rescale=(1.0, 0.0))  # the reader's z order
    ordered = read_series(find_series(folder / ".order")[0])[0].astype(np.uint8)
    shutil.rmtree(folder / ".order")
    for name, ids in (organs or {}).items():
        write_dicom_series(folder / "MASKS_DICOM" / name, np.isin(label, ids).astype(np.float32) * 255, affine,
                           rescale=(1.0, 0.0))
    if seg:
        [series] = find_series(folder / "CT")
        read_series(series, pixels=False)  # puts its files in the reader's order
        write_seg(series, ordered, list(CLASS_NAMES), folder / "seg.dcm", "test")
    return ordered


def test_per_organ_masks_and_a_dicom_seg_become_one_labelled_dataset(phantom_ct, tmp_path, capsys):
    a = _case(tmp_path / "src" / "a", phantom_ct, organs={"liver": [3], "spleen": [4]})
    b = _case(tmp_path / "src" / "b", phantom_ct, seg=True)
    assert main(["convert", str(tmp_path / "src"), str(tmp_path / "ds")]) == 0
    meta = json.loads((tmp_path / "ds" / "dataset.json").read_text())
    ids = meta["labels"]
    assert list(ids)[:3] == ["background", "liver", "spleen"] and meta["channel_names"] == {"0": "CT"}
    got_a = np.asarray(nib.load(str(tmp_path / "ds" / "labelsTr" / "a.nii.gz")).dataobj)
    np.testing.assert_array_equal(got_a, (a == 3) * ids["liver"] + (a == 4) * ids["spleen"])
    got_b = np.asarray(nib.load(str(tmp_path / "ds" / "labelsTr" / "b.nii.gz")).dataobj)
    for k, name in enumerate(CLASS_NAMES[1:], start=1):  # every class back under its own name
        np.testing.assert_array_equal(got_b == ids[name], b == k, err_msg=name)
    image = nib.load(str(tmp_path / "ds" / "imagesTr" / "a_0000.nii.gz"))
    assert image.get_data_dtype() == np.int16 and image.shape == got_a.shape
    index = discover(tmp_path / "ds")  # the package reads it as any nnU-Net dataset, with the label names
    assert {c.case_id for c in index.cases} == {"a", "b"} and index.labels[ids["spleen"]] == "spleen"


def test_overlapping_masks_and_a_case_without_masks_are_refused_and_nothing_is_written(phantom_ct, tmp_path, capsys):
    _case(tmp_path / "src" / "a", phantom_ct, organs={"kidneys": [5, 6], "left_kidney": [6]})
    assert main(["convert", str(tmp_path / "src"), str(tmp_path / "ds")]) == 2
    err = capsys.readouterr().err
    assert "voxels are in both left_kidney and kidneys" in err and "no label is changed silently" in err
    assert not (tmp_path / "ds").exists()
    shutil.rmtree(tmp_path / "src" / "a" / "MASKS_DICOM")
    with pytest.raises(DataError, match="no masks"):
        from lightning_distill.convert import convert

        convert(tmp_path / "src", tmp_path / "ds")
    assert not (tmp_path / "ds").exists()
