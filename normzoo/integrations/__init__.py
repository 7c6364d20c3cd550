"""What normzoo tells other libraries so that their tools handle its layers right (see ``docs/ecosystem.md``).

``import normzoo`` imports this package, which needs torch alone:

- :mod:`.sync_batchnorm` wraps ``torch.nn.SyncBatchNorm.convert_sync_batchnorm`` (and with it Lightning's
  ``Trainer(sync_batchnorm=True)``) so that normzoo layers keep their kind instead of becoming plain
  ``SyncBatchNorm``; torch's and timm's layers are converted exactly as before.
- :mod:`normzoo.integrations.timm` (needs timm) has the norm+act classes for timm's models and the
  synchronized form of timm's ``BatchNormAct2d``. It is registered here by name, so that
  :func:`normzoo.convert_sync` imports it the first time it meets a timm ``BatchNormAct2d``, whatever was
  imported first; import it yourself to use its classes as a timm ``norm_layer``.
"""

from ..surgery.sync import register_synced_class
from . import sync_batchnorm

__all__ = ["sync_batchnorm"]

sync_batchnorm.install()
register_synced_class("timm.layers.norm_act.BatchNormAct2d", "normzoo.integrations.timm:SyncedBatchNormAct2d")
