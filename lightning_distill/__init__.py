"""lightning_distill: unpaired knowledge distillation for medical image segmentation."""

__version__ = "0.4.0"
