"""normzoo's normalization layers: one family per file, sharing :mod:`normzoo.layers._base`."""

from ._base import BatchNormBase, NormBase
from .batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d
from .create import NORM_FAMILIES, NormSpec, create_norm_layer, get_norm_layer, is_batch_norm, norm_family
from .noisy import NoisyBatchNorm1d, NoisyBatchNorm2d, NoisyBatchNorm3d
from .renorm import BatchRenorm1d, BatchRenorm2d, BatchRenorm3d, PaperSchedule, RenormSchedule

__all__ = [
    "NORM_FAMILIES",
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "BatchNormBase",
    "BatchRenorm1d",
    "BatchRenorm2d",
    "BatchRenorm3d",
    "NoisyBatchNorm1d",
    "NoisyBatchNorm2d",
    "NoisyBatchNorm3d",
    "NormBase",
    "NormSpec",
    "PaperSchedule",
    "RenormSchedule",
    "create_norm_layer",
    "get_norm_layer",
    "is_batch_norm",
    "norm_family",
]
