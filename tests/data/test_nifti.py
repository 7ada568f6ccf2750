"""NIfTI datasets: layouts, label maps, reorientation, bad input, slice extraction, predict."""

import json
import os
import shutil
import warnings

import nibabel as nib
import numpy as np
import pytest
import torch

from lightning_distill.cli import main
from lightning_distill.data.nifti import DataError, discover
from lightning_distill.data.preprocess import Preprocess
from lightning_distill.data.sources import NiftiSource
from lightning_distill.slices import extract_slices

from conftest import REPO

CLASSES = ["background", "liver", "spleen"]
DS_LABELS = {"background": 0, "liver": 1, "spleen": 2, "stomach": 3}
AFFINE = np.diag([1.5, 1.5, 4.0, 1.0])


def _case(seed, shape=(16, 14, 6)):
    r = np.random.default_rng(seed)
    img = r.normal(0, 10, shape).astype(np.float32)
    lbl = np.zeros(shape, np.uint8)
    lbl[2:8, 2:7, 1:4] = 1
    lbl[9:14, 8:12, 2:5] = 2
    lbl[3:5, 10:12, 4:6] = 3
    img += 100.0 * lbl
    return img, lbl


def _save(arr, path, affine=AFFINE):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(arr, affine), str(path))


def make_nnunet(root, n=4, shape=(16, 14, 6)):
    for i in range(n):
        img, lbl = _case(i, shape)
        _save(img, root / "imagesTr" / f"case{i}_0000.nii.gz")
        _save(lbl, root / "labelsTr" / f"case{i}.nii.gz")
    (root / "dataset.json").write_text(json.dumps({"channel_names": {"0": "CT"}, "labels": DS_LABELS,
                                                   "numTraining": n, "file_ending": ".nii.gz"}))
    return root


def make_msd(root, n=3):
    entries = []
    for i in range(n):
        img, lbl = _case(i)
        _save(img, root / "imagesTr" / f"m{i}.nii.gz")
        _save(lbl, root / "labelsTr" / f"m{i}.nii.gz")
        entries.append({"image": f"./imagesTr/m{i}.nii.gz", "label": f"./labelsTr/m{i}.nii.gz"})
    (root / "dataset.json").write_text(json.dumps({"modality": {"0": "CT"}, "labels": {str(v): k for k, v in DS_LABELS.items()},
                                                   "training": entries}))
    return root


def make_folder(root, n=3):
    for i in range(n):
        img, lbl = _case(i)
        _save(img, root / "images" / f"p{i}.nii")
        _save(lbl, root / "labels" / f"p{i}.nii")
    return root


def source(root, **kw):
    pre = kw.pop("preprocess", Preprocess(orientation="RAS", modality="none"))
    return NiftiSource(root, CLASSES, kw.pop("dims", 3), pre, **kw)


def test_three_layouts_are_discovered(tmp_path):
    nn = discover(make_nnunet(tmp_path / "nn"))
    assert nn.layout == "nnunet" and [c.case_id for c in nn.cases] == ["case0", "case1", "case2", "case3"]
    assert nn.labels[2] == "spleen" and nn.channels == ["CT"]
    msd = discover(make_msd(tmp_path / "msd"))
    assert msd.layout == "msd" and len(msd.cases) == 3 and msd.labels[1] == "liver"
    folder = discover(make_folder(tmp_path / "f"), image_pattern="images/*.nii", label_pattern="labels/{case}.nii")
    assert folder.layout == "folder" and [c.case_id for c in folder.cases] == ["p0", "p1", "p2"]
    src = source(tmp_path / "msd")
    item = src.load(src.ids[0])
    assert item["image"].shape == (1, 16, 14, 6) and item["label"].shape == (16, 14, 6)
    assert np.allclose(item["spacing"], [1.5, 1.5, 4.0])


