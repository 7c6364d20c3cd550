"""``freeze_bn`` / ``unfreeze_bn``: BatchNorm layers whose statistics stay fixed whatever ``.train()`` says.

Freezing BatchNorm by flags (``bn.eval()``, ``requires_grad=False``) is undone by the next ``model.train()``,
which every training loop calls at the start of an epoch, and Lightning's ``BaseFinetuning.freeze`` turns
``track_running_stats`` off, which makes BatchNorm normalize with *batch* statistics in eval too. A
:class:`FrozenBatchNorm` has no training mode to fall back to: it is BatchNorm's eval form, ``γ·(x −
running_mean)/sqrt(running_var + ε) + β``, with the running statistics as constant buffers.

The frozen layer shares its tensors with the layer it stands for: the same ``weight`` and ``bias``
``Parameter`` objects (an optimizer or DDP built before freezing keeps working) and the same buffers, under the
same ``state_dict`` keys (a BatchNorm checkpoint loads into the frozen model and back). It keeps the original
module, so :func:`unfreeze_bn` gives back exactly what was frozen: its class, settings and hooks, with the
frozen layer's current tensors (trained affine parameters, a moved device, a loaded checkpoint).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.parameter import is_lazy
from torch.nn.utils import parametrize

from ..layers import is_batch_norm
from ._common import check_model, copy_model, hook_dict_names
from ._kinds import after_norm, bn_act_parts

__all__ = ["FrozenBatchNorm", "freeze_bn", "unfreeze_bn"]


class FrozenBatchNorm(nn.Module):
    """A BatchNorm-family layer frozen in its eval form: ``.train()`` does not change what it computes.

    Built by :func:`freeze_bn` from torch's, timm's or normzoo's BatchNorm (any kind: BatchRenorm and noisy
    BatchNorm compute BatchNorm's eval form too). ``weight`` and ``bias`` are the original layer's parameters,
    trainable or not as :func:`freeze_bn` was asked; the statistics are buffers and never change. A timm
    ``BatchNormAct2d`` keeps its ``drop`` and ``act``, applied after normalizing.

    Args:
        bn: the BatchNorm layer to freeze (it needs running statistics).
        trainable_affine: whether ``weight`` and ``bias`` get gradients.

    Example:
        >>> import torch
        >>> bn = torch.nn.BatchNorm2d(3).eval()
        >>> frozen = FrozenBatchNorm(bn).train()
        >>> x = torch.randn(2, 3, 4, 4)
        >>> torch.equal(frozen(x), bn(x))
        True
    """

    _version = 2  # torch's BatchNorm state_dict version: the checkpoints are the same
    weight: Tensor | None
    bias: Tensor | None
    running_mean: Tensor
    running_var: Tensor
    num_batches_tracked: Tensor | None

    def __init__(self, bn: Any, *, trainable_affine: bool = False) -> None:
        super().__init__()
        self.num_features = int(bn.num_features)
        self.eps = float(bn.eps)
        self.trainable_affine = trainable_affine
        object.__setattr__(self, "_original", bn)  # not a submodule: its tensors are registered here
        self._requires_grad = {name: p.requires_grad for name, p in bn.named_parameters(recurse=False)}
        for name, param in bn.named_parameters(recurse=False):
            param.requires_grad_(trainable_affine)
            self.register_parameter(name, param)
        for name, buffer in bn.named_buffers(recurse=False):
            self.register_buffer(name, buffer, persistent=name not in bn._non_persistent_buffers_set)
        for key in ("weight", "bias"):
            if key not in self._parameters:
                self.register_parameter(key, None)
        drop, act = bn_act_parts(bn)
        if drop is not None:
            self.drop = drop
        if act is not None:
            self.act = act
        for key in hook_dict_names():  # the user's hook handles keep working on the frozen layer
            setattr(self, key, getattr(bn, key))
        self.train(bn.training)

    @property
    def original(self) -> nn.Module:
        """The layer that was frozen (its tensors are this layer's until :func:`unfreeze_bn`)."""
        original: nn.Module = self.__dict__["_original"]
        return original

    def forward(self, input: Tensor) -> Tensor:
        output = F.batch_norm(
            input, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps
        )
        return after_norm(self, output)

    def original_with_current_state(self) -> nn.Module:
        """The original layer with this layer's current tensors, flags and training mode."""
        bn = self.original
        for name, param in self._parameters.items():
            if param is not None:
                param.requires_grad_(self._requires_grad.get(name, param.requires_grad))
            bn._parameters[name] = param
        bn._buffers.update(self._buffers)
        for name, child in self._modules.items():
            bn._modules[name] = child
        bn.train(self.training)
        return bn

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, trainable_affine={self.trainable_affine}, frozen from {type(self.original).__name__}"


def _freeze(module: nn.Module, name: str, trainable_affine: bool) -> nn.Module:
    if parametrize.is_parametrized(module):
        raise ValueError(
            f"freeze_bn: expected BatchNorm layers without parametrizations, got {name or 'the model'} "
            f"({type(module).__name__}); remove the parametrization first"
        )
    running_mean = getattr(module, "running_mean", None)
    if not isinstance(running_mean, Tensor) or is_lazy(running_mean):
        raise ValueError(
            f"freeze_bn: expected BatchNorm layers with running statistics, got {name or 'the model'} "
            f"({type(module).__name__}) without them (track_running_stats=False or a lazy layer not yet "
            "sized); it would normalize with batch statistics whatever the freeze"
        )
    return FrozenBatchNorm(module, trainable_affine=trainable_affine)


def _swap(
    module: nn.Module,
    change: Callable[[nn.Module, str], nn.Module | None],
    prefix: str,
    memo: dict[int, nn.Module],
) -> nn.Module | None:
    """Replace the children that ``change(child, name)`` maps to a module; returns the root's replacement."""
    root: nn.Module | None = change(module, prefix)
    if root is not None:
        return root
    for key, child in list(module._modules.items()):
        if child is None:
            continue
        name = f"{prefix}.{key}" if prefix else key
        if id(child) not in memo:
            new = _swap(child, change, name, memo)
            memo[id(child)] = new if new is not None else child
        setattr(module, key, memo[id(child)])
    return None


def freeze_bn(model: nn.Module, *, trainable_affine: bool = False, inplace: bool = False) -> nn.Module:
    """Freeze every BatchNorm-family layer: a :class:`FrozenBatchNorm` that ``.train()`` cannot unfreeze.

    Each BatchNorm layer (torch's, timm's ``BatchNormAct2d``, normzoo's of every kind, including those
    inside ``insert_bn``'s layers) becomes a :class:`FrozenBatchNorm` that normalizes with its running
    statistics in training too. Its ``weight`` and ``bias`` are the same ``Parameter`` objects, with
    ``requires_grad=trainable_affine``; its ``state_dict`` keys are BatchNorm's. Freeze before wrapping the
    model in DDP: the parameters that do not train then have ``requires_grad=False``, which DDP skips.
    :func:`unfreeze_bn` undoes it exactly; :func:`~normzoo.fuse_bn` folds frozen layers like BatchNorm.

    Args:
        model: any module.
        trainable_affine: let ``weight`` and ``bias`` train (the statistics stay fixed either way).
        inplace: modify ``model`` itself instead of a deep copy.

    Returns:
        The model with frozen layers (a BatchNorm ``model`` itself gives its frozen layer).

    Raises:
        TypeError: ``model`` is not a plain module (a DDP wrapper, TorchScript, a compiled module).
        ValueError: a layer has no running statistics, or a parametrization.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
        >>> frozen = freeze_bn(net)
        >>> frozen[1]
        FrozenBatchNorm(4, eps=1e-05, trainable_affine=False, frozen from BatchNorm2d)
        >>> x = torch.randn(2, 3, 8, 8)
        >>> torch.equal(frozen.train()(x), net.eval()(x))
        True
        >>> type(unfreeze_bn(frozen)[1]).__name__
        'BatchNorm2d'
    """
    check_model(model, "freeze_bn")
    model = copy_model(model, inplace, "freeze_bn")

    def change(module: nn.Module, name: str) -> nn.Module | None:
        return _freeze(module, name, trainable_affine) if is_batch_norm(module) else None

    return _swap(model, change, "", {}) or model


def unfreeze_bn(model: nn.Module, *, inplace: bool = False) -> nn.Module:
    """Undo :func:`freeze_bn`: every :class:`FrozenBatchNorm` becomes the layer it froze.

    The layer comes back with its class, settings, hooks and ``requires_grad`` flags as they were before
    freezing, the frozen layer's current tensors (what training, ``.to()`` or ``load_state_dict`` did to
    them) and the frozen layer's training mode (that of the model around it).

    Args:
        model: any module.
        inplace: modify ``model`` itself instead of a deep copy.

    Returns:
        The model with BatchNorm layers again.

    Example:
        >>> from torch import nn
        >>> bn = nn.BatchNorm1d(3)
        >>> unfreeze_bn(freeze_bn(bn, inplace=True), inplace=True) is bn
        True
    """
    check_model(model, "unfreeze_bn")
    model = copy_model(model, inplace, "unfreeze_bn")

    def change(module: nn.Module, name: str) -> nn.Module | None:
        return module.original_with_current_state() if isinstance(module, FrozenBatchNorm) else None

    return _swap(model, change, "", {}) or model
