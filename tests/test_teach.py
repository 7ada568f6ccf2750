"""`lightning-distill teach`: a trained 3D (or 2D) model's per-pixel knowledge written as 2D training slices
in the student's preprocessing; class maps; levels; resume; processes; whole-or-nothing output."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from lightning_distill.cli import main
from lightning_distill.config import ConfigError, load_config, load_teach_config
from lightning_distill.data.nifti import DataError
from lightning_distill.data.phantom import CLASS_NAMES, PhantomSpec, hu_window, render_volume
from lightning_distill.data.transfer import TeacherSlices
from lightning_distill.teach import choose_planes, run_teach, teach
from lightning_distill.teacher_model import ClassMap, load_model

from conftest import REPO, TINY_STUDENT

NAMES = list(CLASS_NAMES)
K = len(NAMES)
PHANTOM = ["data.source=phantom", "data.num_subjects=4", "data.shape=[32,32,16]"]
IDS = [f"phantom1_{i:04d}" for i in range(4)]
# the population teach renders by default (TeachDataSpec.phantom: seed 1, noise 10-35 HU, every phase)
SPEC = PhantomSpec(seed=1, phases=("noncontrast", "arterial", "venous"), noise_hu=(10.0, 35.0))
# a float16 value is its float32 value rounded to nearest: relative error at most 2^-11 (10 stored mantissa bits)
F16 = 2.0 ** -11


# ----------------------------------------------------------------------------------------- fixtures, helpers
@pytest.fixture(scope="module")
def setup(teacher_bank, tmp_path_factory):
    """The tiny 3D teacher's checkpoint (32 x 32 x 16 volumes) and a student config of its in-plane grid."""
    root = tmp_path_factory.mktemp("teach")
    ckpt = next((teacher_bank / "checkpoints").glob("best*.ckpt"), None) or teacher_bank / "checkpoints" / "last.ckpt"
    student = root / "student.yaml"
    student.write_text(f"extends: {os.path.join(REPO, 'experiments', 'student.yaml')}\ndata:\n  shape: [32, 32]\n")
    return root, ckpt, student


def _cfg(setup, out, *extra):
    _, ckpt, student = setup
    return load_teach_config(None, ["model.format=checkpoint", f"model.path={ckpt}", f"student={student}", *PHANTOM,
                                    "inference.device=cpu", f"output={out}", *extra])


@pytest.fixture(scope="module")
def reference(setup):
    """One uninterrupted run of the 3D teacher over the 4 phantom volumes (5 of 16 planes each)."""
    out = setup[0] / "reference"
    meta = teach(_cfg(setup, out))
    return out, meta


def _arrays(folder):
    """``{volume id: {name: array}}`` of a teach folder (or its ``.partial``)."""
    out = {}
    for p in sorted((folder / "volumes").glob("*.npz")):
        with np.load(p) as a:
            out[p.stem] = {k: a[k] for k in a.files}
    return out


def _assert_same_files(a, b):
    """Bit for bit the same volumes and arrays (only for the very same computation run twice)."""
    aa, bb = _arrays(a), _arrays(b)
    assert sorted(aa) == sorted(bb)
    for vid in aa:
        assert sorted(aa[vid]) == sorted(bb[vid]), vid
        for k in aa[vid]:
            assert np.array_equal(aa[vid][k], bb[vid][k]), f"{vid} {k}"
    ma, mb = (json.loads((f / "dataset.json").read_text()) for f in (a, b))
    for m in (ma, mb):
        for k in ("seconds", "config", "processes"):
            m.pop(k)
    assert ma == mb


def _kwargs(d):
    return "{" + ", ".join(f"{k}: {json.dumps(v)}" for k, v in d.items()) + "}"


