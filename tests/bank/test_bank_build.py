"""`lightning-distill bank build` (issue 19): a bank from a trained 3D model in any of four formats over
a folder of volumes, labelled or pseudo-labelled; class maps; processes; resume."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from lightning_distill.bank.build import ClassMap, build_bank, pseudo_labels, run_bank_build
from lightning_distill.cli import main
from lightning_distill.config import load_bank_build_config
from lightning_distill.bank import load_bank

from conftest import REPO, assert_close_to_precision

NAMES = ["background", "body_wall", "muscle", "liver", "spleen", "right_kidney", "left_kidney", "aorta", "vertebra"]
SEGRES = {"spatial_dims": 3, "in_channels": 1, "out_channels": 9, "init_filters": 8, "blocks_down": [1, 1], "blocks_up": [1]}


def _kwargs(d):
    return "{" + ", ".join(f"{k}: {json.dumps(v)}" for k, v in d.items()) + "}"


@pytest.fixture(scope="module")
def volumes(tmp_path_factory):
    """Six phantom volumes (32 x 32 x 16, nnU-Net layout, with labels) and a SegResNet's weights."""
    root = tmp_path_factory.mktemp("bankbuild")
    assert main(["phantom", os.path.join(REPO, "experiments/teacher.yaml"), str(root / "ph"), "data.num_subjects=6",
                 "data.shape=[32,32,16]"]) == 0
    from monai.networks.nets import SegResNet

    torch.manual_seed(0)
    net = SegResNet(**SEGRES).eval()
    torch.save(net.state_dict(), root / "segresnet.pt")
    return root, net


def _cfg(root, out, *extra, kw=SEGRES, path=None):
    return load_bank_build_config(None, [
        "model.format=monai", f"model.path={path or root / 'segresnet.pt'}", "model.name=SegResNet",
        f"model.kwargs={_kwargs(kw)}", f"model.labels=[{','.join(NAMES)}]", f"data.root={root / 'ph'}",
        "data.preprocess.orientation=LAS", "inference.roi_size=[16,16,16]", f"output={out}", *extra])


def _same(a, b, atol=None):
    """The same bank. ``atol=None``: one computation run twice (resumed vs uninterrupted, a cache hit vs the
    reads it cached), bit for bit. ``"float32"``: two computations of the same sums (another process
    count, another loader): float32 precision (tests/conftest.py). A number: the network runs by another
    path, whose rounding grows through its layers; the probabilities (in [0, 1]) agree within it.
    Voxel counts are exact in every case."""
    assert a.class_names == b.class_names and torch.equal(a.counts, b.counts)
    assert a.taus == b.taus
    for t in a.taus:
        if atol is None:
            assert torch.equal(a.at_tau(t), b.at_tau(t)), t
        elif atol == "float32":
            assert_close_to_precision(a.at_tau(t), b.at_tau(t), msg=f"tau {t}")
        else:
            torch.testing.assert_close(a.at_tau(t), b.at_tau(t), rtol=1e-5, atol=atol, msg=lambda m: f"tau {t}: {m}")


# ----------------------------------------------------------------------------------------- formats
def test_monai_bundle_and_torchscript_formats_give_the_same_bank(volumes, tmp_path):
    root, net = volumes
    ref = build_bank(_cfg(root, tmp_path / "monai.pt"))
    assert ref.meta["model"]["sha256"] and ref.meta["volumes"] == 6 and ref.meta["labelled_volumes"] == 6
    assert load_bank(tmp_path / "monai.pt").meta["model"]["name"] == "SegResNet"
    rows = ref.prototypes[ref.present]
    assert torch.allclose(rows.sum(1), torch.ones(len(rows)), atol=1e-5)  # mapped probabilities, rows sum to 1

    bundle = tmp_path / "bundle"
    (bundle / "configs").mkdir(parents=True)
    (bundle / "models").mkdir()
    (bundle / "configs" / "inference.json").write_text(json.dumps({"network_def": {"_target_": "SegResNet", **SEGRES}}))
    torch.save(net.state_dict(), bundle / "models" / "model.pt")
    b = build_bank(_cfg(root, tmp_path / "bundle.pt", "model.format=bundle", f"model.path={bundle}"))
    _same(ref, b, atol="float32")  # the same network, built from the bundle's config
    assert b.meta["model"]["weights"].endswith("model.pt")

    ts = tmp_path / "net.ts"
    torch.jit.trace(net, torch.zeros(1, 1, 16, 16, 16)).save(str(ts))
    t = build_bank(_cfg(root, tmp_path / "ts.pt", "model.format=torchscript", f"model.path={ts}"))
    _same(ref, t, atol=1e-5)  # TorchScript's graph may run other kernels: rounding through every layer