def test_label_map_remaps_and_unmapped_policy(tmp_path):
    root = make_nnunet(tmp_path / "nn", n=1)
    item = source(root).load("case0")
    assert set(np.unique(item["label"])) == {0, 1, 2}  # stomach (3) -> background by default
    lbl = source(root, unmapped="ignore").load("case0")["label"]
    assert 255 in np.unique(lbl)
    with pytest.raises(DataError, match=r"label values \[3\] have no mapping"):
        source(root, unmapped="error")
    # a label map sending a dataset organ to another experiment class, and one to ignore
    with pytest.warns(UserWarning, match="class 'liver' gets no voxel"):  # every liver voxel is ignored
        lbl = source(root, label_map={"stomach": "spleen", "liver": "ignore"}, on_missing="warn").load("case0")["label"]
    raw = np.asarray(nib.load(str(root / "labelsTr" / "case0.nii.gz")).dataobj)
    assert np.all(lbl[raw == 3] == 2) and np.all(lbl[raw == 1] == 255)


def test_unknown_organ_in_label_map_names_it(tmp_path):
    root = make_nnunet(tmp_path / "nn", n=1)
    with pytest.raises(DataError, match="unknown organ 'pancreas'"):
        source(root, label_map={"stomach": "pancreas"})
    with pytest.raises(DataError, match="does not have"):
        source(root, label_map={"gallbladder": "liver"})


def test_ras_reorientation_makes_flipped_files_equal(tmp_path):
    img, lbl = _case(0)
    a = tmp_path / "a"
    b = tmp_path / "b"
    for root, arr_img, arr_lbl, aff in ((a, img, lbl, AFFINE), (b, img[::-1].copy(), lbl[::-1].copy(), np.diag([-1.5, 1.5, 4.0, 1.0]))):
        aff = aff.copy()
        if root is b:
            aff[0, 3] = 1.5 * (img.shape[0] - 1)  # same world positions, stored flipped along x
        _save(arr_img, root / "images" / "x.nii.gz", aff)
        _save(arr_lbl, root / "labels" / "x.nii.gz", aff)
    sa, sb = source(a, layout="folder").load("x"), source(b, layout="folder").load("x")
    assert np.allclose(sa["image"], sb["image"]) and np.array_equal(sa["label"], sb["label"])


def test_preprocessing_spacing_window_crop_and_resize(tmp_path):
    root = make_nnunet(tmp_path / "nn", n=1)
    pre = Preprocess(spacing=[3.0, 3.0], modality="CT", ct_window=(-100, 200), crop_foreground=True, crop_threshold=0.5,
                     crop_margin=1, shape=[8, 8, 4])
    item = source(root, preprocess=pre).load("case0")
    assert item["image"].shape == (1, 8, 8, 4) and item["label"].shape == (8, 8, 4)
    assert item["image"].min() >= 0 and item["image"].max() <= 1
    assert set(np.unique(item["label"])) <= {0, 1, 2}


BAD = {
    "missing label": lambda r: os.remove(r / "labelsTr" / "case1.nii.gz"),
    "truncated": lambda r: (r / "imagesTr" / "case1_0000.nii.gz").write_bytes((r / "imagesTr" / "case1_0000.nii.gz").read_bytes()[:300]),
    "shape mismatch": lambda r: _save(np.zeros((10, 14, 6), np.uint8), r / "labelsTr" / "case1.nii.gz"),
    "affine mismatch": lambda r: _save(_case(1)[1], r / "labelsTr" / "case1.nii.gz", np.diag([2.0, 1.5, 4.0, 1.0])),
    "label values": lambda r: _save(np.full((16, 14, 6), 7, np.uint8), r / "labelsTr" / "case1.nii.gz"),
    "nan": lambda r: _save(np.full((16, 14, 6), np.nan, np.float32), r / "imagesTr" / "case1_0000.nii.gz"),
    "empty label": lambda r: _save(np.zeros((16, 14, 6), np.uint8), r / "labelsTr" / "case1.nii.gz"),
    "ndim": lambda r: _save(np.zeros((16, 14, 6, 2), np.float32), r / "imagesTr" / "case1_0000.nii.gz"),
}
EXPECT = {
    "missing label": r"case1.nii.gz: label file is missing",
    "truncated": r"case1_0000.nii.gz: cannot read image as NIfTI",
    "shape mismatch": r"case1.nii.gz: label shape \(10, 14, 6\) differs from image shape",
    "affine mismatch": r"case1.nii.gz: label affine differs",
    "label values": r"case1.nii.gz: label values \[7\] are not in the dataset's label map",
    "nan": r"case1_0000.nii.gz: image contains \d+ NaN or Inf voxels",
    "empty label": r"case1.nii.gz: label is empty",
    "ndim": r"case1_0000.nii.gz: image has 4 dimensions",
}