# ----------------------------------------------------------------------------------------- what is written
def test_slices_are_the_students_preprocessing_of_the_volumes_planes(setup, reference):
    out, meta = reference
    window = tuple(load_config(setup[2]).data.window)  # the student's HU window
    assert meta["labelled_by"] == "3D model" and meta["num_volumes"] == 4 and meta["num_slices"] == 20
    assert meta["classes"] == NAMES and meta["model"]["sha256"] and meta["student"]["data.shape"] == [32, 32]
    arrays = _arrays(out)
    assert sorted(arrays) == IDS and sorted(meta["volumes"]) == IDS
    for i, vid in enumerate(IDS):
        a = arrays[vid]
        v = render_volume(SPEC, i, (32, 32, 16))
        assert meta["volumes"][vid]["planes"] == a["plane"].tolist() and meta["volumes"][vid]["labelled"]
        assert meta["volumes"][vid]["attributes"] == {"phase": v["phase"]}
        assert a["image"].dtype == np.float32 and a["image"].shape == (5, 1, 32, 32)
        assert len(set(a["plane"].tolist())) == 5 and int(a["depth"]) == 16
        np.testing.assert_array_equal(a["level"], a["plane"] / 15)
        for j, z in enumerate(a["plane"]):
            expected = hu_window(v["image"][..., z], *window)  # the student's loader: window of the HU plane
            assert np.abs(a["image"][j, 0] - expected).max() <= 1e-6, (vid, z)
            np.testing.assert_array_equal(a["label"][j], v["label"][..., z])  # nearest: the labels themselves
            np.testing.assert_allclose(a["spacing"][j], [400 / 32, 400 / 32])  # the phantom's 400 mm extent


def test_probabilities_are_the_models_softmax_and_sum_to_one(setup, reference):
    out, _ = reference
    cfg = _cfg(setup, out)
    net = load_model(cfg.model, dims=(3,)).net.eval()
    for i, (vid, a) in enumerate(_arrays(out).items()):
        prob, conf = a["prob"], a["confidence"]
        assert prob.dtype == np.float16 and prob.shape == (5, K, 32, 32)
        assert conf.dtype == np.float16 and conf.shape == (5, 32, 32)
        # each of the K stored values is its float32 value (the channels sum to 1 to float32 rounding, ~1e-7)
        # rounded to float16, an error of at most 2^-11 of itself (subnormals below 2^-14: at most 2^-25
        # each): summed in float64 the errors add up to at most 2^-11 * 1 + K * 2^-25 (measured: 3e-4)
        sums = prob.astype(np.float64).sum(1)
        assert np.abs(sums - 1).max() <= F16 + K * 2.0 ** -25 + 1e-6
        assert prob.min() >= 0 and conf.min() >= 0 and conf.max() <= 1
        # the very values: the checkpoint's preprocessing (the phantom's window, LAS, its own grid: the volume's)
        # and one forward of the whole volume; another path to the same float32 numbers, stored as float16
        v = render_volume(SPEC, i, (32, 32, 16))
        with torch.no_grad():
            p = torch.softmax(net(torch.from_numpy(hu_window(v["image"]))[None, None]), dim=1)[0].numpy()
        for j, z in enumerate(a["plane"]):
            np.testing.assert_allclose(prob[j].astype(np.float32), p[..., z], rtol=0, atol=1e-3)
            # tau 1, every channel a class: the confidence is the highest probability
            np.testing.assert_allclose(conf[j].astype(np.float32), p[..., z].max(0), rtol=0, atol=1e-3)


SEG = {"spatial_dims": 3, "in_channels": 1, "out_channels": K + 2, "init_filters": 8, "blocks_down": [1, 1],
       "blocks_up": [1]}
SEG_LABELS = NAMES + ["liver_tumour", "lung"]


@pytest.fixture(scope="module")
def segresnet(setup):
    """A MONAI SegResNet (random weights) with two channels more than the classes, saved as a state_dict."""
    from monai.networks.nets import SegResNet

    torch.manual_seed(0)
    net = SegResNet(**SEG).eval()
    path = setup[0] / "segresnet.pt"
    torch.save(net.state_dict(), path)
    return path, net


def _monai_cfg(setup, segresnet, out, *extra):
    return load_teach_config(None, [
        "model.format=monai", f"model.path={segresnet[0]}", "model.name=SegResNet", f"model.kwargs={_kwargs(SEG)}",
        f"model.labels=[{','.join(SEG_LABELS)}]", f"student={setup[2]}", *PHANTOM, "data.num_subjects=2",
        "data.preprocess.orientation=LAS", "inference.roi_size=null", "inference.device=cpu", f"output={out}", *extra])


