"""Large NIfTI datasets (issue 19): lazy opening (headers at start, a case read when first used, nothing
kept in memory) and the persistent cache of preprocessed cases."""

import os

import numpy as np
import pytest
import torch

import lightning_distill.data.sources as sources_mod
from lightning_distill.cli import main
from lightning_distill.data.nifti import DataError
from lightning_distill.data.preprocess import Preprocess

from conftest import REPO
from test_nifti import BAD, EXPECT, make_nnunet, source


def _counting(monkeypatch):
    """Count full reads of cases (read_case, as the sources call it) in this process."""
    import lightning_distill.data.sources as sources

    reads = []
    real = sources.read_case

    def counted(case, *a, **k):
        reads.append(case.case_id)
        return real(case, *a, **k)

    monkeypatch.setattr(sources, "read_case", counted)
    return reads


def test_lazy_source_reads_nothing_at_start_and_equals_eager(tmp_path, monkeypatch):
    root = make_nnunet(tmp_path / "nn", n=5)
    reads = _counting(monkeypatch)
    lazy = source(root, open_mode="lazy")
    assert reads == [] and lazy.ids == ["case0", "case1", "case2", "case3", "case4"]
    eager = source(root)
    assert len(reads) == 5
    for i in lazy.ids:
        a, b = lazy.load(i), eager.load(i)
        assert np.array_equal(a["image"], b["image"]) and np.array_equal(a["label"], b["label"])
    lazy.load("case0")
    assert reads.count("case0") == 3  # eager once, lazy twice: a lazy source keeps nothing in memory
    # every axial slice as a sample: the depth comes from the header (after reorientation)
    sl = source(root, dims=2, slice_mode="all", open_mode="lazy",
                preprocess=Preprocess(orientation="RAS", modality="none", shape=[16, 14, 1]))
    assert sl.ids == source(root, dims=2, slice_mode="all",
                            preprocess=Preprocess(orientation="RAS", modality="none", shape=[16, 14, 1])).ids


AT_START = {"truncated", "shape mismatch", "affine mismatch", "ndim"}  # visible in the headers (this truncation cuts the header)


@pytest.mark.parametrize("kind", list(BAD))
def test_every_bad_case_is_named_at_start_or_when_first_read(tmp_path, kind):
    root = make_nnunet(tmp_path / "nn")
    BAD[kind](root)
    if kind in AT_START:
        with pytest.raises(DataError, match=EXPECT[kind]):
            source(root, open_mode="lazy")
        return
    src = source(root, open_mode="lazy")  # the headers are fine
    src.load("case0")
    with pytest.raises(DataError, match=EXPECT[kind]):
        src.load("case1")


def test_lazy_refuses_skipping_bad_cases_it_has_not_read(tmp_path):
    root = make_nnunet(tmp_path / "nn")
    with pytest.raises(ValueError, match="check-data"):
        source(root, open_mode="lazy", on_bad_case="skip")


def test_the_disk_cache_serves_the_same_arrays_and_follows_file_changes(tmp_path, monkeypatch):
    root = make_nnunet(tmp_path / "nn", n=3)
    cache = tmp_path / "cache"
    first = source(root, open_mode="lazy", cache_dir=str(cache))
    ref = {i: first.load(i) for i in first.ids}
    assert len(list(cache.glob("*.npz"))) == 3 and first.disk.misses == 3
    reads = _counting(monkeypatch)
    again = source(root, open_mode="lazy", cache_dir=str(cache))
    for i in again.ids:
        got = again.load(i)
        assert np.array_equal(got["image"], ref[i]["image"]) and np.array_equal(got["label"], ref[i]["label"])
        assert np.allclose(got["spacing"], ref[i]["spacing"])
    assert reads == [] and again.disk.hits == 3
    assert again.mapping.voxels == first.mapping.voxels  # the label map's counts as if the files were read
    # another preprocessing, or a changed file: another key, read again
    other = source(root, open_mode="lazy", cache_dir=str(cache), preprocess=Preprocess(orientation="LPS", modality="none"))
    other.load("case0")
    assert reads == ["case0"]
    f = root / "imagesTr" / "case1_0000.nii.gz"
    os.utime(f, ns=(f.stat().st_atime_ns, f.stat().st_mtime_ns + 10**9))
    again.load("case1")
    assert reads == ["case0", "case1"]