def test_our_checkpoint_equals_its_network_loaded_as_a_monai_state_dict(volumes, teacher_bank, tmp_path):
    """The checkpoint format brings its own classes and preprocessing: the same bank as its UNet's weights
    given as a MONAI state_dict with the same preprocessing."""
    root, _ = volumes
    ckpt = next((teacher_bank / "checkpoints").glob("best*.ckpt"), None) or teacher_bank / "checkpoints" / "last.ckpt"
    a = build_bank(load_bank_build_config(None, ["model.format=checkpoint", f"model.path={ckpt}", f"data.root={root / 'ph'}",
                                                 f"output={tmp_path / 'ckpt.pt'}"]))
    state = torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]
    torch.save({k[4:]: v for k, v in state.items() if k.startswith("net.")}, tmp_path / "unet.pt")
    kw = {"spatial_dims": 3, "in_channels": 1, "out_channels": 9, "channels": [8, 16, 32], "strides": [2, 2],
          "num_res_units": 1}
    b = build_bank(_cfg(root, tmp_path / "unet_bank.pt", "model.name=UNet", "inference.roi_size=null",
                        kw=kw, path=tmp_path / "unet.pt"))
    _same(a, b, atol=1e-5)  # the network and preprocessing from the checkpoint: another path through the layers
    assert a.class_names == NAMES and a.meta["model"]["format"] == "checkpoint"


def test_bad_models_are_refused_with_the_file_named(volumes, tmp_path):
    root, _ = volumes
    with pytest.raises(ValueError, match="not a network of monai.networks.nets; valid: .*SegResNet"):
        build_bank(_cfg(root, tmp_path / "x.pt", "model.name=SegResNett"))
    with pytest.raises(ValueError, match="do not fit the network"):
        build_bank(_cfg(root, tmp_path / "x.pt", kw={**SEGRES, "init_filters": 16}))
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a state dict")
    with pytest.raises(ValueError, match=f"{bad}: could not be read"):
        build_bank(_cfg(root, tmp_path / "x.pt", path=bad))
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        build_bank(_cfg(root, tmp_path / "x.pt", path=tmp_path / "missing.pt"))
    with pytest.raises(ValueError, match="predicts 9 channels, model.labels names 8"):
        build_bank(_cfg(root, tmp_path / "x.pt", f"model.labels=[{','.join(NAMES[:8])}]", "data.labels=ignore"))
    assert not (tmp_path / "x.pt").exists()


# ----------------------------------------------------------------------------------------- classes
def test_class_map_merges_drops_and_renormalises():
    labels = ["bg", "liver", "liver_tumour", "lung", "spleen"]
    cm = ClassMap(labels, ["background", "liver", "spleen"], {"liver_tumour": "liver", "lung": "ignore", 0: "background"})
    assert cm.how == {"bg": "background", "liver": "liver", "liver_tumour": "liver", "lung": "ignore", "spleen": "spleen"}
    p = torch.tensor([0.1, 0.2, 0.3, 0.3, 0.1])
    mapped, renorm = cm.probabilities(p.log().view(1, 5, 1, 1, 1), 1.0)
    assert torch.allclose(mapped.flatten(), torch.tensor([0.1, 0.5, 0.1]), atol=1e-6)  # the lung's 0.3 left out
    assert torch.allclose(renorm.flatten(), torch.tensor([0.1, 0.5, 0.1]) / 0.7, atol=1e-6)
    bg = ClassMap(labels, ["background", "liver", "spleen"], {"liver_tumour": "liver"}, unmapped="background")
    assert bg.how["lung"] == "background (unmapped)" and bg.how["bg"] == "background (unmapped)"
    assert torch.allclose(bg.probabilities(p.log().view(1, 5, 1, 1, 1), 1.0)[0].flatten(), torch.tensor([0.4, 0.5, 0.1]))