@pytest.mark.parametrize("kind", list(BAD))
def test_bad_input_names_file_and_problem_and_skip_keeps_the_rest(tmp_path, kind):
    root = make_nnunet(tmp_path / "nn")
    BAD[kind](root)
    before = {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}
    with pytest.raises(DataError, match=EXPECT[kind]):
        source(root)
    with pytest.warns(UserWarning, match=r"skipped 1 bad case\(s\)[\s\S]*case1"):
        src = source(root, on_bad_case="skip")
    assert src.ids == ["case0", "case2", "case3"] and "case1" in src.skipped
    assert {p: p.read_bytes() for p in root.rglob("*") if p.is_file()} == before  # nothing touched


def test_malformed_dataset_json_and_bad_directories(tmp_path):
    root = make_nnunet(tmp_path / "nn", n=1)
    (root / "dataset.json").write_text('{"channel_names": {"0": "CT"}, "labels": ')
    with pytest.raises(DataError, match=r"dataset.json: malformed dataset.json \(line 1"):
        discover(root)
    (root / "dataset.json").write_text('{"channel_names": {"0": "CT"}, "file_ending": ".nii.gz"}')
    with pytest.raises(DataError, match="missing 'labels'"):
        discover(root)
    with pytest.raises(DataError, match="does not exist"):
        discover(tmp_path / "nowhere")
    (tmp_path / "afile").write_text("x")
    with pytest.raises(DataError, match="is not a directory"):
        discover(tmp_path / "afile")


def test_two_d_files_are_single_slice_samples(tmp_path):
    img, lbl = _case(0)
    for i in range(3):
        _save(img[:, :, 2 + i % 2].copy(), tmp_path / "images" / f"s{i}.nii.gz")
        _save(lbl[:, :, 2 + i % 2].copy(), tmp_path / "labels" / f"s{i}.nii.gz")
    src = source(tmp_path, dims=2, preprocess=Preprocess(modality="none", shape=[16, 16, 1]))
    item = src.load("s0")
    assert item["image"].shape == (1, 16, 16) and item["label"].shape == (16, 16) and item["spacing"].shape == (2,)
    vol = make_nnunet(tmp_path / "vol", n=2)
    with pytest.raises(DataError, match="single-slice sample must be 2D"):
        source(vol, dims=2)
    allsl = source(vol, dims=2, slice_mode="all")
    assert allsl.ids[:2] == ["case0@0", "case0@1"] and len(allsl.ids) == 12
    assert allsl.load("case1@3")["image"].shape == (1, 16, 14)


@pytest.mark.parametrize("rule,value,expected", [("index", 2, 2), ("fraction", 1.0, 5), ("max-area", "spleen", 2)])
def test_slice_extraction_rules(tmp_path, rule, value, expected):
    src = make_nnunet(tmp_path / "nn", n=2)
    chosen = extract_slices(src, tmp_path / "out", rule, value)
    assert chosen == {"case0": expected, "case1": expected}
    meta = json.loads((tmp_path / "out" / "dataset.json").read_text())
    assert meta["slices"] == chosen and meta["labels"] == DS_LABELS and meta["numTraining"] == 2
    im = nib.load(str(tmp_path / "out" / "imagesTr" / "case0_0000.nii.gz"))
    lb = nib.load(str(tmp_path / "out" / "labelsTr" / "case0.nii.gz"))
    assert im.shape == (16, 14) and lb.shape == (16, 14) and im.header.get_zooms()[:2] == (1.5, 1.5)
    assert np.allclose(im.affine[2, 3], 4.0 * expected)  # the slice keeps its world position
    vol_lbl = np.asarray(nib.load(str(src / "labelsTr" / "case0.nii.gz")).dataobj)
    assert np.array_equal(np.asarray(lb.dataobj), vol_lbl[:, :, expected])
    assert extract_slices(src, tmp_path / "out", rule, value, overwrite=True) == chosen  # deterministic
    with pytest.raises(FileExistsError):
        extract_slices(src, tmp_path / "out", rule, value)


