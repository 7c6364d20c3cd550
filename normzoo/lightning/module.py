"""``ClassificationModule``: any backbone trained with the seed's recipe, metrics under stable names.

The defaults are the seed study's training recipe: cross entropy, SGD with Nesterov momentum 0.9, learning
rate 0.01, the learning rate halved after 5 epochs without improvement of the validation loss (add
``early_stopping_patience=20`` for its early stop).

Logged once per epoch: ``train/loss``, ``train/acc``, ``val/loss``, ``val/acc``, ``val/acc_top5``,
``test/loss``, ``test/acc``, ``test/acc_top5`` (the top-5 accuracies only with more than 5 classes) and
``lr``. Losses are the mean over samples (batches weighted by their size), accuracies are micro-averaged
top-k accuracies from torchmetrics, so ``test/acc`` is exactly the fraction of test samples whose argmax
logit is the label.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from typing import Any, Literal

from ._imports import import_optional, require_lightning

require_lightning("normzoo.lightning.ClassificationModule")

import lightning as L  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from lightning.pytorch.callbacks import Callback, EarlyStopping  # noqa: E402
from torch import Tensor, nn  # noqa: E402
from torchmetrics.classification import MulticlassAccuracy  # noqa: E402

from ..layers import NormSpec, is_batch_norm  # noqa: E402
from ..models import build_cnn, build_mlp  # noqa: E402
from ..surgery import replace_bn  # noqa: E402

__all__ = ["BUILTIN_MODELS", "OPTIMIZERS", "SCHEDULERS", "ClassificationModule", "build_backbone"]

#: Optimizer names accepted by :class:`ClassificationModule`.
OPTIMIZERS = ("sgd", "adam", "adamw")
#: Scheduler names accepted by :class:`ClassificationModule` (``None`` for a constant learning rate).
SCHEDULERS = ("plateau", "step", "cosine", None)
#: Model names that build normzoo's own networks instead of a timm model.
BUILTIN_MODELS = {"mlp": build_mlp, "cnn": build_cnn}


def _swap_norm(model: nn.Module, norm: NormSpec) -> nn.Module:
    """``model`` (in place) with every BatchNorm-family layer swapped for ``norm`` by :func:`normzoo.replace_bn`."""
    if not any(is_batch_norm(m) for m in model.modules()):
        warnings.warn(
            f"norm={norm!r} was given but {type(model).__name__} has no BatchNorm layer to replace; "
            "use normzoo.insert_bn to add some",
            UserWarning,
            stacklevel=3,
        )
    return replace_bn(model, norm, inplace=True)


def build_backbone(
    model: nn.Module | str,
    num_classes: int,
    norm: NormSpec | None = None,
    model_kwargs: Mapping[str, Any] | None = None,
) -> nn.Module:
    """Resolve :class:`ClassificationModule`'s ``model`` argument to a network.

    Args:
        model: an ``nn.Module`` (used as it is, its BatchNorm layers swapped for ``norm`` in place by
            :func:`normzoo.replace_bn` when ``norm`` is given),
            ``"mlp"`` or ``"cnn"`` (:func:`normzoo.models.build_mlp` / :func:`~normzoo.models.build_cnn`
            with ``model_kwargs``, which must name ``in_features`` / ``in_channels``), or a timm model name
            (``timm.create_model(model, num_classes=num_classes, **model_kwargs)``, needs timm; then its
            BatchNorm layers, timm's ``BatchNormAct2d`` included, are swapped by :func:`normzoo.replace_bn`).
        num_classes: number of output logits.
        norm: the normalization to use, ``None`` to keep the model's own.
        model_kwargs: keyword arguments of the builder.

    Example:
        >>> build_backbone("mlp", 10, "renorm", {"in_features": 64, "hidden": (32,)}).norm1
        BatchRenorm1d(32, eps=1e-05, momentum=0.1, affine=True, r_max=3.0, d_max=5.0, schedule='paper')
    """
    kwargs = dict(model_kwargs or {})
    if isinstance(model, nn.Module):
        if kwargs:
            raise ValueError("model_kwargs is only for a model given by name, not for an nn.Module")
        return _swap_norm(model, norm) if norm is not None else model
    if not isinstance(model, str):
        raise TypeError(f"model must be an nn.Module or a name, got {type(model).__name__}")
    builder = BUILTIN_MODELS.get(model.lower())
    if builder is not None:
        required = "in_features" if builder is build_mlp else "in_channels"
        if required not in kwargs:
            raise ValueError(
                f"model={model!r} needs model_kwargs={{{required!r}: ...}} (e.g. datamodule.{required})"
            )
        return builder(num_classes=num_classes, norm=norm, **kwargs)  # type: ignore[operator]
    timm = import_optional("timm", extra="timm", feature=f"ClassificationModule(model={model!r})")
    if ":" not in model and not timm.is_model(model):
        raise ValueError(
            f"unknown model {model!r}: not one of normzoo's {tuple(BUILTIN_MODELS)} nor a timm model name "
            "(timm.list_models() lists them)"
        )
    net: nn.Module = timm.create_model(model, num_classes=num_classes, **kwargs)
    return _swap_norm(net, norm) if norm is not None else net


class ClassificationModule(L.LightningModule):
    """A LightningModule that trains any classifier with cross entropy and logs accuracy under stable names.

    Args:
        model: the backbone: an ``nn.Module`` returning logits, ``"mlp"``/``"cnn"`` (normzoo's builders, with
            ``model_kwargs``), or a timm model name (needs ``pip install "normzoo[timm]"``). See
            :func:`build_backbone`.
        num_classes: number of classes.
        norm: the normalization of the backbone: passed to normzoo's builders, or the BatchNorm layers of a
            given module or timm model are swapped for it (``"batchnorm"``, ``"renorm"``, ``"noisy"``,
            ``"torch"``, a class or a factory). ``None`` keeps the model as it is.
        model_kwargs: keyword arguments of the builder of a named model.
        optimizer: ``"sgd"`` (momentum, Nesterov), ``"adam"`` or ``"adamw"``.
        lr: the learning rate (0.01 in the seed recipe).
        momentum: SGD momentum (0.9).
        nesterov: Nesterov momentum for SGD (used only when ``momentum > 0``).
        weight_decay: L2 penalty ``weight_decay/2·‖w‖²`` on all parameters, added to the gradients: exactly L2
            regularization for SGD, and the *coupled* L2 of torch's Adam (scaled by Adam's adaptive step) for
            ``"adam"``; ``"adamw"`` decays the weights directly (decoupled, Loshchilov & Hutter).
        adam_betas: Adam/AdamW's ``betas``.
        scheduler: ``"plateau"`` (multiply the lr by ``plateau_factor`` after ``plateau_patience`` epochs
            without improvement of ``monitor``: the seed recipe), ``"step"`` (multiply by ``step_gamma`` every
            ``step_size`` epochs), ``"cosine"`` (cosine annealing to ``min_lr`` over ``cosine_epochs``, by
            default the rest of ``max_epochs``) or ``None`` (constant).
        warmup_epochs: linear warm-up, per optimizer step, from ``lr/n`` to ``lr`` over the first
            ``warmup_epochs`` epochs of ``n`` steps in all; the schedule above starts after it (its epoch
            count starts at the end of warm-up and plateau is not consulted during it).
        plateau_factor, plateau_patience: ReduceLROnPlateau's ``factor`` and ``patience`` (0.5 and 5).
        step_size, step_gamma: StepLR's ``step_size`` (epochs) and ``gamma``.
        cosine_epochs: length of the cosine schedule in epochs (``trainer.max_epochs - warmup_epochs`` when
            ``None``).
        min_lr: the cosine schedule's final learning rate.
        monitor: the metric that plateau scheduling (and early stopping) watches; it is maximized when its
            name contains ``acc``, else minimized.
        label_smoothing: cross entropy's label smoothing.
        early_stopping_patience: when set, the module adds Lightning's ``EarlyStopping`` on ``monitor`` with
            this patience (the seed stops after 20 epochs without improvement).

    Hyperparameters are saved (``self.hparams``, the checkpoint, the logger); a model object is not saved as
    a hyperparameter, only its class name (``hparams.model_class``), so reloading a checkpoint of a module
    built from an ``nn.Module`` needs a fresh instance of that model::

        module = ClassificationModule.load_from_checkpoint(path, model=build_cnn(1, 10, norm="batchnorm"))

    while a module built from a name (``"mlp"``, ``"cnn"``, a timm name) reloads from the path alone. A
    ``norm`` given as a class or factory is pickled into the checkpoint: reload it with
    ``weights_only=False`` (only for checkpoints you trust).

    Example:
        >>> module = ClassificationModule("mlp", 10, norm="batchnorm", model_kwargs={"in_features": 64})
        >>> module(torch.randn(4, 64)).shape
        torch.Size([4, 10])
        >>> module.hparams.model_class
        'torch.nn.modules.container.Sequential'
    """

    def __init__(
        self,
        model: nn.Module | str,
        num_classes: int,
        *,
        norm: NormSpec | None = None,
        model_kwargs: dict[str, Any] | None = None,
        optimizer: str = "sgd",
        lr: float = 0.01,
        momentum: float = 0.9,
        nesterov: bool = True,
        weight_decay: float = 0.0,
        adam_betas: tuple[float, float] = (0.9, 0.999),
        scheduler: str | None = "plateau",
        warmup_epochs: int = 0,
        plateau_factor: float = 0.5,
        plateau_patience: int = 5,
        step_size: int = 30,
        step_gamma: float = 0.1,
        cosine_epochs: int | None = None,
        min_lr: float = 0.0,
        monitor: str = "val/loss",
        label_smoothing: float = 0.0,
        early_stopping_patience: int | None = None,
    ) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"num_classes must be at least 2, got {num_classes}")
        optimizer = optimizer.lower()
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {optimizer!r}; expected one of {OPTIMIZERS}")
        scheduler = scheduler.lower() if isinstance(scheduler, str) else scheduler
        if scheduler not in SCHEDULERS:
            raise ValueError(f"unknown scheduler {scheduler!r}; expected one of {SCHEDULERS}")
        if lr < 0 or weight_decay < 0 or warmup_epochs < 0:
            raise ValueError(
                f"lr, weight_decay and warmup_epochs must be >= 0, got {lr}, {weight_decay}, {warmup_epochs}"
            )
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        self.model = build_backbone(model, num_classes, norm, model_kwargs)
        self.save_hyperparameters(ignore=["model"] if isinstance(model, nn.Module) else None)
        self.hparams["model_class"] = f"{type(self.model).__module__}.{type(self.model).__qualname__}"
        self.num_classes = num_classes
        top5 = num_classes > 5
        self.train_acc = MulticlassAccuracy(num_classes, top_k=1, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes, top_k=1, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes, top_k=1, average="micro")
        self.val_acc_top5 = MulticlassAccuracy(num_classes, top_k=5, average="micro") if top5 else None
        self.test_acc_top5 = MulticlassAccuracy(num_classes, top_k=5, average="micro") if top5 else None
        self._base_lrs: list[float] = []
        self._last_lr: float | None = None

    @property
    def _hp(self) -> Any:
        """The saved hyperparameters, for attribute access."""
        return self.hparams

    # -- model -------------------------------------------------------------------------------------------

    def forward(self, x: Tensor) -> Tensor:
        """The backbone's logits."""
        out: Tensor = self.model(x)
        return out

    def loss(self, logits: Tensor, target: Tensor) -> Tensor:
        """Mean cross entropy (with the configured label smoothing)."""
        return F.cross_entropy(logits, target, label_smoothing=self._hp.label_smoothing)

    def _step(self, batch: Any, stage: str) -> Tensor:
        x, y = batch[0], batch[1]
        logits = self(x)
        loss = self.loss(logits, y)
        n = len(y)
        self.log(
            f"{stage}/loss", loss, on_step=False, on_epoch=True, batch_size=n, sync_dist=True, prog_bar=True
        )
        acc: MulticlassAccuracy = getattr(self, f"{stage}_acc")
        acc.update(logits.detach(), y)
        self.log(f"{stage}/acc", acc, on_step=False, on_epoch=True, batch_size=n, prog_bar=stage != "train")
        top5: MulticlassAccuracy | None = getattr(self, f"{stage}_acc_top5", None)
        if top5 is not None:
            top5.update(logits.detach(), y)
            self.log(f"{stage}/acc_top5", top5, on_step=False, on_epoch=True, batch_size=n)
        return loss

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self._step(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self._step(batch, "test")

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> Tensor:
        """Logits of a batch ``x`` or ``(x, y, ...)``."""
        x = batch[0] if isinstance(batch, (list, tuple)) else batch
        return self(x)

    # -- optimization ------------------------------------------------------------------------------------

    def configure_optimizers(self) -> Any:
        hp: Any = self.hparams
        params = [p for p in self.parameters() if p.requires_grad]
        opt: torch.optim.Optimizer
        if hp.optimizer == "sgd":
            opt = torch.optim.SGD(
                params,
                lr=hp.lr,
                momentum=hp.momentum,
                nesterov=bool(hp.nesterov and hp.momentum > 0),
                weight_decay=hp.weight_decay,
            )
        elif hp.optimizer == "adam":
            opt = torch.optim.Adam(params, lr=hp.lr, betas=tuple(hp.adam_betas), weight_decay=hp.weight_decay)
        else:
            opt = torch.optim.AdamW(
                params, lr=hp.lr, betas=tuple(hp.adam_betas), weight_decay=hp.weight_decay
            )
        self._base_lrs = [group["lr"] for group in opt.param_groups]
        if hp.scheduler is None:
            return opt
        if hp.scheduler == "plateau":
            plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(
                opt, mode=self._monitor_mode(), factor=hp.plateau_factor, patience=hp.plateau_patience
            )
            config = {"scheduler": plateau, "monitor": hp.monitor, "interval": "epoch", "frequency": 1}
            return {"optimizer": opt, "lr_scheduler": config}
        sched: torch.optim.lr_scheduler.LRScheduler
        if hp.scheduler == "step":
            sched = torch.optim.lr_scheduler.StepLR(opt, step_size=hp.step_size, gamma=hp.step_gamma)
        else:
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(
                opt, T_max=self._cosine_epochs(), eta_min=hp.min_lr
            )
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch", "frequency": 1}}

    def _cosine_epochs(self) -> int:
        epochs = self._hp.cosine_epochs
        if epochs is None:
            max_epochs = self.trainer.max_epochs if self._trainer is not None else None
            if max_epochs is None or max_epochs < 0:
                raise ValueError(
                    "scheduler='cosine' needs cosine_epochs=... when the Trainer has no max_epochs"
                )
            epochs = max_epochs - self._hp.warmup_epochs
        if epochs < 1:
            raise ValueError(f"the cosine schedule must last at least one epoch, got {epochs}")
        return int(epochs)

    def lr_scheduler_step(self, scheduler: Any, metric: Any | None) -> None:
        """Step the schedule after warm-up only, so it starts from ``lr`` at epoch ``warmup_epochs``."""
        if self.current_epoch < self._hp.warmup_epochs:
            return
        if metric is None:
            scheduler.step()
        else:
            scheduler.step(metric)

    def warmup_factor(self) -> float:
        """The warm-up multiplier of the learning rate for the coming optimizer step (1 after warm-up)."""
        epochs = self._hp.warmup_epochs
        if epochs <= 0:
            return 1.0
        batches = self.trainer.num_training_batches
        if not math.isfinite(batches):  # no length: warm up per epoch instead
            return min(1.0, (self.current_epoch + 1) / epochs)
        total = epochs * math.ceil(batches / self.trainer.accumulate_grad_batches)
        return min(1.0, (self.trainer.global_step + 1) / total)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if self._hp.warmup_epochs <= 0 or self.current_epoch >= self._hp.warmup_epochs:
            return
        factor = self.warmup_factor()
        optimizer = self.trainer.optimizers[0]
        base = self._base_lrs or [self._hp.lr] * len(optimizer.param_groups)
        for group, lr in zip(optimizer.param_groups, base, strict=True):
            group["lr"] = lr * factor

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        self._last_lr = float(optimizer.param_groups[0]["lr"])

    def on_train_epoch_end(self) -> None:
        if self._last_lr is not None:
            self.log("lr", self._last_lr, on_step=False, on_epoch=True)

    def configure_callbacks(self) -> list[Callback]:
        patience = self._hp.early_stopping_patience
        if patience is None:
            return []
        return [EarlyStopping(monitor=self._hp.monitor, patience=patience, mode=self._monitor_mode())]

    def _monitor_mode(self) -> Literal["min", "max"]:
        return "max" if "acc" in self._hp.monitor.lower() else "min"