@pytest.mark.parametrize("kwargs, message", [
    ({"class_map": {"lungs": "liver"}}, "model label 'lungs', which the model does not have"),
    ({"class_map": {"lung": "lungs"}}, "sends model label 'lung' to 'lungs', which is not a bank class"),
    ({"class_map": {7: "liver"}}, "names model channel 7, but the model has 5 output channels"),
    ({}, r"model labels \['liver_tumour', 'lung'\] map to no bank class"),
    ({"class_map": {"liver_tumour": "liver", "lung": "ignore", "spleen": "ignore"}}, r"bank classes \['spleen'\] receive no model label"),
])
def test_class_map_errors_say_what_is_wrong(kwargs, message):
    labels = ["background", "liver", "liver_tumour", "lung", "spleen"]
    with pytest.raises(ValueError, match=message):
        ClassMap(labels, ["background", "liver", "spleen"], **kwargs)


def test_unknown_bank_build_keys_are_refused_with_the_valid_ones():
    with pytest.raises(ValueError, match="unknown config key 'thresold'.*Did you mean 'threshold'"):
        load_bank_build_config(None, ["thresold=0.5"])
    with pytest.raises(ValueError, match="model.format='onnx' is not one of"):
        load_bank_build_config(None, ["model.format=onnx"])


# ----------------------------------------------------------------------------------------- pseudo-labels
def test_pseudo_label_threshold_keeps_voxels_at_or_above_it():
    mapped = torch.tensor([[0.9, 0.05, 0.05], [0.5, 0.4, 0.1], [0.2, 0.2, 0.3]]).T.reshape(1, 3, 3, 1, 1)  # the third sums to 0.7: 0.3 ignored
    assert pseudo_labels(mapped, 0.5).flatten().tolist() == [0, 0, 255]
    assert pseudo_labels(mapped, 0.3).flatten().tolist() == [0, 0, 2]
    assert pseudo_labels(mapped, 0.95).flatten().tolist() == [255, 255, 255]


def test_unlabelled_volumes_use_the_models_confident_voxels(volumes, tmp_path):
    root, _ = volumes
    banks = {t: build_bank(_cfg(root, tmp_path / f"u{t}.pt", "data.labels=ignore", f"threshold={t}")) for t in (0.2, 0.3)}
    lo, hi = banks[0.2], banks[0.3]
    assert lo.meta["pseudo_labelled_volumes"] == 6 and lo.meta["labelled_volumes"] == 0 and lo.meta["threshold"] == 0.2
    assert hi.counts.sum() < lo.counts.sum() and bool((hi.counts <= lo.counts).all())  # fewer voxels pass a higher bar
    # each kept voxel's own class is its most probable one: the diagonal holds each row's largest entry
    for c in torch.nonzero(lo.counts > 0).flatten().tolist():
        assert int(lo.at_tau(1.0)[c].argmax()) == c
    with pytest.raises(ValueError, match="no voxel of any class at threshold 1"):
        build_bank(_cfg(root, tmp_path / "none.pt", "data.labels=ignore", "threshold=1.0"))


# ----------------------------------------------------------------------------------------- processes, resume
def test_killed_and_resumed_equals_uninterrupted_and_refuses_another_config(volumes, tmp_path):
    root, _ = volumes
    whole = build_bank(_cfg(root, tmp_path / "whole.pt", "save_every=1"))
    out = tmp_path / "resumed.pt"
    assert build_bank(_cfg(root, out, "save_every=1"), stop_after=4) is None
    assert not out.exists() and len(torch.load(str(out) + ".partial/state-0-of-1.pt", weights_only=True)["done"]) == 4
    with pytest.raises(ValueError, match="another config"):
        build_bank(_cfg(root, out, "bank.tau=2.0"))
    resumed = build_bank(_cfg(root, out, "save_every=1"))
    _same(whole, resumed)
    assert not (tmp_path / "resumed.pt.partial").exists()
    with pytest.raises(FileExistsError, match="overwrite=true"):
        build_bank(_cfg(root, out))


def test_two_processes_equal_one(volumes, tmp_path):
    root, _ = volumes
    one = build_bank(_cfg(root, tmp_path / "one.pt"))
    run_bank_build(_cfg(root, tmp_path / "two.pt", "processes=2", "inference.device=cpu"))
    two = load_bank(tmp_path / "two.pt")
    _same(one, two, atol="float32")  # sums over each process's volumes, then added: another order
    assert two.meta["processes"] == 2 and two.meta["volumes"] == 6


