"""DICOM series read with their geometry and modality values, and refused with the problem named (issue 35)."""

import shutil

import nibabel as nib
import numpy as np
import pytest

from conftest import write_dicom_series
from lightning_distill.data.dicom import find_series, read_series
from lightning_distill.data.nifti import DataError


@pytest.fixture
def volume(phantom_ct):
    """The phantom CT volume in HU and its affine (tests/conftest.py)."""
    hu, _, affine = phantom_ct
    return hu, affine


def test_a_series_reads_back_as_its_hu_values_and_geometry(volume, tmp_path):
    hu, affine = volume
    uid = write_dicom_series(tmp_path / "s", hu, affine, rescale=(2.0, -1024.0))  # stored values become HU by rescale
    [series] = find_series(tmp_path / "s")
    assert series.uid == uid and len(series.files) == 12
    data, aff = read_series(series)
    # the same image in the patient: DICOM orders the slices along the normal of its row and column directions,
    # the phantom's LAS affine has the other handedness, so both are compared in RAS (nibabel's canonical form)
    got = nib.as_closest_canonical(nib.Nifti1Image(data, aff))
    want = nib.as_closest_canonical(nib.Nifti1Image(np.round((hu + 1024.0) / 2.0) * 2.0 - 1024.0, affine))
    np.testing.assert_array_equal(got.get_fdata(), want.get_fdata())  # exact: integers through the 2x rescale
    np.testing.assert_allclose(got.affine, want.affine, atol=1e-4)  # DICOM stores the geometry as decimal strings
    [one] = find_series(sorted((tmp_path / "s").iterdir())[5])  # a single file: a one-slice series
    d1, a1 = read_series(one)
    assert d1.shape == (32, 32, 1) and np.allclose(a1[:3, 3], (affine @ [0, 0, 5, 1])[:3], atol=1e-4)
    np.testing.assert_array_equal(d1[:, :, 0], np.round((hu[:, :, 5] + 1024.0) / 2.0) * 2.0 - 1024.0)


def test_several_series_are_found_and_localizers_and_non_images_left_out(volume, tmp_path):
    hu, affine = volume
    a = write_dicom_series(tmp_path / "all" / "a", hu, affine, series_number=2)
    b = write_dicom_series(tmp_path / "all" / "b", hu[:, :, :4], affine, series_number=3)
    write_dicom_series(tmp_path / "loc", hu[:, :, :1], affine, series_number=1)
    import pydicom

    loc = pydicom.dcmread(str(tmp_path / "loc" / "slice000.dcm"))
    loc.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    loc.save_as(tmp_path / "all" / "scout.dcm")
    (tmp_path / "all" / "notes.txt").write_text("not DICOM")
    series = find_series(tmp_path / "all")
    assert [s.uid for s in series] == [a, b] and [len(s.files) for s in series] == [12, 4]
    assert series[0].skipped == {"localizer": [tmp_path / "all" / "scout.dcm"]}


@pytest.mark.parametrize("damage, message", [
    ("gap", r"1 slice\(s\) missing between slice00[57]\.dcm and slice00[57]\.dcm"),
    ("sagittal", "not an axial stack"),
    ("mixed", "mixed series: .* is 16 x 32"),
    ("compressed", "install a decoder: pip install pylibjpeg pylibjpeg-openjpeg"),
])
def test_a_broken_series_is_refused_with_the_file_and_the_problem(volume, tmp_path, damage, message):
    import pydicom
    from pydicom.uid import JPEG2000Lossless

    hu, affine = volume
    folder = tmp_path / "s"
    write_dicom_series(folder, hu, affine, orientation=[0, 1, 0, 0, 0, -1] if damage == "sagittal" else None)
    if damage == "gap":
        (folder / "slice006.dcm").unlink()
    if damage in ("mixed", "compressed"):
        path = folder / "slice003.dcm"
        ds = pydicom.dcmread(str(path))
        if damage == "mixed":
            ds.Rows = 16
            ds.PixelData = ds.PixelData[: 16 * 32 * 2]
        else:
            ds.file_meta.TransferSyntaxUID = JPEG2000Lossless
            ds.PixelData = pydicom.encaps.encapsulate([b"\x00" * 64])
        ds.save_as(path, enforce_file_format=True)
    with pytest.raises(DataError, match=message):
        read_series(find_series(folder)[0])
    shutil.rmtree(folder)
