"""Label maps on real-data layouts: one rule for every layout, no silent relabelling, whole-or-nothing slices."""

import json
import os

import nibabel as nib
import numpy as np
import pytest

from lightning_distill.cli import main
from lightning_distill.config import load_config
from lightning_distill.data.labels import LabelMapping
from lightning_distill.data.nifti import IGNORE_INDEX, DataError
from lightning_distill.train import build_source

from conftest import REPO

CLASSES = ["background", "liver", "spleen", "right_kidney", "left_kidney"]
ID_MAP = {5: "liver", 2: "right_kidney", 3: "left_kidney", 1: "spleen"}  # ids 4 and 6: other organs, not listed
AFFINE = np.diag([1.5, 1.5, 4.0, 1.0])
SHAPE = (20, 18, 8)


def _plain_case(seed):
    """Image and a label with ids 1..6, each a block; the blocks' slices differ so max-area has one answer."""
    r = np.random.default_rng(seed)
    lbl = np.zeros(SHAPE, np.uint8)
    lbl[1:7, 1:6, 1:5] = 5   # liver
    lbl[8:12, 1:5, 2:6] = 1  # spleen
    lbl[13:17, 2:6, 3:7] = 2  # right kidney
    lbl[13:17, 10:14, 3:7] = 3  # left kidney
    lbl[2:6, 10:16, 4:8] = 4  # another organ: must not become any class
    lbl[8:12, 10:16, 0:3] = 6  # another one
    lbl[8:12, 5:7, 4] = 1  # spleen is largest on slice 4 (8 voxels more than on slices 2, 3, 5)
    img = (r.normal(0, 5, SHAPE) + 20.0 * lbl).astype(np.float32)
    return img, lbl


def make_plain(root, n=3):
    """A plain folder with ``images/image_<id>.nii.gz`` and ``labels/label_<id>.nii.gz`` (no dataset.json)."""
    for i in range(n):
        img, lbl = _plain_case(i)
        for arr, path in ((img, root / "images" / f"image_{i:03d}.nii.gz"), (lbl, root / "labels" / f"label_{i:03d}.nii.gz")):
            path.parent.mkdir(parents=True, exist_ok=True)
            nib.save(nib.Nifti1Image(arr, AFFINE), str(path))
    return root


PATTERNS = ["data.nifti.image_pattern=images/image_{case}.nii.gz", "data.nifti.label_pattern=labels/label_{case}.nii.gz"]


def _cfg(root, *overrides):
    return load_config(os.path.join(REPO, "experiments/teacher.yaml"), [
        "data.source=nifti", f"data.nifti.root={root}", "data.nifti.modality=none", "data.nifti.orientation=null",
        f"classes=[{','.join(CLASSES)}]", "data.shape=[20,18,8]", *PATTERNS, *overrides])


def _raw(root, case):
    return np.asarray(nib.load(str(root / "labels" / f"label_{case}.nii.gz")).dataobj)


@pytest.mark.parametrize("unmapped", ["background", "ignore"])
@pytest.mark.parametrize("spelling", ["int", "str", "cli-no-space"])
def test_id_map_sends_every_unlisted_id_to_unmapped(tmp_path, unmapped, spelling, capsys):
    root = make_plain(tmp_path / "plain")
    if spelling == "int":
        cfg = _cfg(root, f"data.nifti.unmapped={unmapped}")
        cfg.data.nifti.label_map = dict(ID_MAP)  # as a YAML file with integer keys gives it
    elif spelling == "str":
        cfg = _cfg(root, f"data.nifti.unmapped={unmapped}")
        cfg.data.nifti.label_map = {str(k): v for k, v in ID_MAP.items()}
    else:  # on the command line, without a space after the colons
        cfg = _cfg(root, f"data.nifti.unmapped={unmapped}",
                   "data.nifti.label_map={" + ",".join(f"{k}:{v}" for k, v in ID_MAP.items()) + "}")
    src = build_source(cfg)
    assert src.ids == ["000", "001", "002"]  # the {case} capture: label_000 pairs with image_000
    for case in src.ids:
        raw, lbl = _raw(root, case), src.load(case)["label"]
        for rid in (4, 6):  # unlisted ids: never an organ
            assert np.all(lbl[raw == rid] == (0 if unmapped == "background" else IGNORE_INDEX))
        for rid, name in ID_MAP.items():
            assert np.all(lbl[raw == rid] == CLASSES.index(name))
        assert np.all(lbl[raw == 0] == 0)
    out = capsys.readouterr().out  # the resolved mapping and the voxel counts are printed
    assert "id    4" in out and f"unmapped -> {unmapped}" in out and "per class:" in out