def test_slice_extraction_list_file_and_cli(tmp_path, capsys):
    src = make_nnunet(tmp_path / "nn", n=2)
    (tmp_path / "list.txt").write_text("# case index\ncase1 4\n")
    with pytest.warns(UserWarning, match="case0: not in the slice list"):
        assert extract_slices(src, tmp_path / "out", "list", str(tmp_path / "list.txt")) == {"case1": 4}
    assert main(["slices", str(src), str(tmp_path / "cli"), "--max-area", "liver"]) == 0
    assert main(["slices", str(src), str(tmp_path / "cli2"), "--max-area", "pancreas"]) == 2
    assert "pancreas" in capsys.readouterr().err


PHANTOM_NAMES = "classes=[background,body_wall,muscle,liver,spleen,right_kidney,left_kidney,aorta,vertebra]"


def _phantom_nifti_teacher(tmp_path, tiny_teacher, n):
    """Export n phantom volumes as NIfTI, fit a tiny teacher on them, extract the students' slices."""
    teacher_cfg = os.path.join(REPO, "experiments/teacher.yaml")
    vols = tmp_path / "vols"
    assert main(["phantom", teacher_cfg, str(vols), f"data.num_subjects={n}", "data.shape=[32,32,16]"]) == 0
    nifti = ["data.source=nifti", f"data.nifti.root={vols}", "data.nifti.modality=CT", "data.nifti.orientation=LAS",
             PHANTOM_NAMES]
    assert main(["fit", teacher_cfg, f"output_dir={tmp_path / 't'}", *tiny_teacher, *nifti]) == 0
    assert main(["slices", str(vols), str(tmp_path / "sl"), "--max-area", "left_kidney"]) == 0
    return vols


def _same_mask_up_to_ties(a: np.ndarray, b: np.ndarray) -> None:
    """Masks of one network computed in other batches (another rounding of the logits): a voxel whose two best
    classes tie within float32 rounding may take either label. Only the masks are at hand here, so at most
    1 in 1,000 voxels may differ: such ties, never a systematic difference."""
    assert a.shape == b.shape and a.dtype == b.dtype
    assert (a != b).mean() <= 1e-3, f"{int((a != b).sum())} of {a.size} voxels differ"


