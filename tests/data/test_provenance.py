"""Which subject a sample is across derived datasets, and what a test may call held out (issue 35)."""

import json

import pytest

from lightning_distill.data.provenance import (PROVENANCE_FILE, compare_subjects, read_link, subject_identity,
                                               write_provenance)


def _dataset(root, meta=None):
    root.mkdir(parents=True)
    (root / "dataset.json").write_text(json.dumps(meta or {"labels": {"background": 0}}))
    return root


def test_identity_follows_every_record_back_to_the_first_dataset(tmp_path):
    vols = _dataset(tmp_path / "vols")
    write_provenance(vols, "lightning-distill phantom", {"a": "phantom1_0000", "b": "phantom1_0001"}, phantom=True)
    slices = _dataset(tmp_path / "slices")
    write_provenance(slices, "lightning-distill slices", {"a": "a"}, root=vols)
    again = _dataset(tmp_path / "again")
    write_provenance(again, "lightning-distill slices", {"x": "a"}, root=slices)  # renamed on the way
    assert subject_identity(again, "x") == subject_identity(slices, "a") == subject_identity(vols, "a") == "phantom:phantom1_0000"
    plain = _dataset(tmp_path / "plain")
    assert subject_identity(plain, "a") == f"data:{plain.resolve()}::a"  # no record: a subject of its own dataset
    assert subject_identity(slices, "zzz") == f"data:{slices.resolve()}::zzz"  # a case the record does not list


def test_a_slices_folder_of_an_older_version_links_through_its_dataset_json(tmp_path):
    vols = _dataset(tmp_path / "vols")
    old = _dataset(tmp_path / "old", {"source": str(vols.resolve()), "slices": {"7": 12}})
    assert subject_identity(old, "7") == f"data:{vols.resolve()}::7"
    relative = _dataset(tmp_path / "rel", {"source": "vols", "slices": {"7": 12}})  # relative to an unknown cwd
    assert read_link(relative) is None


def test_a_broken_or_looping_record_is_an_error_that_names_the_file(tmp_path):
    bad = _dataset(tmp_path / "bad")
    (bad / PROVENANCE_FILE).write_text("{not json")
    with pytest.raises(ValueError, match=f"{bad / PROVENANCE_FILE}: not a provenance record"):
        subject_identity(bad, "a")
    a, b = _dataset(tmp_path / "a"), _dataset(tmp_path / "b")
    write_provenance(a, "test", {"c": "c"}, root=b)
    write_provenance(b, "test", {"c": "c"}, root=a)
    with pytest.raises(ValueError, match="form a loop"):
        subject_identity(a, "c")
    with pytest.raises(ValueError, match="not both"):
        write_provenance(a, "test", {}, root=b, phantom=True)


def test_held_out_only_when_certain():
    trained = ["phantom:phantom2_0001", "phantom:phantom2_0002", "data:/d/vols::p3"]
    exact = compare_subjects(["phantom:phantom2_0002", "phantom:phantom2_0009"], trained)
    assert exact.count == 1 and exact.why == "1 of the 2 subjects are training subjects of this checkpoint"
    none = compare_subjects(["phantom:phantom9_0001", "data:/d/vols::p4"], trained)  # datasets the training came from
    assert none.count == 0 and none.why == "none of a training subject of this checkpoint"
    other = compare_subjects(["data:/elsewhere::p3", "data:/elsewhere::p8"], trained)  # no record links /elsewhere
    assert other.count is None
    assert other.why.startswith("unknown how many are of training subjects: 2 of the 2 tested subjects are of "
                                "data:/elsewhere, which no record links to the training data")
    assert "1 of their case ids are training case ids (p3)" in other.why
    mixed = compare_subjects(["phantom:phantom2_0001", "data:/elsewhere::q"], trained)
    assert mixed.count is None and "1 tested subjects are training subjects for certain" in mixed.why
