"""normzoo: batch-normalization layers, model surgery and the diagnostics to see what they do.

Example:
    >>> import torch, normzoo as nz
    >>> layer = nz.BatchRenorm2d(8)
    >>> layer(torch.randn(4, 8, 5, 5)).shape
    torch.Size([4, 8, 5, 5])
"""

from . import functional
from .__version__ import __version__
from .layers import (
    BatchNorm1d,
    BatchNorm2d,
    BatchNorm3d,
    BatchRenorm1d,
    BatchRenorm2d,
    BatchRenorm3d,
    NoisyBatchNorm1d,
    NoisyBatchNorm2d,
    NoisyBatchNorm3d,
    PaperSchedule,
    create_norm_layer,
    get_norm_layer,
    is_batch_norm,
)
from .surgery import (
    convert_sync,
    freeze_bn,
    fuse_bn,
    insert_bn,
    recompute_bn_stats,
    remove_bn,
    replace_bn,
    revert_sync,
    unfreeze_bn,
)

__all__ = [
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "BatchRenorm1d",
    "BatchRenorm2d",
    "BatchRenorm3d",
    "NoisyBatchNorm1d",
    "NoisyBatchNorm2d",
    "NoisyBatchNorm3d",
    "PaperSchedule",
    "__version__",
    "convert_sync",
    "create_norm_layer",
    "freeze_bn",
    "functional",
    "fuse_bn",
    "get_norm_layer",
    "insert_bn",
    "is_batch_norm",
    "recompute_bn_stats",
    "remove_bn",
    "replace_bn",
    "revert_sync",
    "unfreeze_bn",
]