def test_phantom_nifti_teacher_slices_student_predict_round_trip(tmp_path, tiny_teacher, tiny_student):
    """The "use your own data" path on exported phantom NIfTI: teacher -> slices -> student -> predict."""
    student_cfg = os.path.join(REPO, "experiments/student.yaml")
    vols = _phantom_nifti_teacher(tmp_path, tiny_teacher, 8)
    names = PHANTOM_NAMES
    assert (tmp_path / "t" / "prototypes.pt").is_file()
    nifti2d = ["data.source=nifti", f"data.nifti.root={tmp_path / 'sl'}", "data.nifti.orientation=LAS", names,
               "data.num_subjects=8", "data.val_subjects=2", "data.test_subjects=2", "data.shape=[32,32]"]
    assert main(["fit", student_cfg, f"output_dir={tmp_path / 's'}", *tiny_student, *nifti2d,
                 f"distill.prototypes={tmp_path / 't' / 'prototypes.pt'}"]) == 0
    ckpt = tmp_path / "s" / "checkpoints" / "last.ckpt"
    # predict a 2D file, then a 3D volume slice by slice, with an x-flipped (RAS) affine
    out2d = tmp_path / "pred2d.nii.gz"
    assert main(["predict", str(ckpt), str(tmp_path / "sl" / "imagesTr" / "phantom1_0000_0000.nii.gz"), str(out2d)]) == 0
    src2d = nib.load(str(tmp_path / "sl" / "imagesTr" / "phantom1_0000_0000.nii.gz"))
    assert nib.load(str(out2d)).shape == src2d.shape and np.allclose(nib.load(str(out2d)).affine, src2d.affine)
    vol = nib.load(str(vols / "imagesTr" / "phantom1_0000_0000.nii.gz"))
    flipped_aff = vol.affine.copy()
    flipped_aff[0] *= -1
    flipped_aff[0, 3] = vol.affine[0, 0] * (vol.shape[0] - 1) + vol.affine[0, 3]
    _save(np.asarray(vol.dataobj)[::-1].copy(), tmp_path / "in" / "ras_0000.nii.gz", flipped_aff)
    assert main(["predict", str(ckpt), str(tmp_path / "in"), str(tmp_path / "out")]) == 0
    pred = nib.load(str(tmp_path / "out" / "ras.nii.gz"))
    assert pred.shape == vol.shape and np.allclose(pred.affine, flipped_aff) and pred.get_data_dtype() == np.uint8
    # slices one per forward on a named device give the same mask as the default batches of 16 (another batch
    # split: logits equal to float32 precision, so a voxel whose two best classes tie within it may take either)
    assert main(["predict", str(ckpt), str(tmp_path / "in"), str(tmp_path / "out1"), "--device", "cpu",
                 "--batch-size", "1"]) == 0
    _same_mask_up_to_ties(np.asarray(nib.load(str(tmp_path / "out1" / "ras.nii.gz")).dataobj), np.asarray(pred.dataobj))
    # the 3D teacher: one window per forward = the config's sw_batch_size
    teacher_ckpt = tmp_path / "t" / "checkpoints" / "last.ckpt"
    for sw, dst in ((None, "t_out"), ("1", "t_out1")):
        assert main(["predict", str(teacher_ckpt), str(tmp_path / "in"), str(tmp_path / dst),
                     *(["--sw-batch-size", sw] if sw else [])]) == 0
    masks = [np.asarray(nib.load(str(tmp_path / d / "ras.nii.gz")).dataobj) for d in ("t_out", "t_out1")]
    assert masks[0].shape == vol.shape
    _same_mask_up_to_ties(*masks)
    if not torch.cuda.is_available():  # a device this machine lacks is refused before anything is written
        assert main(["predict", str(ckpt), str(tmp_path / "in"), str(tmp_path / "out_cuda"), "--device", "cuda"]) == 2
        assert not (tmp_path / "out_cuda").exists()
    # the evaluation command on every axial slice of volumes
    with warnings.catch_warnings(record=True) as caught:  # every level of volumes of the training's kind: no
        warnings.simplefilter("always")                   # intensity warning (issue 35: 8 of 32 samples warned)
        assert main(["test", str(ckpt), f"data.nifti.root={vols}", "data.nifti.slice_mode=all",
                     "data.val_subjects=1", "data.test_subjects=2", "--out", str(tmp_path / "all.json"), "--device", "cpu"]) == 0
    assert not [w for w in caught if "intensities unlike" in str(w.message)]
    res = json.loads((tmp_path / "all.json").read_text())
    assert res["test"]["num_cases"] == 2 * 16 and "liver" in res["test"]["dice"]
    # every subject of another dataset; overrides may also follow the options
    assert main(["test", str(ckpt), "--all", "--out", str(tmp_path / "every.json"), f"data.nifti.root={vols}",
                 "data.nifti.slice_mode=all"]) == 0
    every = json.loads((tmp_path / "every.json").read_text())
    assert every["test"]["num_cases"] == 8 * 16
    # the student trained on the slices of 4 of these 8 volumes: `slices` recorded where they came from, so the
    # test knows those subjects (issue 35: it said "none of a training subject")
    trained = torch.load(ckpt, map_location="cpu", weights_only=False)["lightning_distill"]["train_subjects"]
    assert len(trained) == 4 and every["training_subjects_in_test"] == 4
    assert every["test_set"] == "128 samples of every subject (4 of the 8 subjects are training subjects of this checkpoint)"
    # the same volumes copied elsewhere with no record: the test cannot tell, and says so (not "none")
    shutil.copytree(vols, tmp_path / "copy", ignore=shutil.ignore_patterns("provenance.json"))
    assert main(["test", str(ckpt), "--all", "--out", str(tmp_path / "copy.json"), f"data.nifti.root={tmp_path / 'copy'}",
                 "data.nifti.slice_mode=all"]) == 0
    copy = json.loads((tmp_path / "copy.json").read_text())
    assert copy["training_subjects_in_test"] is None
    assert "unknown how many are of training subjects" in copy["test_set"] and "4 of their case ids are training case ids" in copy["test_set"]


