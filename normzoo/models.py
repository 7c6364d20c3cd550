"""The networks of the seed experiments: an MLP and a deep CNN (1d or 2d), with or without normalization.

Both builders return a flat :class:`torch.nn.Sequential` whose children have readable names (``fc1``,
``norm1``, ``act1``, ``drop1``, ..., ``head`` for the MLP; ``conv1``, ``norm1``, ``act1``, ``pool1``, ...,
``gap``, ``flatten``, ``head`` for the CNN), so per-layer diagnostics read naturally and
:func:`normzoo.insert_bn` / :func:`normzoo.remove_bn` can work on them.

Each hidden layer is ``linear/conv -> norm -> activation -> dropout``: the normalization sits between the
affine map and its nonlinearity, as in Ioffe & Szegedy (2015) and the seed studies, and a normalized layer
has no bias (the norm's shift ``β`` replaces it). The head is a plain linear layer returning logits.

Example:
    >>> import torch
    >>> mlp = build_mlp(64, 10, norm="batchnorm")
    >>> mlp(torch.randn(8, 64)).shape
    torch.Size([8, 10])
    >>> cnn = build_cnn(1, 10, norm="renorm")
    >>> cnn(torch.randn(8, 1, 28, 28)).shape
    torch.Size([8, 10])
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

from torch import nn

from ._activations import ACTIVATION_MODULES, ACTIVATIONS, get_activation, kaiming_nonlinearity
from .layers import NormSpec, get_norm_layer

__all__ = [
    "ACTIVATIONS",
    "INITS",
    "build_cnn",
    "build_mlp",
    "count_parameters",
    "get_activation",
    "init_weights",
    "kaiming_nonlinearity",
]

#: Weight initializations accepted by :func:`init_weights`.
INITS = ("kaiming", "xavier", "normal", "default")


def _find_activation(model: nn.Module) -> nn.Module | None:
    for module in model.modules():
        if isinstance(module, ACTIVATION_MODULES):
            return module
    return None


def init_weights(
    model: nn.Module,
    init: str = "kaiming",
    init_std: float = 1.0,
    *,
    nonlinearity: str | type[nn.Module] | nn.Module | None = None,
) -> nn.Module:
    """Initialize every conv and linear layer of ``model`` in place (and return it); biases become zero.

    Args:
        model: any module; its ``nn.Linear`` and ``nn.Conv1d/2d/3d`` layers are initialized, normalization
            layers keep their own initialization (``γ = 1``, ``β = 0``).
        init: ``"kaiming"`` (He et al. 2015: normal, fan-in, ``std = gain / sqrt(fan_in)`` with the gain of
            the network's activation: ``sqrt(2)`` for ReLU, ``sqrt(2 / (1 + a²))`` for leaky ReLU, ``5/3``
            for tanh, 1 for sigmoid), ``"xavier"`` (Glorot & Bengio 2010's normalized initialization:
            uniform with ``std = sqrt(2 / (fan_in + fan_out))``), ``"normal"`` (``N(0, init_std²)``, the
            seed's "N(0, 1) initialization" with the default ``init_std``), or ``"default"`` (leave torch's).
        init_std: the standard deviation of ``"normal"``.
        nonlinearity: the activation that Kaiming's gain is computed for; ``None`` uses the first activation
            module found in ``model`` (ReLU's gain when there is none).

    Example:
        >>> net = init_weights(nn.Sequential(nn.Linear(400, 300), nn.Tanh()), "kaiming")
        >>> round(float(net[0].weight.detach().std()) * 20 / (5 / 3), 1)   # std = gain / sqrt(fan_in)
        1.0
    """
    key = init.lower()
    if key not in INITS:
        raise ValueError(f"unknown init {init!r}; expected one of {', '.join(repr(i) for i in INITS)}")
    if key == "normal" and not init_std > 0:
        raise ValueError(f"init_std must be positive, got {init_std}")
    if key == "default":
        return model
    gain_name, slope = kaiming_nonlinearity(
        nonlinearity if nonlinearity is not None else _find_activation(model)
    )
    for module in model.modules():
        if not isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            continue
        if key == "kaiming":
            nn.init.kaiming_normal_(module.weight, a=slope, mode="fan_in", nonlinearity=gain_name)  # type: ignore[arg-type]
        elif key == "xavier":
            nn.init.xavier_uniform_(module.weight)
        else:
            nn.init.normal_(module.weight, 0.0, init_std)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    return model


def _hidden_block(
    layers: OrderedDict[str, nn.Module],
    index: int,
    affine: nn.Module,
    width: int,
    norm: NormSpec | None,
    ndim: int,
    activation: type[nn.Module],
    dropout: float,
) -> None:
    kind = "conv" if isinstance(affine, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) else "fc"
    layers[f"{kind}{index}"] = affine
    if norm is not None:
        layers[f"norm{index}"] = get_norm_layer(norm, ndim)(width)
    layers[f"act{index}"] = activation()
    if dropout > 0:
        layers[f"drop{index}"] = nn.Dropout(dropout)


def _check_common(num_classes: int, dropout: float) -> None:
    if num_classes < 1:
        raise ValueError(f"num_classes must be positive, got {num_classes}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")


def build_mlp(
    in_features: int,
    num_classes: int,
    hidden: Sequence[int] = (100, 100, 100),
    *,
    norm: NormSpec | None = None,
    activation: str | type[nn.Module] = "relu",
    init: str = "kaiming",
    init_std: float = 1.0,
    dropout: float = 0.0,
) -> nn.Sequential:
    """A multilayer perceptron: ``flatten, [fc -> norm -> activation -> dropout] * len(hidden), head``.

    The defaults are the MNIST network of the second seed study and of Ioffe & Szegedy (2015, section 4.1):
    three fully-connected hidden layers of 100 units. Inputs of any shape ``(N, ...)`` are flattened first.

    Args:
        in_features: number of input features (``C·H·W`` for images).
        num_classes: number of output logits.
        hidden: widths of the hidden layers.
        norm: ``None`` for the vanilla network, or a normalization (``"batchnorm"``, ``"renorm"``,
            ``"noisy"``, ``"torch"``, a class or a factory) placed before every hidden activation.
        activation: an activation name (see :func:`get_activation`) or class.
        init: ``"kaiming"``, ``"xavier"``, ``"normal"`` or ``"default"`` (see :func:`init_weights`).
        init_std: standard deviation of the ``"normal"`` initialization.
        dropout: dropout probability after each hidden activation (0 for none).

    Example:
        >>> build_mlp(64, 10, hidden=(32,), norm="batchnorm", activation="sigmoid", dropout=0.5)
        Sequential(
          (flatten): Flatten(start_dim=1, end_dim=-1)
          (fc1): Linear(in_features=64, out_features=32, bias=False)
          (norm1): BatchNorm1d(32, eps=1e-05, momentum=0.1, affine=True, track_running_stats=True)
          (act1): Sigmoid()
          (drop1): Dropout(p=0.5, inplace=False)
          (head): Linear(in_features=32, out_features=10, bias=True)
        )
    """
    _check_common(num_classes, dropout)
    if in_features < 1 or any(w < 1 for w in hidden):
        raise ValueError(
            f"in_features and hidden widths must be positive, got {in_features}, {tuple(hidden)}"
        )
    act = get_activation(activation)
    layers: OrderedDict[str, nn.Module] = OrderedDict(flatten=nn.Flatten())
    width = in_features
    for i, out in enumerate(hidden, start=1):
        _hidden_block(layers, i, nn.Linear(width, out, bias=norm is None), out, norm, 1, act, dropout)
        width = out
    layers["head"] = nn.Linear(width, num_classes)
    return init_weights(nn.Sequential(layers), init, init_std, nonlinearity=act)  # type: ignore[return-value]


_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_POOL = {1: nn.MaxPool1d, 2: nn.MaxPool2d, 3: nn.MaxPool3d}
_GAP = {1: nn.AdaptiveAvgPool1d, 2: nn.AdaptiveAvgPool2d, 3: nn.AdaptiveAvgPool3d}


def build_cnn(
    in_channels: int,
    num_classes: int,
    *,
    ndim: int = 2,
    channels: Sequence[int] = (32, 32, 64, 64, 128, 128),
    pool_every: int = 2,
    kernel_size: int = 3,
    norm: NormSpec | None = None,
    activation: str | type[nn.Module] = "relu",
    init: str = "kaiming",
    init_std: float = 1.0,
    dropout: float = 0.0,
) -> nn.Sequential:
    """A deep VGG-style CNN for small images or signals, the network of the seed study at small scale.

    ``[conv -> norm -> activation -> dropout]`` per entry of ``channels`` (``kernel_size`` with "same"
    padding), a 2x max pooling after every ``pool_every`` convolutions, then global average pooling and a
    linear head. The default six 3x3 convolutions in three stages of 32, 64 and 128 channels follow the
    seed's description (a deep CNN, BatchNorm before every ReLU, Kaiming initialization) at a size that
    trains on a CPU; the exact architecture of Schilling's thesis is not reproduced. Pooling rounds up
    (``ceil_mode``), so any depth works on inputs as small as 8x8 digits (8 -> 4 -> 2 -> 1), 28x28 MNIST
    (28 -> 14 -> 7 -> 4) or 32x32 CIFAR/SVHN (32 -> 16 -> 8 -> 4).

    Args:
        in_channels: input channels (1 for MNIST and digits, 3 for CIFAR and SVHN).
        num_classes: number of output logits.
        ndim: 2 for images ``(N, C, H, W)``, 1 for signals ``(N, C, L)``, 3 for volumes.
        channels: output channels of each convolution.
        pool_every: convolutions per stage; ``0`` for no pooling before the global average.
        kernel_size: the (odd) kernel size of every convolution.
        norm: ``None`` for the vanilla network, or a normalization (``"batchnorm"``, ``"renorm"``,
            ``"noisy"``, ``"torch"``, a class or a factory) placed before every hidden activation.
        activation: an activation name (see :func:`get_activation`) or class.
        init: ``"kaiming"``, ``"xavier"``, ``"normal"`` or ``"default"`` (see :func:`init_weights`).
        init_std: standard deviation of the ``"normal"`` initialization.
        dropout: dropout probability after each hidden activation (0 for none).

    Example:
        >>> import torch
        >>> net = build_cnn(1, 10, ndim=1, channels=(8, 16), norm="noisy")
        >>> [name for name, _ in net.named_children()]
        ['conv1', 'norm1', 'act1', 'conv2', 'norm2', 'act2', 'pool2', 'gap', 'flatten', 'head']
        >>> net(torch.randn(4, 1, 64)).shape
        torch.Size([4, 10])
    """
    _check_common(num_classes, dropout)
    if ndim not in _CONV:
        raise ValueError(f"ndim must be 1, 2 or 3, got {ndim}")
    if in_channels < 1 or not channels or any(c < 1 for c in channels):
        raise ValueError(
            f"in_channels and channels must be positive and non-empty, got {in_channels}, {channels}"
        )
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be a positive odd number, got {kernel_size}")
    if pool_every < 0:
        raise ValueError(f"pool_every must be >= 0, got {pool_every}")
    act = get_activation(activation)
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    width = in_channels
    for i, out in enumerate(channels, start=1):
        conv = _CONV[ndim](width, out, kernel_size, padding=kernel_size // 2, bias=norm is None)
        _hidden_block(layers, i, conv, out, norm, ndim, act, dropout)
        if pool_every and i % pool_every == 0:
            layers[f"pool{i}"] = _POOL[ndim](2, ceil_mode=True)
        width = out
    layers["gap"] = _GAP[ndim](1)
    layers["flatten"] = nn.Flatten()
    layers["head"] = nn.Linear(width, num_classes)
    return init_weights(nn.Sequential(layers), init, init_std, nonlinearity=act)  # type: ignore[return-value]


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters of ``model``.

    Example:
        >>> count_parameters(nn.Linear(3, 2))
        8
    """
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
