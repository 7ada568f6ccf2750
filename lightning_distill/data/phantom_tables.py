"""The phantom's intensity tables: mean CT HU per structure and contrast phase, and the MR-like signal per
structure with its per-subject jitter (see :mod:`lightning_distill.data.phantom` for how they are used)."""

from __future__ import annotations

from typing import Dict, Tuple

from lightning_distill.config.load import PHANTOM_MODALITIES, PHANTOM_VERSIONS

# Mean HU per (structure, phase). Liver/spleen, muscle/aorta(nc)/kidney(nc) overlap on purpose.
HU_LEVELS: Dict[str, Dict[str, float]] = {
    "air": {"noncontrast": -1000, "arterial": -1000, "venous": -1000},
    "fat": {"noncontrast": -100, "arterial": -100, "venous": -100},
    "visceral": {"noncontrast": -60, "arterial": -60, "venous": -60},
    "muscle": {"noncontrast": 50, "arterial": 55, "venous": 60},
    "liver": {"noncontrast": 58, "arterial": 75, "venous": 110},
    "spleen": {"noncontrast": 50, "arterial": 125, "venous": 112},
    "kidney_cortex": {"noncontrast": 35, "arterial": 190, "venous": 165},
    "kidney_medulla": {"noncontrast": 30, "arterial": 70, "venous": 150},
    "aorta": {"noncontrast": 42, "arterial": 280, "venous": 150},
    "bone": {"noncontrast": 380, "arterial": 380, "venous": 380},
    "cortical": {"noncontrast": 750, "arterial": 750, "venous": 750},
    "canal": {"noncontrast": 20, "arterial": 20, "venous": 20},
    "bowel": {"noncontrast": 45, "arterial": 80, "venous": 100},
    "colon": {"noncontrast": 52, "arterial": 75, "venous": 100},
    "stomach": {"noncontrast": 15, "arterial": 20, "venous": 25},
    "gas": {"noncontrast": -850, "arterial": -850, "venous": -850},
}

MODALITIES: Tuple[str, ...] = PHANTOM_MODALITIES  # the config declares them (data.phantom.modality, .version)
VERSIONS: Tuple[str, ...] = PHANTOM_VERSIONS

# T2-weighted-like MR signal per structure (arbitrary units, no contrast phases), with the relative
# (log-normal) per-subject jitter of each. The ordering differs from CT on purpose: fluid >> kidney
# medulla ~ fat > visceral fat ~ kidney cortex > spleen >> liver; spleen/liver and kidney
# cortex/medulla are reversed or separated relative to CT; aorta (flow void), cortical bone and gas
# are near zero. Bowel/colon contents vary (larger jitter, plus a per-loop factor).
MR_LEVELS: Dict[str, Tuple[float, float]] = {
    "air": (0.0, 0.0),
    "fat": (650.0, 0.05),
    "visceral": (560.0, 0.06),
    "muscle": (140.0, 0.08),
    "liver": (240.0, 0.06),
    "spleen": (470.0, 0.06),
    "kidney_cortex": (520.0, 0.05),
    "kidney_medulla": (680.0, 0.05),
    "aorta": (35.0, 0.2),
    "bone": (380.0, 0.08),
    "cortical": (15.0, 0.2),
    "canal": (950.0, 0.04),
    "bowel": (400.0, 0.15),
    "colon": (330.0, 0.15),
    "stomach": (1000.0, 0.04),
    "gas": (5.0, 0.2),
}
MR_BOWEL_LOOP_SD = 0.2  # relative spread of single bowel loops around the subject's bowel signal
MR_TEXTURE = 6.0  # amplitude (a.u.) of each of the 3 soft-texture sinusoids in MR (CT: 2 HU)
MR_NOISE_PER_HU = 1.0  # Rician noise sigma (a.u.) per HU of the subject's noise_hu draw
