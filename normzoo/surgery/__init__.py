"""Model surgery: put BatchNorm into any model, take it out, swap its kind, fold it away, re-estimate it.

* :func:`insert_bn` — a normalization layer before every activation (modules and ``F.relu``-style calls).
* :func:`remove_bn` — every BatchNorm-family layer becomes an identity: the vanilla baseline.
* :func:`replace_bn` — swap BatchNorm kinds (BatchNorm ↔ BatchRenorm ↔ noisy), carrying weights and statistics.
* :func:`fuse_bn` — fold BatchNorm into the neighbouring Linear/convolution for inference.
* :func:`recompute_bn_stats` — population statistics by Algorithm 2 of Ioffe & Szegedy.
* :func:`convert_sync` / :func:`revert_sync` — synchronized batch statistics under DDP, each layer keeping
  its kind (see ``docs/distributed.md``).

Each takes any ``nn.Module`` and returns the model (a deep copy unless ``inplace=True``;
``recompute_bn_stats`` works in place). See ``docs/surgery.md`` for the rules.
"""

from .._activations import ACTIVATION_FUNCTIONS as DEFAULT_ACTIVATION_FUNCTIONS
from .._activations import ACTIVATION_METHODS as DEFAULT_ACTIVATION_METHODS
from .._activations import ACTIVATION_MODULES as DEFAULT_ACTIVATION_MODULES
from ._forward import GraphForward
from ._modules import BatchNormAct2d, BatchRenormAct2d, LazyNorm, NoisyBatchNormAct2d, NormAct
from .freeze import FrozenBatchNorm, freeze_bn, unfreeze_bn
from .fuse import fuse_bn
from .insert import insert_bn
from .remove import remove_bn
from .replace import replace_bn
from .stats import BatchStatSums, apply_bn_stat_sums, collect_bn_stat_sums, recompute_bn_stats
from .sync import (
    SyncedBatchNorm1d,
    SyncedBatchNorm2d,
    SyncedBatchNorm3d,
    all_reduce_stat_sums,
    convert_sync,
    is_synced,
    revert_sync,
)

__all__ = [
    "DEFAULT_ACTIVATION_FUNCTIONS",
    "DEFAULT_ACTIVATION_METHODS",
    "DEFAULT_ACTIVATION_MODULES",
    "BatchNormAct2d",
    "BatchRenormAct2d",
    "BatchStatSums",
    "FrozenBatchNorm",
    "GraphForward",
    "LazyNorm",
    "NoisyBatchNormAct2d",
    "NormAct",
    "SyncedBatchNorm1d",
    "SyncedBatchNorm2d",
    "SyncedBatchNorm3d",
    "all_reduce_stat_sums",
    "apply_bn_stat_sums",
    "collect_bn_stat_sums",
    "convert_sync",
    "freeze_bn",
    "fuse_bn",
    "insert_bn",
    "is_synced",
    "recompute_bn_stats",
    "remove_bn",
    "replace_bn",
    "revert_sync",
    "unfreeze_bn",
]