def test_class_map_merges_and_ignores_as_in_bank_build(setup, segresnet, tmp_path):
    """liver_tumour merged into liver, lung ignored, at tau 2: the stored probabilities are the renormalised
    mapped softmax at tau 2; the confidence the highest mapped one at tau 1, before renormalising."""
    out = tmp_path / "monai"
    meta = teach(_monai_cfg(setup, segresnet, out, "class_map={liver_tumour: liver, lung: ignore}", "tau=2.0"))
    assert meta["class_map"]["liver_tumour"] == "liver" and meta["class_map"]["lung"] == "ignore"
    assert meta["model_labels"] == SEG_LABELS and meta["tau"] == 2.0 and meta["labelled_by"] == "3D model"
    liver, tumour = NAMES.index("liver"), K  # lung (channel K + 1) is left out
    for i, (vid, a) in enumerate(_arrays(out).items()):
        x = torch.from_numpy(hu_window(render_volume(SPEC, i, (32, 32, 16))["image"]))[None, None]
        with torch.no_grad():
            logits = segresnet[1](x)[0]  # (K + 2, X, Y, Z); model preprocessing: LAS (the volume's), CT window
        # by hand, without ClassMap
        p2 = torch.softmax(logits / 2.0, dim=0)
        merged = p2[:K].clone()
        merged[liver] += p2[tumour]
        expected = (merged / merged.sum(0, keepdim=True)).numpy()
        p1 = torch.softmax(logits, dim=0)
        m1 = p1[:K].clone()
        m1[liver] += p1[tumour]
        conf = m1.max(0).values.numpy()
        cm = ClassMap(SEG_LABELS, NAMES, {"liver_tumour": "liver", "lung": "ignore"})  # what bank build maps by
        assert torch.allclose(cm.probabilities(logits[None], 2.0)[1][0], torch.from_numpy(expected), atol=1e-6)
        naive = (p2[:K] / p2[:K].sum(0, keepdim=True)).numpy()  # liver_tumour not merged: measurably different
        for j, z in enumerate(a["plane"]):
            # float32 numbers by another path (~1e-6) stored as float16 (<= 2^-11 of a value in [0, 1])
            np.testing.assert_allclose(a["prob"][j].astype(np.float32), expected[..., z], rtol=0, atol=1e-3)
            np.testing.assert_allclose(a["confidence"][j].astype(np.float32), conf[..., z], rtol=0, atol=1e-3)
            assert np.abs(a["prob"][j, liver].astype(np.float32) - naive[liver, ..., z]).max() > 1e-2
            # lung's mass is left out of the confidence: below the highest renormalised probability at tau 1
            assert (conf[..., z] < (m1 / m1.sum(0, keepdim=True)).max(0).values.numpy()[..., z]).all()


def test_an_extra_channel_sent_to_background_adds_to_background(setup, segresnet, tmp_path):
    """The structural effect without by-hand numbers: lung ignored vs lung added to background."""
    teach(_monai_cfg(setup, segresnet, tmp_path / "ign", "class_map={liver_tumour: liver, lung: ignore}"))
    bg = teach(_monai_cfg(setup, segresnet, tmp_path / "bg", "class_map={liver_tumour: liver, lung: background}"))
    assert bg["class_map"]["lung"] == "background"
    a, b = _arrays(tmp_path / "ign"), _arrays(tmp_path / "bg")
    for vid in a:
        np.testing.assert_array_equal(a[vid]["plane"], b[vid]["plane"])
        pa, pb = a[vid]["prob"].astype(np.float32), b[vid]["prob"].astype(np.float32)
        assert (pb[:, 0] >= pa[:, 0] - F16).all() and (pb[:, 0] - pa[:, 0]).mean() > 0.01  # background gains mass
        assert (pb[:, 1:] <= pa[:, 1:] + F16).all()  # every other class loses some
        # lung's mass counts for background in the confidence, so it can only grow
        assert (b[vid]["confidence"].astype(np.float32) >= a[vid]["confidence"].astype(np.float32) - F16).all()


# ----------------------------------------------------------------------------------------- resume, processes
def test_stopped_and_resumed_equals_uninterrupted_and_refuses_another_config(setup, reference, tmp_path, capsys):
    out = tmp_path / "resumed"
    partial = tmp_path / "resumed.partial"
    assert teach(_cfg(setup, out), stop_after=2) is None
    assert not out.exists() and sorted(p.stem for p in (partial / "volumes").glob("*.npz")) == IDS[:2]
    assert not list((partial / "volumes").glob("*.tmp*"))  # each file written atomically
    with pytest.raises(ValueError, match="another config"):
        teach(_cfg(setup, out, "tau=2.0"))
    assert sorted(p.stem for p in (partial / "volumes").glob("*.npz")) == IDS[:2]  # the refused run touched nothing
    stale = partial / "volumes" / f".{IDS[2]}.npz.k1ll3d.npz"  # what a write killed before its rename leaves
    stale.write_bytes(b"half a file")
    capsys.readouterr()
    meta = teach(_cfg(setup, out))
    assert "resuming: 2 of 4 volumes done" in capsys.readouterr().out
    assert meta["num_volumes"] == 4 and not partial.exists()
    assert not [p.name for p in (out / "volumes").iterdir() if p.name.startswith(".")]  # not carried into the output
    # the same computation on the same machine in the same process (same thread count): bit for bit
    _assert_same_files(reference[0], out)