@pytest.mark.slow
def test_a_killed_command_resumes_where_it_stopped(volumes, tmp_path):
    """SIGKILL of the real command after some volumes are saved; the second run reads only the rest."""
    root, _ = volumes
    args = [sys.executable, "-m", "lightning_distill.cli", "bank", "build", "model.format=monai",
            f"model.path={root / 'segresnet.pt'}", "model.name=SegResNet", f"model.kwargs={_kwargs(SEGRES)}",
            f"model.labels=[{','.join(NAMES)}]", f"data.root={root / 'ph'}", "data.preprocess.orientation=LAS",
            "inference.roi_size=[16,16,16]", "save_every=1"]
    out = tmp_path / "k.pt"
    state = tmp_path / "k.pt.partial" / "state-0-of-1.pt"
    # the command runs the very computation of this process (same thread count: BLAS splits its sums by threads),
    # so the resumed bank is compared bit for bit with the uninterrupted one
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    proc = subprocess.Popen(args + [f"output={out}"], cwd=REPO, env=env)
    deadline = time.time() + 600
    while proc.poll() is None and time.time() < deadline:
        if state.is_file() and len(torch.load(state, weights_only=True)["done"]) >= 2:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    assert not out.exists()
    done = len(torch.load(state, weights_only=True)["done"])
    r = subprocess.run(args + [f"output={out}"], cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr
    assert f"resuming: {done} of 6 volumes done" in r.stdout
    _same(build_bank(_cfg(root, tmp_path / "ref.pt")), load_bank(out))


def test_a_student_trains_with_a_built_bank(volumes, tmp_path, tiny_student):
    root, _ = volumes
    run_bank_build(_cfg(root, tmp_path / "bank.pt", "data.labels=ignore", "threshold=0.2"))
    assert main(["fit", os.path.join(REPO, "experiments/student.yaml"), f"output_dir={tmp_path / 'student'}",
                 f"distill.prototypes={tmp_path / 'bank.pt'}", *tiny_student]) == 0
    assert (tmp_path / "student" / "results.json").is_file()



def test_the_cache_of_preprocessed_volumes_gives_the_same_bank_without_reading_again(volumes, tmp_path, monkeypatch):
    root, _ = volumes
    ref = build_bank(_cfg(root, tmp_path / "ref.pt"))
    cold = build_bank(_cfg(root, tmp_path / "cold.pt", f"data.cache_dir={tmp_path / 'cache'}"))
    assert len(list((tmp_path / "cache").glob("*.npz"))) == 6
    import lightning_distill.bank.build as bb

    monkeypatch.setattr(bb, "read_case", lambda *a, **k: (_ for _ in ()).throw(AssertionError("read again")))
    warm = build_bank(_cfg(root, tmp_path / "warm.pt", f"data.cache_dir={tmp_path / 'cache'}"))
    _same(ref, cold)
    _same(ref, warm)


@pytest.mark.slow
def test_torchrun_with_two_processes_equals_one(volumes, tmp_path):
    """The path beyond one machine: the launcher's world (here 2 local processes, gloo) shards the volumes."""
    root, _ = volumes
    out = tmp_path / "tr.pt"
    args = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
            "-m", "lightning_distill.cli", "bank", "build", "model.format=monai", f"model.path={root / 'segresnet.pt'}",
            "model.name=SegResNet", f"model.kwargs={_kwargs(SEGRES)}", f"model.labels=[{','.join(NAMES)}]",
            f"data.root={root / 'ph'}", "data.preprocess.orientation=LAS", "inference.roi_size=[16,16,16]",
            "inference.device=cpu", f"output={out}"]
    r = subprocess.run(args, cwd=REPO, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("wrote ") == 1
    bank = load_bank(out)
    assert bank.meta["processes"] == 2
    _same(build_bank(_cfg(root, tmp_path / "one.pt")), bank, atol="float32")  # 2 processes: another order of sums


def test_volumes_unlike_the_models_training_data_warn_or_stop_before_inference(volumes, teacher_bank, tmp_path):
    """The checkpoint's intensity fingerprint is checked per volume before inference (issue 35: an HU checkpoint
    took 0..255 volumes silently and their pseudo-labels entered the bank). on_shift=error stops, naming the file."""
    import shutil
    import warnings

    import nibabel as nib
    import numpy as np

    from lightning_distill.data.nifti import DataError

    root, _ = volumes
    ckpt = teacher_bank / "checkpoints" / "last.ckpt"
    args = ["model.format=checkpoint", f"model.path={ckpt}"]
    with warnings.catch_warnings(record=True) as caught:  # volumes of the model's own kind (phantom CT in HU)
        warnings.simplefilter("always")
        build_bank(load_bank_build_config(None, [*args, f"data.root={root / 'ph'}", f"output={tmp_path / 'hu.pt'}"]))
    assert not [w for w in caught if "intensities unlike" in str(w.message)]
    u8 = tmp_path / "u8"
    shutil.copytree(root / "ph", u8)
    for f in sorted((u8 / "imagesTr").iterdir()):  # the same volumes as 0..255 (the abdominal window, 8 bits)
        img = nib.load(str(f))
        hu = np.asarray(img.dataobj, np.float32)
        nib.save(nib.Nifti1Image(np.clip((hu + 175) / 425 * 255, 0, 255).astype(np.uint8), img.affine), str(f))
    with pytest.warns(UserWarning, match="intensities unlike the training data's") as caught:
        build_bank(load_bank_build_config(None, [*args, f"data.root={u8}", f"output={tmp_path / 'u8.pt'}"]))
    msgs = [str(w.message) for w in caught if "intensities unlike" in str(w.message)]
    assert len(msgs) == 6 and all("no HU-like negative values" in m for m in msgs)
    assert "data.preprocess.from_checkpoint=false data.preprocess.ct_window=[lo,hi]" in msgs[0]
    first = sorted((u8 / "imagesTr").iterdir())[0]
    with pytest.raises(DataError, match=f"{first}: intensities unlike the training data's .* nothing of it entered the bank"):
        build_bank(load_bank_build_config(None, [*args, f"data.root={u8}", f"output={tmp_path / 'stop.pt'}", "on_shift=error"]))
    assert not (tmp_path / "stop.pt").exists()


def test_banks_of_disjoint_volumes_merge_into_the_bank_of_all(volumes, tmp_path, capsys):
    """bank merge: each row the count-weighted mean, the bank one build over all the volumes gives (float32
    rounding apart); how volumes that need their own preprocessing share one bank (issue 35)."""
    from lightning_distill.bank.format import merge_banks

    root, _ = volumes
    cases = sorted(p.name[:-len("_0000.nii.gz")] for p in (root / "ph" / "imagesTr").iterdir())
    whole = build_bank(_cfg(root, tmp_path / "all.pt", "bank.taus=[2.0]"))
    halves = [build_bank(_cfg(root, tmp_path / f"h{i}.pt", "bank.taus=[2.0]", f"data.cases=[{','.join(part)}]"))
              for i, part in enumerate((cases[:3], cases[3:]))]
    merged = merge_banks(halves, ["h0", "h1"])
    assert torch.equal(merged.counts, whole.counts) and merged.taus == whole.taus == [1.0, 2.0]
    for t in whole.taus:  # two computations of one mean (sums in another order): float32 precision
        assert_close_to_precision(merged.at_tau(t), whole.at_tau(t))
    assert [m["bank"] for m in merged.meta["merged_from"]] == ["h0", "h1"]
    # through the command; banks of other classes or temperatures are refused
    assert main(["bank", "merge", str(tmp_path / "m.pt"), str(tmp_path / "h0.pt"), str(tmp_path / "h1.pt")]) == 0
    assert torch.equal(load_bank(tmp_path / "m.pt").prototypes, merged.prototypes)
    assert main(["bank", "merge", str(tmp_path / "m.pt"), str(tmp_path / "h0.pt"), str(tmp_path / "h1.pt")]) == 2
    assert "exists; pass --overwrite" in capsys.readouterr().err
    build_bank(_cfg(root, tmp_path / "t1.pt", "bank.taus=[]", f"data.cases=[{cases[0]}]"))  # one temperature only
    with pytest.raises(ValueError, match="t1.pt: temperatures \\[1.0\\] differ from h0's \\[1.0, 2.0\\]"):
        merge_banks([halves[0], load_bank(tmp_path / "t1.pt")], ["h0", str(tmp_path / "t1.pt")])