def test_two_hundred_volumes_start_training_without_reading_every_case(tmp_path, tiny_teacher, monkeypatch):
    vols = tmp_path / "vols"
    teacher = os.path.join(REPO, "experiments/teacher.yaml")
    assert main(["phantom", teacher, str(vols), "data.num_subjects=200", "data.shape=[16,16,8]"]) == 0
    reads = _counting(monkeypatch)
    first_batch = {}
    real_getitem = sources_mod.NiftiSource.load

    def load(self, sid):
        first_batch.setdefault("reads", len(reads))
        return real_getitem(self, sid)

    monkeypatch.setattr(sources_mod.NiftiSource, "load", load)
    names = "classes=[background,body_wall,muscle,liver,spleen,right_kidney,left_kidney,aorta,vertebra]"
    over = [o for o in tiny_teacher if not o.startswith(("data.num_subjects", "data.shape"))]
    assert main(["fit", teacher, f"output_dir={tmp_path / 't'}", *over, "data.shape=[16,16,8]", "data.source=nifti",
                 f"data.nifti.root={vols}", "data.nifti.orientation=LAS", "data.nifti.open=lazy",
                 f"data.nifti.cache_dir={tmp_path / 'cache'}", names, "trainer.max_steps=2",
                 "data.val_subjects=2", "data.test_subjects=2"]) == 0
    assert first_batch["reads"] == 0  # nothing was read before the first sample was asked for
    assert 0 < len(set(reads)) < 100, len(set(reads))  # what training, the fingerprint, validation and test touched
    assert torch.load(tmp_path / "t" / "checkpoints" / "last.ckpt", weights_only=False)["lightning_distill"]["intensity"]["raw"] is not None


def test_check_data_reports_every_bad_case_and_the_good_ones(tmp_path, capsys):
    root = make_nnunet(tmp_path / "nn", n=5)
    BAD["nan"](root)  # case1
    lab = root / "labelsTr" / "case3.nii.gz"
    lab.write_bytes(lab.read_bytes()[:len(lab.read_bytes()) // 2])  # a cut gzip stream
    before = {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}
    args = ["check-data", os.path.join(REPO, "experiments/teacher.yaml"), "data.source=nifti", f"data.nifti.root={root}",
            "classes=[background,liver,spleen]", "data.nifti.modality=none", "data.nifti.unmapped=ignore",
            "data.shape=[16,14,6]", "--out", str(tmp_path / "rep")]
    assert main(args + ["--jobs", "2"]) == 1
    out = capsys.readouterr().out
    assert "5 cases, 3 good, 2 bad" in out and "case1_0000.nii.gz: image contains" in out and "case3.nii.gz" in out
    import json

    rep = json.loads((tmp_path / "rep" / "data_check.json").read_text())
    assert rep["good_cases"] == ["case0", "case2", "case4"] and set(rep["bad"]) == {"case1", "case3"}
    assert rep["class_voxels"]["liver"] > 0 and (tmp_path / "rep" / "data_check.md").is_file()
    assert {p: p.read_bytes() for p in root.rglob("*") if p.is_file()} == before
    # the same with one process; a dataset without a bad case passes
    assert main(args[:-2] + ["--out", str(tmp_path / "rep1")]) == 1
    assert json.loads((tmp_path / "rep1" / "data_check.json").read_text())["bad"] == rep["bad"]
    good = make_nnunet(tmp_path / "good", n=3)
    swapped = [f"data.nifti.root={good}" if a.startswith("data.nifti.root=") else a for a in args[:-2]]
    assert main(swapped + ["--out", str(tmp_path / "rep2")]) == 0