def test_two_processes_write_what_one_does(setup, reference, tmp_path):
    out = tmp_path / "two"
    meta = run_teach(_cfg(setup, out, "processes=2"))
    assert meta["processes"] == 2 and not (tmp_path / "two.partial").exists()
    assert meta["volumes"] == reference[1]["volumes"]  # the same planes of the same volumes, same attributes
    one, two = _arrays(reference[0]), _arrays(out)
    assert sorted(one) == sorted(two) == IDS
    for vid in IDS:
        for k in ("plane", "level", "image", "label", "spacing", "depth"):
            # no model in these: the windowing and labels of the same render, elementwise, in any process
            np.testing.assert_array_equal(one[vid][k], two[vid][k], err_msg=f"{vid} {k}")
        for k in ("prob", "confidence"):
            # the workers run the network with 1 thread each (the test process with 2): BLAS sums in another
            # order, float32 results differ in their last bits (~1e-6 through the layers), and a value so close
            # to a float16 rounding boundary can round to the neighbouring float16: one float16 step, at most
            # 2^-11 for values below 1. atol 1e-3 bounds both.
            np.testing.assert_allclose(one[vid][k].astype(np.float32), two[vid][k].astype(np.float32), rtol=0,
                                       atol=1e-3, err_msg=f"{vid} {k}")


