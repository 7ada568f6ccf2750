"""Loss functions: pure functions of tensors (no networks, no state)."""

from lightning_distill.losses.dist import dist_loss, pearson_rows, pixel_dist_loss
from lightning_distill.losses.prototype import (
    GEOMETRIES,
    class_means,
    identity_distances,
    masked_class_mean,
    masked_class_sums,
    prototype_dist_loss,
    prototype_dist_terms,
)

__all__ = [
    "GEOMETRIES",
    "identity_distances",
    "class_means",
    "dist_loss",
    "masked_class_mean",
    "masked_class_sums",
    "pearson_rows",
    "pixel_dist_loss",
    "prototype_dist_loss",
    "prototype_dist_terms",
]