def test_unmapped_error_names_file_and_ids(tmp_path):
    root = make_plain(tmp_path / "plain")
    cfg = _cfg(root, "data.nifti.unmapped=error", "data.nifti.label_map={5: liver, 2: right_kidney, 3: left_kidney, 1: spleen}")
    with pytest.raises(DataError, match=r"label_000.nii.gz: label values \[4, 6\] have no mapping"):
        build_source(cfg)


def test_without_a_map_plain_folder_ids_are_class_indices_and_the_rest_unmapped(tmp_path):
    root = make_plain(tmp_path / "plain")
    src = build_source(_cfg(root))
    raw, lbl = _raw(root, "000"), src.load("000")["label"]
    for rid in (1, 2, 3, 4):
        assert np.all(lbl[raw == rid] == rid)
    assert np.all(lbl[raw == 5] == 0) and np.all(lbl[raw == 6] == 0)  # ids >= 5 classes follow unmapped


def test_map_id_absent_from_every_file_is_reported(tmp_path):
    root = make_plain(tmp_path / "plain")
    with pytest.raises(DataError, match=r"label map entry 200 \(dataset label 200\) occurs in no label file.*"
                                        r"class 'liver' gets no voxel.*ids present in the files: \[0, 1, 2, 3, 4, 5, 6\]"):
        build_source(_cfg(root, "data.nifti.label_map={200: liver, 2: right_kidney, 3: left_kidney, 1: spleen}"))
    with pytest.warns(UserWarning, match=r"occurs in no label file.*Voxels per class: background [\d,]+, liver 0, spleen"):
        build_source(_cfg(root, "data.nifti.on_missing=warn",
                          "data.nifti.label_map={200: liver, 2: right_kidney, 3: left_kidney, 1: spleen}"))


def test_label_map_keys_are_checked():
    with pytest.raises(DataError, match="lists dataset label 5 twice"):
        LabelMapping(CLASSES, {}, {5: "liver", "5": "spleen"})
    with pytest.raises(DataError, match="no label names .* write its label id"):
        LabelMapping(CLASSES, {}, {"liver": "liver"})
    # a dataset label named "ignore" (nnU-Net's convention) is ignored, not background
    m = LabelMapping(CLASSES, {0: "background", 1: "liver", 7: "ignore"}, {})
    assert m.target(7) == IGNORE_INDEX and m.target(1) == 1


def test_integer_keys_in_a_yaml_file(tmp_path):
    root = make_plain(tmp_path / "plain")
    (tmp_path / "run.yaml").write_text(
        f"extends: {REPO}/experiments/teacher.yaml\nclasses: [{', '.join(CLASSES)}]\n"
        f"data:\n  source: nifti\n  shape: [20, 18, 8]\n  nifti:\n    root: {root}\n    modality: none\n"
        "    image_pattern: images/image_{case}.nii.gz\n    label_pattern: labels/label_{case}.nii.gz\n"
        "    label_map: {5: liver, '2': right_kidney, 3: left_kidney, 1: spleen}\n")
    cfg = load_config(tmp_path / "run.yaml")
    raw, lbl = _raw(root, "001"), build_source(cfg).load("001")["label"]
    assert np.all(lbl[raw == 2] == 3) and np.all(lbl[raw == 4] == 0)


def test_label_pattern_that_matches_nothing_is_an_error(tmp_path):
    root = make_plain(tmp_path / "plain")
    with pytest.raises(DataError, match=r"no label file matches 'labels/\{case\}.nii.gz' for any of the 3 images"):
        build_source(_cfg(root, "data.nifti.image_pattern=images/*.nii.gz", "data.nifti.label_pattern=labels/{case}.nii.gz"))