@pytest.mark.slow
def test_a_killed_command_resumes_where_it_stopped(setup, tmp_path):
    """SIGKILL of the real command once 2 volumes are written; the second run writes only the rest."""
    _, ckpt, student = setup
    extra = [f"model.path={ckpt}", f"student={student}", "data.num_subjects=10", "inference.device=cpu"]
    args = [sys.executable, "-m", "lightning_distill.cli", "teach", "model.format=checkpoint", "data.source=phantom",
            "data.shape=[32,32,16]", *extra]
    out = tmp_path / "k"
    vols = tmp_path / "k.partial" / "volumes"
    # the command runs the very computation of this process (same thread count: BLAS splits its sums by
    # threads), so the resumed folder is compared bit for bit with an uninterrupted run here
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    proc = subprocess.Popen(args + [f"output={out}"], cwd=REPO, env=env, stdout=subprocess.DEVNULL)
    deadline = time.time() + 600
    while proc.poll() is None and time.time() < deadline:
        if vols.is_dir() and len(_written(vols)) >= 2:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)
    proc.kill()
    proc.wait()
    assert not out.exists(), "the command finished before it was killed"
    done = len(_written(vols))
    assert 2 <= done < 10
    r = subprocess.run(args + [f"output={out}"], cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr
    assert f"resuming: {done} of 10 volumes done" in r.stdout and f"wrote {out}" in r.stdout
    ref = tmp_path / "ref"
    teach(load_teach_config(None, ["model.format=checkpoint", "data.source=phantom", "data.shape=[32,32,16]", *extra,
                                   f"output={ref}"]))
    _assert_same_files(ref, out)
    assert not [p.name for p in (out / "volumes").iterdir() if p.name.startswith(".")]  # the killed write's temp file is gone


def _written(vols):
    """The volumes written whole (an atomic write's temporary file is hidden: ``.<name>.npz.XXXX.npz``)."""
    return [p for p in vols.glob("*.npz") if not p.name.startswith(".")]


@pytest.mark.slow
def test_torchrun_with_two_processes_writes_what_one_does(setup, reference, tmp_path):
    _, ckpt, student = setup
    out = tmp_path / "tr"
    args = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
            "-m", "lightning_distill.cli", "teach", "model.format=checkpoint", f"model.path={ckpt}",
            f"student={student}",
            *PHANTOM, "inference.device=cpu", f"output={out}"]
    r = subprocess.run(args, cwd=REPO, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("wrote ") == 1
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["processes"] == 2 and meta["volumes"] == reference[1]["volumes"]
    one, two = _arrays(reference[0]), _arrays(out)
    for vid in IDS:
        np.testing.assert_array_equal(one[vid]["image"], two[vid]["image"])
        # another thread count: float32 rounding, then float16 storage (see test_two_processes_write_what_one_does)
        np.testing.assert_allclose(one[vid]["prob"].astype(np.float32), two[vid]["prob"].astype(np.float32), atol=1e-3)


# ----------------------------------------------------------------------------------------- bad input
def test_classes_that_do_not_map_are_refused_before_any_work(setup, segresnet, tmp_path):
    out = tmp_path / "x"
    with pytest.raises(ValueError, match=r"model labels \['liver_tumour', 'lung'\] map to no bank class"):
        teach(_monai_cfg(setup, segresnet, out, "unmapped=error"))
    with pytest.raises(ValueError, match="class_map names model label 'lungs', which the model does not have"):
        teach(_monai_cfg(setup, segresnet, out, "class_map={lungs: ignore}", "unmapped=ignore"))
    assert not out.exists() and not (tmp_path / "x.partial").exists()
    # found when the model first runs (it is not known before): named, and no output
    with pytest.raises(ValueError, match="predicts 11 channels, model.labels names 10"):
        teach(_monai_cfg(setup, segresnet, out, f"model.labels=[{','.join(SEG_LABELS[:-1])}]", "unmapped=ignore"))
    assert not out.exists()


def test_an_unreadable_volume_names_its_file_and_the_fixed_folder_resumes(setup, reference, tmp_path, capsys):
    """A truncated .nii.gz: DataError naming it, no output; the volumes before it are kept, and once the file is
    whole again the same command finishes. The NIfTI path makes the slices of the phantom path."""
    ph = tmp_path / "ph"
    assert main(["phantom", os.path.join(REPO, "experiments/teacher.yaml"), str(ph), "data.num_subjects=3",
                 "data.shape=[32,32,16]"]) == 0
    bad = ph / "imagesTr" / "phantom1_0001_0000.nii.gz"
    whole = bad.read_bytes()
    bad.write_bytes(whole[: len(whole) // 2])
    out = tmp_path / "nii"
    _, ckpt, student = setup
    cfg = load_teach_config(None, ["model.format=checkpoint", f"model.path={ckpt}", f"student={student}",
                                   f"data.root={ph}", "inference.device=cpu", f"output={out}"])
    with pytest.raises(DataError, match="phantom1_0001_0000.nii.gz: cannot read image as NIfTI"):
        teach(cfg)
    assert not out.exists()
    assert sorted(p.name for p in (tmp_path / "nii.partial" / "volumes").iterdir()) == ["phantom1_0000.npz"]
    bad.write_bytes(whole)
    capsys.readouterr()
    meta = teach(cfg)
    assert "resuming: 1 of 3 volumes done" in capsys.readouterr().out
    assert meta["num_volumes"] == 3 and meta["data"]["source"] == "nifti"
    # the export stores HU rounded to int16; otherwise the same volumes, affine (LAS) and spacing
    ref, nii = _arrays(reference[0]), _arrays(out)
    for i, vid in enumerate(IDS[:3]):
        hu = np.round(render_volume(SPEC, i, (32, 32, 16))["image"])
        for k in ("plane", "level", "label", "spacing"):
            np.testing.assert_array_equal(ref[vid][k], nii[vid][k])
        for j, z in enumerate(nii[vid]["plane"]):
            assert np.abs(nii[vid]["image"][j, 0] - hu_window(hu[..., z])).max() <= 1e-6
        assert meta["volumes"][vid]["labelled"] and meta["volumes"][vid]["attributes"] == {}


def test_an_empty_level_range_is_refused_naming_the_key(setup, tmp_path):
    out = tmp_path / "lv"
    # 16 planes at levels k / 15: none at 0.5 (7.5 / 15)
    with pytest.raises(ValueError, match=r"levels range \[0.5, 0.5\] holds no plane .*16 axial planes.*levels.range"):
        teach(_cfg(setup, out, "levels.range=[0.5,0.5]"))
    assert not out.exists()
    with pytest.raises(ValueError, match=r"levels.range must be \[lo, hi\] with 0 <= lo <= hi <= 1"):
        teach(_cfg(setup, tmp_path / "lv2", "levels.range=[0.6,0.4]"))
    assert not (tmp_path / "lv2").exists() and not (tmp_path / "lv2.partial").exists()


@pytest.mark.parametrize("wrong, right, message", [
    (["levels.range=[0.5,0.5]"], ["levels.range=[0.4,0.6]"], r"holds no plane .*levels.range"),
    ([f"model.labels=[{','.join(SEG_LABELS[:-1])}]"], [], "predicts 11 channels, model.labels names 10"),
], ids=["empty-level-range", "labels-of-the-wrong-length"])
def test_after_a_config_error_in_the_first_volume_the_corrected_config_runs(setup, segresnet, tmp_path, wrong, right,
                                                                            message):
    out = tmp_path / "x"
    with pytest.raises(ValueError, match=message):
        teach(_monai_cfg(setup, segresnet, out, "unmapped=ignore", *wrong))
    assert not out.exists()
    meta = teach(_monai_cfg(setup, segresnet, out, "unmapped=ignore", *right))  # corrected as the error message asks
    assert meta["num_volumes"] == 2 and not (tmp_path / "x.partial").exists()


def test_an_existing_output_is_kept_unless_overwrite(setup, tmp_path):
    out = tmp_path / "exists"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    for run in (teach, run_teach):
        with pytest.raises(FileExistsError, match="overwrite=true"):
            run(_cfg(setup, out, "data.num_subjects=1"))
    with pytest.raises(FileExistsError, match="overwrite=true"):
        run_teach(_cfg(setup, out, "data.num_subjects=1", "processes=2"))
    assert (out / "mine.txt").read_text() == "keep" and not (tmp_path / "exists.partial").exists()
    meta = teach(_cfg(setup, out, "data.num_subjects=1", "levels.per_volume=1", "overwrite=true"))
    assert meta["num_slices"] == 1 and not (out / "mine.txt").exists() and (out / "dataset.json").is_file()
    assert not (tmp_path / "exists.old").exists()


def test_unknown_keys_and_bad_choices_are_refused_with_the_valid_ones():
    with pytest.raises(ConfigError, match=r"unknown config key 'levels.ranges'.*Did you mean 'levels.range'.*"
                                          r"Valid keys under 'levels': levels.mode, levels.range, levels.match, "
                                          r"levels.per_volume, levels.seed"):
        load_teach_config(None, ["levels.ranges=[0,1]"])
    with pytest.raises(ConfigError, match="unknown config key 'tua'.*Did you mean 'tau'"):
        load_teach_config(None, ["tua=2"])
    with pytest.raises(ConfigError, match=r"levels.mode='student' is not one of \['range', 'match'\]"):
        load_teach_config(None, ["levels.mode=student"])
    with pytest.raises(ConfigError, match="model.format='onnx' is not one of"):
        load_teach_config(None, ["model.format=onnx"])
    cfg = load_teach_config(os.path.join(REPO, "experiments/teach.yaml"))  # the example is valid
    assert cfg.levels.mode == "match" and cfg.data.source == "phantom"


def test_other_config_errors_name_the_key(setup, tmp_path):
    out = tmp_path / "x"
    with pytest.raises(ValueError, match="student is not set"):
        teach(_cfg(setup, out, "student=null"))
    with pytest.raises(ValueError, match="tau must be positive"):
        teach(_cfg(setup, out, "tau=0"))
    with pytest.raises(ValueError, match="levels.per_volume must be at least 1"):
        teach(_cfg(setup, out, "levels.per_volume=0"))
    with pytest.raises(ValueError, match="differ from the student's"):
        teach(_cfg(setup, out, "classes=[background,liver]"))
    with pytest.raises(ValueError, match="data.shape must be a volume grid"):
        teach(_cfg(setup, out, "data.shape=[32,32]"))
    assert not out.exists() and not (tmp_path / "x.partial").exists()


# ----------------------------------------------------------------------------------------- the 2D control
@pytest.fixture(scope="module")
def model_2d(tmp_path_factory):
    """A 2D teacher (experiments/teacher2d.yaml) of the student's 32 x 32 grid, trained for 2 steps."""
    out = tmp_path_factory.mktemp("teacher2d")
    small = [o for o in TINY_STUDENT if not o.startswith(("data.shape", "trainer.max_steps", "data.num_subjects",
                                                            "data.val_subjects", "data.test_subjects"))]
    assert main(["fit", os.path.join(REPO, "experiments/teacher2d.yaml"), f"output_dir={out}", *small,
                 "data.shape=[32,32]", "data.num_subjects=8", "data.val_subjects=2", "data.test_subjects=2",
                 "trainer.max_steps=2", "trainer.val_check_interval=1.0"]) == 0
    return next((out / "checkpoints").glob("best*.ckpt"), None) or out / "checkpoints" / "last.ckpt"


@pytest.mark.slow  # a 2D fit (~15 s) and 20 forwards of a ResNet-18 U-Net (seconds; ~20 s when the cores are busy)
def test_a_2d_model_labels_the_same_planes_one_by_one(setup, reference, model_2d, tmp_path):
    out = tmp_path / "t2d"
    cfg = _cfg(setup, out, f"model.path={model_2d}")
    meta = teach(cfg)
    assert meta["labelled_by"] == "2D model" and meta["volumes"] == reference[1]["volumes"]
    net = load_model(cfg.model, dims=(2,)).net.eval()
    ref, two = _arrays(reference[0]), _arrays(out)
    for vid in IDS:
        for k in ("plane", "image", "label"):  # the same slices: only the teacher differs
            np.testing.assert_array_equal(ref[vid][k], two[vid][k])
        # each plane alone through the 2D model (its preprocessing is the student's: the same image)
        with torch.no_grad():
            p = torch.softmax(net(torch.from_numpy(two[vid]["image"])), dim=1).numpy()
        np.testing.assert_allclose(two[vid]["prob"].astype(np.float32), p, rtol=0, atol=1e-3)  # float16 storage
        assert np.abs(two[vid]["prob"].astype(np.float64).sum(1) - 1).max() <= F16 + K * 2.0 ** -25 + 1e-6
        assert not np.allclose(two[vid]["prob"], ref[vid]["prob"], atol=1e-2)  # another teacher
    # a 2D model of another grid than the student's is refused, naming both
    with pytest.raises(ValueError, match=r"a 2D model of data.shape \[32, 32\].*data.shape is \[64, 64\]"):
        teach(_cfg(setup, tmp_path / "x", f"model.path={model_2d}",
                   f"student={os.path.join(REPO, 'experiments/student.yaml')}"))
    assert not (tmp_path / "x.partial").exists()


# ----------------------------------------------------------------------------------------- ground truth only
def test_no_model_writes_images_and_labels_only_for_the_union_route(setup, reference, tmp_path, capsys):
    out = tmp_path / "gt"
    assert main(["teach", "model.format=none", f"student={setup[2]}", *PHANTOM, f"output={out}"]) == 0
    printed = capsys.readouterr().out
    assert "20 slices of 4 volumes (4 labelled) labelled by ground truth only (no model)" in printed
    assert f"wrote {out}" in printed
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["model"] is None and meta["labelled_by"] == "none" and meta["tau"] is None
    assert meta["teacher_argmax_pixels"] is None and sum(meta["truth_pixels"].values()) == 20 * 32 * 32
    ref, gt = _arrays(reference[0]), _arrays(out)
    for vid in IDS:
        assert "prob" not in gt[vid] and "confidence" not in gt[vid]
        for k in ("plane", "image", "label"):  # the same slices as with the model
            np.testing.assert_array_equal(ref[vid][k], gt[vid][k])
    with pytest.raises(DataError, match="ground truth only .*transfer.union"):
        TeacherSlices(out, NAMES, need="teacher")
    union = TeacherSlices(out, NAMES, need="truth")
    assert len(union.ids) == 20 and union.ids[0] == f"{IDS[0]}@{int(ref[IDS[0]]['plane'][0])}"
    s = union.load(union.ids[0])
    assert "soft" not in s and s["label"].dtype == np.int64
    np.testing.assert_array_equal(s["label"], ref[IDS[0]]["label"][0])
    # the teacher's folder is read with its probabilities and confidence
    phase = meta["volumes"][IDS[0]]["attributes"]["phase"]
    taught = TeacherSlices(reference[0], NAMES, need="teacher", select={"phase": [phase]})
    s = taught.load(f"{IDS[0]}@{int(ref[IDS[0]]['plane'][0])}")
    assert s["soft"].shape == (K + 1, 32, 32) and s["soft"].dtype == np.float32
    np.testing.assert_array_equal(s["soft"][:K], ref[IDS[0]]["prob"][0].astype(np.float32))


def test_unlabelled_volumes_get_the_teacher_only(setup, tmp_path):
    out = tmp_path / "unl"
    meta = teach(_cfg(setup, out, "data.labels=ignore", "data.num_subjects=2", "levels.per_volume=2"))
    assert all(not v["labelled"] for v in meta["volumes"].values()) and meta["truth_pixels"] is None
    for a in _arrays(out).values():
        assert "label" not in a and a["prob"].shape == (2, K, 32, 32)
    with pytest.raises(DataError, match="no slice left"):
        TeacherSlices(out, NAMES, need="truth")  # the union route needs ground truth
    s = TeacherSlices(out, NAMES, need="teacher")
    assert (s.load(s.ids[0])["label"] == 255).all()  # the transfer route: the teacher only, labels ignored


# ----------------------------------------------------------------------------------------- levels
def test_match_levels_take_the_students_slice_z_range(setup, tmp_path):
    out = tmp_path / "match"
    meta = teach(_cfg(setup, out, "levels.mode=match", "levels.per_volume=3"))
    slice_z = list(load_config(setup[2]).data.phantom.slice_z)  # the student's single slices: z in [-0.6, 0.0]
    lo, hi = ((z + 1) / 2 for z in slice_z)  # normalised z in [-1, 1] -> fraction of the axial axis: [0.2, 0.5]
    assert meta["levels"]["matched"]["range"] == [lo, hi]
    # 16 planes at k / 15: k = 3 ... 7 lie in [0.2, 0.5]; 3 of these 5 per volume
    draws = set()
    for vid, a in _arrays(out).items():
        assert len(a["plane"]) == 3 == len(set(a["plane"].tolist())) == meta["volumes"][vid]["slices"]
        assert ((a["level"] >= lo - 1e-9) & (a["level"] <= hi + 1e-9)).all(), a["level"]
        assert set(a["plane"].tolist()) <= {3, 4, 5, 6, 7}
        draws.add(tuple(a["plane"].tolist()))
    assert len(draws) > 1  # drawn per volume, not one fixed set


def test_choose_planes_is_seeded_by_volume_and_bounded_by_per_volume():
    from omegaconf import OmegaConf

    def lv(**k):
        return OmegaConf.create({"mode": "range", "range": [0.0, 1.0], "match": None, "per_volume": 5, "seed": 0, **k})

    a = choose_planes("v1", 48, lv(), None)
    # the same draw every time (a resumed or sharded run draws the same); distinct and sorted
    assert a == choose_planes("v1", 48, lv(), None) and a == sorted(set(a)) and len(a) == 5
    assert choose_planes("v1", 48, lv(seed=1), None) != a and choose_planes("v2", 48, lv(), None) != a
    assert choose_planes("v1", 48, lv(per_volume=100), None) == list(range(48))  # every plane when fewer
    assert choose_planes("v1", 16, lv(range=[0.2, 0.5], per_volume=100), None) == [3, 4, 5, 6, 7]
    assert choose_planes("v1", 16, lv(range=[0.4, 0.4]), None) == [6]  # 6 / 15 = 0.4: the end points count


def test_nifti_volumes_match_a_slices_folder_and_carry_attributes_from_a_csv(setup, tmp_path):
    """levels.mode=match with a folder of `lightning-distill slices` draws the planes its files came from; the
    attributes of a CSV are recorded per volume and select the slices a student reads."""
    _, _, student = setup
    vols = tmp_path / "ct"
    assert main(["phantom", os.path.join(REPO, "experiments/teacher.yaml"), str(vols), "data.num_subjects=3",
                 "data.shape=[32,32,16]"]) == 0
    assert main(["slices", str(vols), str(tmp_path / "one"), "--fraction", "0.4"]) == 0
    chosen = json.loads((tmp_path / "one" / "dataset.json").read_text())["slices"]
    ids = sorted(chosen)
    (tmp_path / "attrs.csv").write_text("case,phase\n" + "".join(f"{c},{'venous' if i else 'noncontrast'}\n"
                                                                 for i, c in enumerate(ids)))
    out = tmp_path / "taught"
    meta = teach(load_teach_config(None, ["model.format=none", f"student={student}", "data.source=nifti",
                                          f"data.root={vols}", f"data.attributes={tmp_path / 'attrs.csv'}",
                                          "levels.mode=match", f"levels.match={tmp_path / 'one'}", f"output={out}"]))
    for cid in ids:
        v = meta["volumes"][cid]
        assert v["planes"] == [chosen[cid]]  # every level drawn is that one plane (the student's orientation is LAS)
        assert v["attributes"] == {"phase": "venous" if cid != ids[0] else "noncontrast"}
    nc = TeacherSlices(out, NAMES, select={"phase": ["noncontrast"]}, need="truth")
    assert [i.split("@")[0] for i in nc.ids] == [ids[0]] and nc.left_out["select"] == 2
    (tmp_path / "short.csv").write_text(f"case,phase\n{ids[0]},venous\n")
    with pytest.raises(DataError, match=r"short.csv: no row for volumes"):
        teach(load_teach_config(None, ["model.format=none", f"student={student}", "data.source=nifti", f"data.root={vols}",
                                       f"data.attributes={tmp_path / 'short.csv'}", f"output={tmp_path / 'x'}"]))
