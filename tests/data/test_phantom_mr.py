import hashlib
import json

import numpy as np
import pytest
from scipy.stats import spearmanr

from lightning_distill.config import ConfigError, load_config
from lightning_distill.data import CLASS_NAMES, PhantomSource, PhantomSpec
from lightning_distill.data.phantom import render_slice, render_volume
from lightning_distill.data.sources import DomainShift, export_phantom

LIVER, SPLEEN, BODY_WALL = CLASS_NAMES.index("liver"), CLASS_NAMES.index("spleen"), CLASS_NAMES.index("body_wall")
VOL = (40, 40, 24)


def _sha(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


def _class_means(src: PhantomSource, sid: str):
    d = src.load(sid)
    img, lab = d["image"][0], d["label"]
    return [float(img[lab == c].mean()) for c in range(len(CLASS_NAMES))]


def test_ct_rendering_unchanged():
    # Guards the CT rendering against accidental change (e.g. by MR-only edits). Update only on purpose:
    # last updated in issue 17 (pole mimics, shorter kidneys, default slice_z [-0.6, 0]).
    v = render_volume(PhantomSpec(), 3, (32, 32, 24))
    s = render_slice(PhantomSpec(), 5, (64, 64))
    assert _sha(v["image"]) == "d86bede37089b5b764036752f964f7b393f133e9f20580a91bcf34f4d8a47e14"
    assert _sha(s["image"]) == "774dbc672ded451933c6aeba1ff628c619f1fdddf9b2cad83235c37209471a5f"
    assert _sha(v["label"]) == "d3f8446803a15542f062d0399b81ddfd254967e5c827557ac6a27fcf98f508c4"
    assert _sha(s["label"]) == "7466d896e098e344805bc8c4f71b76196d18559d28256f631bdedc96027c0d41"
    assert PhantomSpec().modality == "CT"


def test_same_anatomy_and_labels_in_ct_and_mr():
    for seed, sid in ((0, 3), (4, 1)):
        ct, mr = PhantomSpec(seed=seed), PhantomSpec(seed=seed, modality="MR")
        a, b = render_volume(ct, sid, VOL), render_volume(mr, sid, VOL)
        assert np.array_equal(a["label"], b["label"]) and a["phase"] == b["phase"]
        assert not np.allclose(a["image"], b["image"])
        a, b = render_slice(ct, sid, (64, 64)), render_slice(mr, sid, (64, 64))
        assert np.array_equal(a["label"], b["label"]) and a["z"] == b["z"] and a["phase"] == b["phase"]


def test_mr_is_deterministic_and_subjects_differ():
    spec = PhantomSpec(seed=2, modality="MR")
    a, b = render_volume(spec, 1, VOL), render_volume(spec, 1, VOL)
    assert np.array_equal(a["image"], b["image"]) and a["image"].dtype == np.float32
    assert a["image"].min() >= 0  # magnitude image
    s1, s2 = render_slice(spec, 1, (64, 64)), render_slice(spec, 1, (64, 64))
    assert np.array_equal(s1["image"], s2["image"])
    assert not np.array_equal(render_volume(spec, 2, VOL)["image"], a["image"])
    assert not np.array_equal(render_slice(spec, 2, (64, 64))["image"], s1["image"])
    other = render_volume(PhantomSpec(seed=3, modality="MR"), 1, VOL)  # another population: other people
    assert not np.array_equal(other["label"], a["label"])


def test_mr_source_is_percentile_normalised_to_unit_range():
    for shape in ((48, 48), VOL):
        src = PhantomSource(PhantomSpec(seed=1, modality="MR"), 3, shape, window=(-1000.0, 1000.0))
        for sid in src.ids:
            img = src.load(sid)["image"]
            assert img.shape == (1, *shape) and img.dtype == np.float32
            assert img.min() >= 0.0 and img.max() <= 1.0
            # percentile normalisation: ~0.5 % of voxels at each end, the window is ignored
            assert 0.002 < (img >= 1.0).mean() < 0.02 and (img <= 0.0).mean() > 0.002
    shifted = PhantomSource(PhantomSpec(seed=1, modality="MR"), 2, (48, 48), shift=DomainShift(gamma=2.0))
    plain = PhantomSource(PhantomSpec(seed=1, modality="MR"), 2, (48, 48))
    a, b = plain.load(plain.ids[0])["image"], shifted.load(shifted.ids[0])["image"]
    np.testing.assert_allclose(b, a ** 2, atol=1e-6)  # the shift applies after the normalisation


def test_organ_ordering_differs_from_ct():
    rhos = []
    for sid in range(4):
        means = {}
        for mod in ("CT", "MR"):
            src = PhantomSource(PhantomSpec(seed=0, phases=("venous",), modality=mod), 4, VOL)
            means[mod] = _class_means(src, src.ids[sid])
        # CT: liver and spleen overlap (venous phase); MR (T2-like): spleen clearly brighter
        assert abs(means["CT"][SPLEEN] - means["CT"][LIVER]) < 0.08
        assert means["MR"][SPLEEN] - means["MR"][LIVER] > 0.2
        rhos.append(spearmanr(means["CT"], means["MR"]).correlation)
    assert max(rhos) < 0.7 and np.mean(rhos) < 0.5


def test_mr_has_a_smooth_bias_field():
    # Noise and blur off: the body-wall fat is one tissue (plus a +-3 % texture), so a smooth trend in
    # its log intensity over the field of view is the bias field; without it the trend is < 0.05.
    spec = PhantomSpec(seed=0, modality="MR", noise_hu=(0.0, 0.0), blur=0.0)
    for sid in range(3):
        v = render_volume(spec, sid, VOL)
        x, y, z = np.meshgrid(*[np.linspace(-1, 1, n) for n in VOL], indexing="ij")
        m = v["label"] == BODY_WALL
        x, y, z = x[m], y[m], z[m]
        a = np.stack([np.ones_like(x), x, y, z, x * x, y * y, z * z, x * y, x * z, y * z], 1)
        logi = np.log(v["image"][m])
        trend = a @ np.linalg.lstsq(a, logi, rcond=None)[0]
        assert 0.2 < np.ptp(trend) < 0.8  # roughly +-10-40 % over the body
        assert 1 - np.var(logi - trend) / np.var(logi) > 0.9  # and smooth (low order)


def test_invalid_modality_raises():
    with pytest.raises(ValueError, match="CT, MR"):
        PhantomSpec(modality="PET")


def test_config_modality():
    cfg = load_config(None, ["data.phantom.modality=MR"])
    assert cfg.data.phantom.modality == "MR"
    assert load_config(None, []).data.phantom.modality == "CT"
    from lightning_distill.data.build import make_preprocess
    from lightning_distill.train import build_source

    assert build_source(cfg).spec.modality == "MR"
    pre = make_preprocess(cfg)
    assert pre.modality == "MR" and pre.mr_norm == "percentile" and tuple(pre.percentiles) == (0.5, 99.5)
    assert make_preprocess(load_config(None, [])).modality == "CT"
    with pytest.raises(ConfigError):
        load_config(None, ["data.phantom.modality=XX"])


def test_export_mr_writes_float32_and_matches_preprocessing(tmp_path):
    import nibabel as nib

    from lightning_distill.data.preprocess import Preprocess
    from lightning_distill.data.sources import PHANTOM_ORIENTATION

    shape = (24, 24, 12)
    src = PhantomSource(PhantomSpec(seed=5, modality="MR"), 2, shape)
    assert export_phantom(src, tmp_path / "mr") == 2
    meta = json.loads((tmp_path / "mr" / "dataset.json").read_text())
    assert meta["channel_names"] == {"0": "MR"} and "MRI-like" in meta["description"]
    assert meta["description"].endswith("phantom, version 0.3")  # which generator made the files
    f = nib.load(str(tmp_path / "mr" / "imagesTr" / f"{src.ids[0]}_0000.nii.gz"))
    assert f.get_data_dtype() == np.float32
    # the MR preprocessing of a NIfTI file (what a phantom-MR model predicts with) gives the source's image
    pre = Preprocess(orientation=PHANTOM_ORIENTATION, modality="MR", percentiles=(0.5, 99.5), shape=list(shape))
    img, _, _ = pre(np.asarray(f.dataobj, np.float32)[None], f.affine)
    np.testing.assert_allclose(img.as_tensor().numpy(), src.load(src.ids[0])["image"], atol=1e-5)
    ct = PhantomSource(PhantomSpec(seed=5), 1, shape)
    export_phantom(ct, tmp_path / "ct")
    assert nib.load(str(tmp_path / "ct" / "imagesTr" / f"{ct.ids[0]}_0000.nii.gz")).get_data_dtype() == np.int16
    assert json.loads((tmp_path / "ct" / "dataset.json").read_text())["channel_names"] == {"0": "CT"}
