"""The modules that surgery puts into models: :class:`NormAct`, :class:`LazyNorm` and BatchNorm+activation layers."""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.parameter import UninitializedParameter, is_lazy

from ..layers import (
    BatchNorm2d,
    BatchRenorm2d,
    NoisyBatchNorm2d,
    NormSpec,
    get_norm_layer,
    is_batch_norm,
)

__all__ = ["BatchNormAct2d", "BatchRenormAct2d", "LazyNorm", "NoisyBatchNormAct2d", "NormAct"]

#: The size of the throw-away layer that :class:`LazyNorm` builds to learn a norm's parameter names.
_PROBE = 7


class NormAct(nn.Module):
    """``act(norm(x))``: a normalization layer that :func:`~normzoo.insert_bn` placed before an activation.

    An activation *module* is wrapped: the ``NormAct`` takes its place in the parent and holds it as ``act``
    (the same object, so its hooks and flags are kept; ``remove_bn`` puts it back). Where the activation is a
    function call in a ``forward`` (``F.relu(x)``), the ``NormAct`` has ``act=None`` and is called just before
    that call by the rewritten ``forward``.

    Args:
        norm: the normalization layer, or a :class:`LazyNorm` that becomes one at the first forward.
        act: the activation module it precedes, or ``None``.
        channels_last: ``True`` when the features are in the last dimension (the output of a Linear): a
            ``(B, N, C)`` or ``(B, H, W, C)`` tensor is normalized over ``C`` as the ``(B·N, C)`` rows it holds,
            which are the statistics a 1d norm gets from the permuted ``(B, C, N)``. ``None`` until the first
            forward decides it (with a :class:`LazyNorm`).

    Example:
        >>> import torch
        >>> from normzoo import BatchNorm1d
        >>> layer = NormAct(BatchNorm1d(8), torch.nn.ReLU(), channels_last=True)
        >>> layer(torch.randn(4, 5, 8)).shape
        torch.Size([4, 5, 8])
    """

    channels_last: bool | None

    def __init__(
        self, norm: nn.Module, act: nn.Module | None = None, *, channels_last: bool | None = False
    ) -> None:
        super().__init__()
        self.norm = norm
        self.act: nn.Module | None = act  # None is kept as a plain attribute, which keeps it out of the repr
        self.channels_last = channels_last

    @property
    def pending(self) -> bool:
        """Whether the norm is still a :class:`LazyNorm` waiting for the first forward."""
        return isinstance(self.norm, LazyNorm)

    def forward(self, x: Tensor) -> Tensor:
        if isinstance(self.norm, LazyNorm):
            self.norm, self.channels_last = self.norm.materialize(x)
        if self.channels_last and x.dim() > 2:
            y = self.norm(x.reshape(-1, x.shape[-1])).reshape(x.shape)
        else:
            y = self.norm(x)
        return y if self.act is None else self.act(y)

    def extra_repr(self) -> str:
        if self.channels_last is None:
            return "channels_last=pending"
        return "channels_last=True" if self.channels_last else ""


