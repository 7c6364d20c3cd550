"""timm's ``BatchNormAct2d`` synchronized by :func:`normzoo.surgery.sync.convert_sync`, keeping ``drop`` and ``act``.

Imported only when timm is (a model holding timm layers has imported it), so that ``import normzoo`` needs
torch alone.
"""

from __future__ import annotations

from timm.layers.norm_act import BatchNormAct2d
from torch import Tensor, nn

from .sync import SyncedTorchBatchNorm

__all__ = ["SYNCED_TIMM_CLASSES", "SyncedBatchNormAct2d"]


class SyncedBatchNormAct2d(SyncedTorchBatchNorm, BatchNormAct2d):
    """timm's ``BatchNormAct2d`` whose batch statistics are synchronized: normalize, then ``drop`` and ``act``.

    timm's own ``forward`` runs whenever nothing is synchronized (eval, one process).
    """

    unsynced_class = BatchNormAct2d

    def _after_norm(self, output: Tensor) -> Tensor:
        return self.act(self.drop(output))


SYNCED_TIMM_CLASSES: dict[type[nn.Module], type[SyncedTorchBatchNorm]] = {
    BatchNormAct2d: SyncedBatchNormAct2d
}