def test_reorient_round_trip_and_slice_affine():
    from lightning_distill.data.nifti import reorient, slice_affine

    data = np.arange(2 * 3 * 4 * 5, dtype=np.float32).reshape(2, 3, 4, 5)
    aff = np.array([[0, 0, 2.0, 10], [-1.5, 0, 0, 20], [0, 1.5, 0, 30], [0, 0, 0, 1]])  # axes permuted and flipped
    out, new_aff, undo = reorient(data, aff, "RAS")
    assert out.shape == (2, 5, 3, 4) and (np.diag(new_aff)[:3] > 0).all()  # x<-axis 2, y<-axis 0 (flipped), z<-axis 1
    assert np.array_equal(undo(out[1]), data[1])
    # a voxel keeps its world position
    ijk = np.array([1, 2, 3, 1.0])
    world = aff @ ijk
    new_ijk = np.linalg.solve(new_aff, world)
    assert out[0][tuple(np.round(new_ijk[:3]).astype(int))] == data[0][1, 2, 3]
    assert np.allclose(slice_affine(new_aff, 2) @ [0, 0, 0, 1], new_aff @ [0, 0, 2, 1])


def test_validation_on_every_axial_slice_of_the_val_volumes(tmp_path):
    """data.nifti.val_root: train on one slice per patient, validate on every axial slice of the
    validation patients' volumes, so that model selection sees organs the chosen slice misses."""
    from omegaconf import OmegaConf

    from lightning_distill.config import load_config
    from lightning_distill.data.datamodules import SliceDataModule
    from lightning_distill.train import build_datamodule

    vol = make_nnunet(tmp_path / "vol", n=4)
    extract_slices(vol, tmp_path / "sl", "index", 1)  # z = 1: liver only, no spleen
    pre = Preprocess(orientation="RAS", modality="none", shape=[16, 16, 1])
    with pytest.warns(UserWarning, match="spleen"):  # in no chosen slice
        slices = source(tmp_path / "sl", dims=2, preprocess=pre, on_missing="warn")
    splits = {"train": ["case0", "case1"], "val": ["case3"], "test": ["case2"]}
    dm = SliceDataModule(slices, splits=splits, batch_size=2,
                         val_source=source(vol, dims=2, slice_mode="all", preprocess=pre, cases=["case3"]))
    assert dm.splits["val"] == [f"case3@{z}" for z in range(6)]
    assert dm.splits["test"] == ["case2"] and sorted(dm.train_ids) == ["case0", "case1"]
    dm.setup()
    val_labels = np.stack([dm.datasets["val"][i]["label"].numpy() for i in range(6)])
    assert (val_labels == 2).any() and not (slices.load("case3")["label"] == 2).any()  # the spleen is only in val
    with pytest.raises(ValueError, match="explicit splits"):
        SliceDataModule(slices, val_source=slices)
    with pytest.raises(ValueError, match=r"not in the data: \['case2'\]"):
        SliceDataModule(slices, splits={**splits, "val": ["case2"]},
                        val_source=source(vol, dims=2, slice_mode="all", preprocess=pre, cases=["case3"]))
    # from a config: the val cases' volumes are read from val_root, with the run's preprocessing
    over = ["data.source=nifti", f"data.nifti.root={tmp_path / 'sl'}", f"data.nifti.val_root={vol}",
            "classes=[background,liver,spleen]", "data.shape=[16,16]", "data.nifti.modality=none",
            "data.nifti.on_missing=warn"]
    cfg = load_config(os.path.join(REPO, "experiments/student.yaml"), over)
    cfg.data.splits = splits
    with pytest.warns(UserWarning, match="spleen"):
        dm = build_datamodule(cfg)
    assert len(dm.splits["val"]) == 6 and dm.val_source.preprocess.shape == [16, 16, 1]
    cfg.data.splits = None
    with pytest.raises(ValueError, match="val_root needs data.splits"), pytest.warns(UserWarning, match="spleen"):
        build_datamodule(cfg)
    cfg = load_config(os.path.join(REPO, "experiments/teacher.yaml"),
                      ["data.source=nifti", f"data.nifti.root={vol}", f"data.nifti.val_root={vol}", "classes=[background,liver,spleen]",
                       "data.shape=[16,16,6]", "data.nifti.modality=none", "data.nifti.on_missing=warn"])
    cfg.data.splits = OmegaConf.create(splits)
    with pytest.raises(ValueError, match="val_root is for 2D runs"):
        build_datamodule(cfg)