class LazyNorm(nn.Module):
    """Stands for the norm layer of a :class:`NormAct` until the first forward shows its size and dimension.

    At the first forward the tensor reaching the activation decides: ``(N, C)`` gives a 1d layer over ``C``;
    ``(N, C, *spatial)`` a 1d/2d/3d layer over ``C`` (dimension 1); with ``layout="last"`` (the input came
    from a Linear with ``features`` outputs) a tensor whose last dimension is ``features`` is normalized over
    that last dimension by a 1d layer. Until then the layer's per-channel parameters exist as
    ``UninitializedParameter`` objects, which the real layer then adopts: an optimizer built before the first
    forward holds the very parameters that get trained. A checkpoint loads into a pending layer too.

    Args:
        norm: the ``norm=`` specification of :func:`~normzoo.insert_bn` (resolved by ``get_norm_layer``).
        layout: ``"first"`` or ``"last"``: where the features are expected, or ``None`` (unknown).
        features: the expected number of features, or ``None``.
        device: where to create the parameters.
        dtype: their dtype.
    """

    def __init__(
        self,
        norm: NormSpec,
        *,
        layout: str | None = None,
        features: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.spec = norm
        self.layout = layout
        self.features = features
        self.is_batch_norm = False
        self._buffer_names: tuple[str, ...] = ()
        try:
            probe: nn.Module | None = get_norm_layer(norm, 1)(_PROBE)
        except Exception:  # a factory that rejects this size: no placeholders, the layer comes at the forward
            probe = None
        if probe is not None:
            self.is_batch_norm = is_batch_norm(probe)
            for name, param in probe.named_parameters(recurse=False):
                if tuple(param.shape) == (_PROBE,):
                    placeholder = UninitializedParameter(  # type: ignore[call-arg]
                        requires_grad=param.requires_grad, device=device, dtype=dtype or param.dtype
                    )
                    self.register_parameter(name, placeholder)  # type: ignore[arg-type]
            self._buffer_names = tuple(name for name, _ in probe.named_buffers(recurse=False))

    def forward(self, x: Tensor) -> Tensor:
        raise RuntimeError(
            "LazyNorm: expected to be replaced by its NormAct at the first forward, got called directly; "
            "call the NormAct that holds it"
        )

    def _decide(self, x: Tensor) -> tuple[bool, int, int] | None:
        """``(channels_last, features, ndim)`` for the tensor ``x``, or ``None`` if no 1d/2d/3d norm fits."""
        features = self.features
        for param in self._parameters.values():
            if param is not None and not is_lazy(param):  # loaded from a checkpoint
                features = int(param.shape[0])
        dim = x.dim()
        if dim == 2:  # (N, C): both layouts agree
            return self.layout == "last", int(x.shape[1]), 1
        if not 3 <= dim <= 5:
            return None
        first, last = int(x.shape[1]), int(x.shape[-1])
        if self.layout == "last" and features in (None, last):
            return True, last, 1
        if self.layout is None and features is not None and features != first and features == last:
            return True, last, 1
        return False, first, dim - 2

    def materialize(self, x: Tensor) -> tuple[nn.Module, bool]:
        """Build the real layer for the tensor ``x``: returns it and whether it normalizes the last dimension."""
        decision = self._decide(x)
        if decision is None:
            warnings.warn(
                f"insert_bn: an activation received a {x.dim()}D tensor of shape {tuple(x.shape)}; no 1d, 2d "
                "or 3d normalization fits it, so that activation gets none (the NormAct stays an identity)",
                UserWarning,
                stacklevel=3,
            )
            identity = nn.Identity()
            identity.train(self.training)
            return identity, False
        channels_last, features, ndim = decision
        module = get_norm_layer(self.spec, ndim)(features)
        reference = next((p for p in self._parameters.values() if p is not None), None)
        device = reference.device if reference is not None else x.device
        dtype = reference.dtype if reference is not None else (x.dtype if x.is_floating_point() else None)
        module.to(device=device, dtype=dtype)
        with torch.no_grad():
            for name, placeholder in list(self._parameters.items()):
                real = module._parameters.get(name)
                if placeholder is None or real is None:
                    continue
                if is_lazy(placeholder):
                    placeholder.materialize(real.shape)
                    placeholder.copy_(real)
                elif placeholder.shape != real.shape:
                    raise ValueError(
                        f"insert_bn: expected a loaded {name!r} of shape {tuple(real.shape)} for the "
                        f"{type(module).__name__}({features}) that the input of shape {tuple(x.shape)} needs, "
                        f"got shape {tuple(placeholder.shape)}"
                    )
                module.register_parameter(name, placeholder)
            for name, buf in self._buffers.items():
                target = module._buffers.get(name)
                if buf is not None and target is not None:
                    target.copy_(buf)
        module.train(self.training)
        return module, channels_last

    def _save_to_state_dict(self, destination: dict[str, Any], prefix: str, keep_vars: bool) -> None:
        # As torch's LazyModuleMixin: uninitialized parameters are saved as they are.
        for name, param in self._parameters.items():
            if param is not None:
                destination[prefix + name] = param if keep_vars or is_lazy(param) else param.detach()
        for name, buf in self._buffers.items():
            if buf is not None:
                destination[prefix + name] = buf if keep_vars else buf.detach()

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        # A checkpoint of the materialized layer: take the parameter shapes from it and keep its buffers, which
        # the real layer receives at the first forward.
        for name, param in self._parameters.items():
            value = state_dict.get(prefix + name)
            if param is not None and is_lazy(param) and isinstance(value, Tensor) and not is_lazy(value):
                param.materialize(value.shape)
        for name in self._buffer_names:
            value = state_dict.get(prefix + name)
            if isinstance(value, Tensor) and name not in self._buffers:
                self.register_buffer(name, torch.empty_like(value, device=_device_of(self, value)))
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def extra_repr(self) -> str:
        spec = (
            self.spec
            if isinstance(self.spec, str)
            else getattr(self.spec, "__name__", type(self.spec).__name__)
        )
        features = "?" if self.features is None else self.features
        return f"{spec}, features={features}, layout={self.layout}, pending first forward"


def _device_of(module: nn.Module, default: Tensor) -> torch.device:
    for param in module._parameters.values():
        if param is not None:
            return param.device
    return default.device


class _WithAct(nn.Module):
    """Adds the ``drop`` and ``act`` children of timm's ``BatchNormAct2d``, applied after normalizing."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.drop: nn.Module = nn.Identity()
        self.act: nn.Module = nn.Identity()

    def forward(self, input: Tensor) -> Tensor:
        return self.act(self.drop(super().forward(input)))


class BatchNormAct2d(_WithAct, BatchNorm2d):
    """normzoo's :class:`~normzoo.BatchNorm2d` followed by ``drop`` and ``act``, laid out as timm's
    ``BatchNormAct2d`` (the same ``state_dict`` keys): what ``replace_bn`` turns a timm norm+act layer into.

    Example:
        >>> import torch
        >>> layer = BatchNormAct2d(4)
        >>> layer.act = torch.nn.ReLU()
        >>> bool((layer(torch.randn(2, 4, 3, 3)) >= 0).all())
        True
    """


class BatchRenormAct2d(_WithAct, BatchRenorm2d):
    """:class:`~normzoo.BatchRenorm2d` followed by ``drop`` and ``act``, laid out as timm's ``BatchNormAct2d``."""


class NoisyBatchNormAct2d(_WithAct, NoisyBatchNorm2d):
    """:class:`~normzoo.NoisyBatchNorm2d` followed by ``drop`` and ``act``, laid out as timm's ``BatchNormAct2d``."""
