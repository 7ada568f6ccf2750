"""Today's phantom renders exactly as before (issue 31, item 3: a new phantom version must leave this one
reproducible). A few subjects of both populations (the students' CT slices, the teacher's CT volumes, MR
slices) are rendered and held against ``tests/fixtures/phantom_0.3_renders.json``: label maps by SHA-256 (whole
numbers: exact), images by float64 fingerprints (sum, sum of squares and 16 pixels at fixed places) to
float32 precision, since the sines and exponentials of the rendering may round otherwise on another CPU
(docs/development.md, "Comparing floats"). Regenerate the file only for a deliberate change of this
version: ``PYTHONPATH=tests python tests/data/test_phantom_pinned.py --write``.
"""

import hashlib
import json
import os
import sys

import numpy as np
import pytest

from conftest import REPO, assert_close_to_precision
from lightning_distill.data.phantom import PhantomSpec, render_slice, render_volume

PINNED = os.path.join(REPO, "tests", "fixtures", "phantom_0.3_renders.json")
CASES = {  # name -> (spec, renderer, shape): the populations of experiments/student.yaml, teacher.yaml and cmedl.yaml
    "student_ct_slice": (PhantomSpec(seed=2, phases=("noncontrast",), noise_hu=(20, 35), slice_z=(-0.6, 0.0)), "slice", (64, 64)),
    "teacher_ct_volume": (PhantomSpec(seed=1, noise_hu=(10, 35)), "volume", (32, 32, 16)),
    "mr_slice": (PhantomSpec(seed=1, modality="MR"), "slice", (48, 48)),
}
SUBJECTS = (0, 1, 7)


def _fingerprint(name: str, subject: int) -> dict:
    spec, kind, shape = CASES[name]
    out = (render_slice if kind == "slice" else render_volume)(spec, subject, shape)
    img = out["image"].astype(np.float64)
    flat = img.ravel()
    picks = np.linspace(0, flat.size - 1, 16).astype(int)
    return {"label_sha256": hashlib.sha256(np.ascontiguousarray(out["label"]).tobytes()).hexdigest(),
            "label_shape": list(out["label"].shape), "phase": out["phase"],
            "sum": float(img.sum()), "sum_sq": float((img ** 2).sum()), "pixels": flat[picks].tolist()}


def _all() -> dict:
    return {f"{name}/{s}": _fingerprint(name, s) for name in CASES for s in SUBJECTS}


@pytest.fixture(scope="module")
def pinned():
    with open(PINNED) as f:
        return json.load(f)


@pytest.mark.parametrize("name", sorted(CASES))
def test_todays_phantom_renders_as_pinned(name, pinned):
    for s in SUBJECTS:
        got, want = _fingerprint(name, s), pinned[f"{name}/{s}"]
        assert got["label_sha256"] == want["label_sha256"] and got["label_shape"] == want["label_shape"], (name, s)
        assert got["phase"] == want["phase"]
        # sums over many pixels: float32 precision of their magnitude; single pixels: of the image's magnitude
        assert_close_to_precision(np.array([got["sum"], got["sum_sq"]]), np.array([want["sum"], want["sum_sq"]]),
                                  msg=f"{name}/{s}")
        scale = max(abs(v) for v in want["pixels"])
        np.testing.assert_allclose(got["pixels"], want["pixels"], rtol=0, atol=1e-6 * scale, err_msg=f"{name}/{s}")


def test_rendering_twice_is_bitwise_the_same():
    """One computation run twice on one machine: bitwise."""
    spec, _, shape = CASES["student_ct_slice"]
    a, b = render_slice(spec, 3, shape), render_slice(spec, 3, shape)
    assert np.array_equal(a["image"], b["image"]) and np.array_equal(a["label"], b["label"])


if __name__ == "__main__" and "--write" in sys.argv:
    with open(PINNED, "w") as f:
        json.dump(_all(), f, indent=1)
        f.write("\n")
    print(f"wrote {PINNED}")