def test_a_nifti_teacher_is_scored_on_exactly_the_students_test_slices(tmp_path, tiny_teacher, monkeypatch):
    """teacher_slices on NIfTI data: the teacher's whole-volume prediction is cut and preprocessed like
    the student's test samples (single-slice files of `slices`, and every axial slice). A teacher that
    predicted the ground truth scores Dice 1 on every organ; one shifted by a voxel does not."""
    import nibabel as nib

    import lightning_distill.inference as inference
    from lightning_distill.config import load_config
    from lightning_distill.lab.teacher_slices import score_teacher_on_student_slices

    vols = _phantom_nifti_teacher(tmp_path, tiny_teacher, 6)
    names = PHANTOM_NAMES
    ckpt = str(tmp_path / "t" / "checkpoints" / "last.ckpt")
    splits = "data.splits={train: [phantom1_0000, phantom1_0001], val: [phantom1_0002], test: [phantom1_0003, phantom1_0005]}"
    student = load_config(os.path.join(REPO, "experiments/student.yaml"),
                          ["data.source=nifti", f"data.nifti.root={tmp_path / 'sl'}", "data.nifti.orientation=LAS", names,
                           "data.shape=[24,20]", splits])
    allslices = load_config(os.path.join(REPO, "experiments/student.yaml"),
                            ["data.source=nifti", f"data.nifti.root={vols}", "data.nifti.slice_mode=all",
                             "data.nifti.orientation=LAS", names, "data.shape=[24,20]", splits])
    real = score_teacher_on_student_slices(ckpt, student)  # the trained (tiny) teacher runs end to end
    assert real["test_ids"] == ["phantom1_0003", "phantom1_0005"] and 0.0 <= real["test"]["dice_mean"] <= 1.0

    truth = {}
    for f in sorted((vols / "imagesTr").iterdir()):
        case = f.name.replace("_0000.nii.gz", "")
        truth[np.asarray(nib.load(str(f)).dataobj, np.float32).tobytes()] = np.asarray(
            nib.load(str(vols / "labelsTr" / f"{case}.nii.gz")).dataobj).astype(np.uint8)
    shift = {"by": 0}

    def oracle(net, cfg, data, affine, observe=None):
        return np.roll(truth[np.asarray(data, np.float32).tobytes()], shift["by"], axis=0)

    monkeypatch.setattr(inference, "predict_array", oracle)
    for cfg, n in ((student, 2), (allslices, 2 * 16)):
        res = score_teacher_on_student_slices(ckpt, cfg)
        assert res["test"]["num_cases"] == n
        present = {o: d for o, d in res["test"]["dice"].items() if d == d}  # organs in some test sample
        assert {"liver", "left_kidney"} <= set(present) and all(d > 0.999 for d in present.values()), present
    shift["by"] = 3
    assert score_teacher_on_student_slices(ckpt, student)["test"]["dice_mean"] < 0.95