def test_slices_with_label_map_and_max_area_class_on_a_plain_folder(tmp_path, capsys):
    root = make_plain(tmp_path / "plain")
    words = ["slices", str(root), str(tmp_path / "sl"), "--max-area", "spleen", f"classes=[{','.join(CLASSES)}]",
             "data.nifti.label_map={5:liver,2:right_kidney,3:left_kidney,1:spleen}", *PATTERNS]
    assert main(words) == 0
    meta = json.loads((tmp_path / "sl" / "dataset.json").read_text())
    assert meta["labels"] == {n: i for i, n in enumerate(CLASSES)} and meta["slices"] == {"000": 4, "001": 4, "002": 4}
    assert meta["label_mapping"]["source_ids"]["4"] == "background"
    lbl = np.asarray(nib.load(str(tmp_path / "sl" / "labelsTr" / "000.nii.gz")).dataobj)
    raw = _raw(root, "000")[:, :, 4]
    assert (raw == 4).any() and not lbl[raw == 4].any()  # the other organ is background
    assert np.all(lbl[raw == 1] == 2) and np.all(lbl[raw == 5] == 1) and np.all(lbl[raw == 2] == 3)
    assert "per class:" in capsys.readouterr().out
    # the same dataset read back by a run: names match the classes, nothing is remapped
    back = build_source(load_config(os.path.join(REPO, "experiments/student.yaml"), [
        "data.source=nifti", f"data.nifti.root={tmp_path / 'sl'}", "data.nifti.modality=none", "data.shape=[20,18]",
        f"classes=[{','.join(CLASSES)}]", "data.nifti.orientation=null"]))
    assert np.array_equal(back.load("000")["label"], lbl)
    # a name that is not a class after mapping; and a plain folder needs classes to name its labels
    assert main([*words[:4], "kidney", *words[5:]]) == 2
    assert main(["slices", str(root), str(tmp_path / "x"), "--max-area", "spleen", *PATTERNS]) == 2
    assert "no label names" in capsys.readouterr().err
    # a pattern that finds no label is an error, --no-labels an explicit image-only dataset
    assert main(["slices", str(root), str(tmp_path / "y"), "--index", "2", "data.nifti.image_pattern=images/*.nii.gz"]) == 2
    assert "no label file" in capsys.readouterr().err and not (tmp_path / "y").exists()
    assert main(["slices", str(root), str(tmp_path / "y"), "--index", "2", "--no-labels", *PATTERNS]) == 0
    assert json.loads((tmp_path / "y" / "dataset.json").read_text())["images_only"] is True


def _snapshot(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


@pytest.mark.parametrize("damage", ["truncated image", "label shape", "nan in slice"])
def test_slices_with_one_bad_input_leave_no_partial_output(tmp_path, capsys, damage):
    root = make_plain(tmp_path / "plain", n=4)
    words = ["slices", str(root), str(tmp_path / "sl"), "--index", "4", f"classes=[{','.join(CLASSES)}]",
             "data.nifti.label_map={5: liver, 2: right_kidney, 3: left_kidney, 1: spleen}", *PATTERNS]
    assert main(words) == 0
    before = _snapshot(tmp_path / "sl")
    bad = root / ("labels/label_002.nii.gz" if damage == "label shape" else "images/image_002.nii.gz")
    if damage == "truncated image":
        bad.write_bytes(bad.read_bytes()[:-200])
    elif damage == "label shape":
        nib.save(nib.Nifti1Image(np.zeros((20, 18, 7), np.uint8), AFFINE), str(bad))
    else:
        img = np.asarray(nib.load(str(bad)).dataobj).copy()
        img[3, 3, 4] = np.nan
        nib.save(nib.Nifti1Image(img, AFFINE), str(bad))
    capsys.readouterr()
    assert main([*words, "--overwrite"]) == 2
    assert str(bad) in capsys.readouterr().err  # the message names the file
    assert _snapshot(tmp_path / "sl") == before  # the previous output is intact
    assert main([*words[:2], str(tmp_path / "fresh"), *words[3:]]) == 2
    assert not (tmp_path / "fresh").exists()  # no half-written folder
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plain", "sl"]  # no temporary folder left


def test_phantom_plain_folder_export_reads_back_with_the_readme_map(tmp_path, capsys):
    dst = tmp_path / "plain_ct"
    assert main(["phantom", os.path.join(REPO, "experiments/teacher.yaml"), str(dst), "--layout", "folder",
                 "data.num_subjects=2", "data.shape=[24,24,12]"]) == 0
    assert "label ids: 0 background, 1 body_wall" in capsys.readouterr().out
    assert sorted(p.name for p in (dst / "images").iterdir()) == ["image_phantom1_0000.nii.gz", "image_phantom1_0001.nii.gz"]
    assert not (dst / "dataset.json").exists()
    cfg = _cfg(dst, "data.shape=[24,24,12]", "data.nifti.label_map={3: liver, 4: spleen, 5: right_kidney, 6: left_kidney}")
    src = build_source(cfg)
    raw = np.asarray(nib.load(str(dst / "labels" / "label_phantom1_0000.nii.gz")).dataobj)
    lbl = src.load("phantom1_0000")["label"]
    assert np.all(lbl[raw == 3] == 1) and np.all(lbl[np.isin(raw, [1, 2, 7, 8])] == 0)


def test_skipped_cases_are_not_counted(tmp_path):
    root = make_plain(tmp_path / "plain")
    nib.save(nib.Nifti1Image(np.zeros(SHAPE, np.uint8), AFFINE), str(root / "labels" / "label_001.nii.gz"))
    with pytest.warns(UserWarning, match="skipped 1 bad case"):
        src = build_source(_cfg(root, "data.on_bad_case=skip", "data.nifti.label_map={5: liver, 2: right_kidney, 3: left_kidney, 1: spleen}"))
    assert src.ids == ["000", "002"] and src.mapping.files[0] == 2
    assert src.mapping.voxels[0] == sum(int((_raw(root, c) == 0).sum()) for c in ("000", "002"))
