"""Data: the built-in phantom, subject sources and LightningDataModules."""

from lightning_distill.data.datamodules import SegmentationDataModule, SliceDataModule, SubjectDataset, VolumeDataModule
from lightning_distill.data.phantom import CLASS_NAMES, PhantomSpec
from lightning_distill.data.sources import PhantomSource, SubjectSource

__all__ = ["CLASS_NAMES", "PhantomSource", "PhantomSpec", "SegmentationDataModule", "SliceDataModule",
           "SubjectDataset", "SubjectSource", "VolumeDataModule"]
