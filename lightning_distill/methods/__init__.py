"""Distillation methods with a teacher *network* (one small file each): a pure loss plus a thin module.

The core 3D->2D method needs no teacher network at training time (only its prototype bank); it
lives in :mod:`lightning_distill.modules` (``StudentModule``). CMEDL (:mod:`.cmedl`) trains its teacher
concurrently with the student and an image translator (:mod:`.translator`).
"""

from lightning_distill.methods.cmedl import CMEDLModule, hint_loss
from lightning_distill.methods.frozen import FrozenTeacher
from lightning_distill.methods.pixel_dist import PixelDistModule
from lightning_distill.methods.sikd import SIKDModule, class_mean_image

__all__ = ["CMEDLModule", "FrozenTeacher", "hint_loss", "PixelDistModule", "SIKDModule", "class_mean_image"]
