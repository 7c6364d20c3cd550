"""The models that the surgery tests run on, and small helpers shared by the test files."""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import normzoo as nz
from normzoo.surgery import NormAct


class FunctionalResNet(nn.Module):
    """Functional activations (F.relu, torch.sigmoid, x.relu()), a residual add and dropout in forward."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.conv1(x))
        h = torch.sigmoid(h + self.conv2(h))
        h = F.dropout(h, 0.2, self.training)
        return self.fc(h.mean((2, 3))).relu()


class ReusedActivation(nn.Module):
    """One nn.ReLU instance applied after two Linear layers of different widths."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 10)
        self.fc2 = nn.Linear(10, 7)
        self.act = nn.ReLU()
        self.head = nn.Linear(7, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.act(self.fc2(self.act(self.fc1(x)))))


class InplaceNet(nn.Module):
    """In-place activations: an nn.ReLU(inplace=True), x.relu_(), and F.relu(inplace=True) whose result is dropped."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 8)
        self.act = nn.ReLU(inplace=True)
        self.fc2 = nn.Linear(8, 8)
        self.fc3 = nn.Linear(8, 4)

    def forward(self, x: Tensor) -> Tensor:
        h = self.act(self.fc1(x))
        h = self.fc2(h).relu_()
        g = self.fc3(h)
        F.relu(g, inplace=True)  # the result is not used: g itself was changed
        return g * 2


class TransformerBlock(nn.Module):
    """A pre-norm transformer block on (B, N, C) tokens, with an nn.GELU between two Linear layers."""

    def __init__(self, dim: int = 16, heads: int = 2) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(4 * dim, dim)
        self.heads = heads

    def forward(self, x: Tensor) -> Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(self.norm1(x)).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        attn = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c)
        x = x + self.proj(attn)
        return x + self.fc2(self.act(self.fc1(self.norm2(x))))


class DataDependent(nn.Module):
    """A forward with data-dependent control flow, which torch.fx cannot trace."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(5, 6)
        self.act = nn.Tanh()
        self.fc2 = nn.Linear(6, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = self.act(self.fc1(x))
        if h.sum() > 0:
            h = F.relu(h)
        return self.fc2(h)


class Swish(nn.Module):
    """A hand-written activation module (no parameters, no children)."""

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.sigmoid(x)


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 8), nn.Tanh(), nn.Linear(8, 3))


def cnn1d() -> nn.Module:
    return nn.Sequential(
        nn.Conv1d(3, 6, 3, padding=1),
        nn.ReLU(),
        nn.Conv1d(6, 4, 3),
        nn.ELU(),
        nn.Flatten(),
        nn.Linear(4 * 8, 3),
    )


def cnn2d() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(6, 8, 3), nn.SiLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3),
    )  # fmt: skip


def cnn3d() -> nn.Module:
    return nn.Sequential(nn.Conv3d(2, 4, 3, padding=1), nn.LeakyReLU(0.1), nn.Conv3d(4, 3, 1), nn.Sigmoid())


@dataclass
class Case:
    """A model of the corpus, an input for it, and what insert_bn must do to it."""

    build: Callable[[], nn.Module]
    input_shape: tuple[int, ...]
    #: (dotted name of the NormAct, norm class, num_features, channels_last) for every new layer
    expected: list[tuple[str, type[nn.Module], int, bool]]
    #: dotted names of the layers whose bias insert_bn drops
    biases_dropped: list[str]

    def input(self, seed: int = 0) -> Tensor:
        return torch.randn(*self.input_shape, generator=torch.Generator().manual_seed(seed))


CASES: dict[str, Case] = {
    "mlp": Case(mlp, (8, 6), [("1", nz.BatchNorm1d, 12, True), ("3", nz.BatchNorm1d, 8, True)], ["0", "2"]),
    "cnn1d": Case(
        cnn1d, (4, 3, 10), [("1", nz.BatchNorm1d, 6, False), ("3", nz.BatchNorm1d, 4, False)], ["0", "2"]
    ),
    "cnn2d": Case(
        cnn2d, (4, 3, 8, 8), [("1", nz.BatchNorm2d, 6, False), ("4", nz.BatchNorm2d, 8, False)], ["0", "3"]
    ),
    "cnn3d": Case(
        cnn3d, (2, 2, 4, 4, 4), [("1", nz.BatchNorm3d, 4, False), ("3", nz.BatchNorm3d, 3, False)], ["0", "2"]
    ),
    "functional_resnet": Case(
        FunctionalResNet,
        (4, 3, 6, 6),
        [
            ("norm_relu", nz.BatchNorm2d, 8, False),
            ("norm_sigmoid", nz.BatchNorm2d, 8, False),  # after the residual add: conv2 gives the size
            ("norm_relu_1", nz.BatchNorm1d, 5, True),
        ],
        ["conv1", "fc"],  # conv2 feeds the add, not the norm alone
    ),
    "reused_activation": Case(
        ReusedActivation,
        (8, 6),
        [("norm_act", nz.BatchNorm1d, 10, True), ("norm_act_1", nz.BatchNorm1d, 7, True)],
        ["fc1", "fc2"],
    ),
    "inplace": Case(
        InplaceNet,
        (8, 6),
        [
            ("act", nz.BatchNorm1d, 8, True),
            ("norm_relu_", nz.BatchNorm1d, 8, True),
            ("norm_relu", nz.BatchNorm1d, 4, True),
        ],
        ["fc1", "fc2"],  # fc3's output is used after the in-place relu too
    ),
    "transformer_block": Case(TransformerBlock, (2, 5, 16), [("act", nz.BatchNorm1d, 64, True)], ["fc1"]),
}


def norm_acts(model: nn.Module) -> dict[str, NormAct]:
    return {name: module for name, module in model.named_modules() if isinstance(module, NormAct)}


def outputs_equal(a: nn.Module, b: nn.Module, x: Tensor, *, train: bool, atol: float = 0.0) -> bool:
    """Whether two models give the same output on ``x`` (copies: running statistics stay untouched)."""
    a, b = copy.deepcopy(a).train(train), copy.deepcopy(b).train(train)
    with torch.no_grad():
        ya, yb = a(x.clone()), b(x.clone())
    return torch.allclose(ya, yb, atol=atol, rtol=0) if atol else torch.equal(ya, yb)


def train_step(model: nn.Module, x: Tensor) -> float:
    """One SGD step on the sum of squares of the output; returns the loss."""
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    optimizer.zero_grad()
    output = model(x)
    loss = output.float().pow(2).mean()
    loss.backward()
    optimizer.step()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad), (
        "a parameter got no gradient"
    )
    return float(loss.detach())


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm-family layer non-trivial weights and running statistics."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if nz.is_batch_norm(module) and module.running_mean is not None:
                c = module.num_features
                module.running_mean.copy_(torch.rand(c, generator=generator) * 2 - 1)
                module.running_var.copy_(torch.rand(c, generator=generator) + 0.5)
                if module.weight is not None:
                    module.weight.copy_(torch.rand(c, generator=generator) + 0.5)
                    module.bias.copy_(torch.rand(c, generator=generator) - 0.5)
    return model


def hand_statistics(model: nn.Module, inputs: list[Any]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Algorithm 2 by hand: the inputs of each BN layer of the training network, pooled with numpy.

    The training network is emulated with torch's own BN semantics: BN layers in training mode with
    momentum 0 (batch statistics, running statistics unchanged), everything else in eval mode.
    """
    reference = copy.deepcopy(model).eval()
    captured: dict[str, list[np.ndarray]] = {}
    for name, module in reference.named_modules():
        if nz.is_batch_norm(module):
            module.train()
            module.momentum = 0.0

            def hook(_: nn.Module, args: tuple[torch.Tensor, ...], name: str = name) -> None:
                captured.setdefault(name, []).append(args[0].detach().double().numpy())

            module.register_forward_pre_hook(hook)
    with torch.no_grad():
        for x in inputs:
            reference(x)
    result = {}
    for name, arrays in captured.items():
        counts = np.array([a.size / a.shape[1] for a in arrays])
        axes = [(0, *range(2, a.ndim)) for a in arrays]
        means = np.stack([a.mean(axis=ax) for a, ax in zip(arrays, axes, strict=True)])
        variances = np.stack(
            [a.var(axis=ax) for a, ax in zip(arrays, axes, strict=True)]
        )  # biased, per batch
        mean = (counts[:, None] * means).sum(0) / counts.sum()
        var = (counts[:, None] * variances).sum(0) / (counts - 1).sum()
        result[name] = (mean, var)
    return result


def assert_matches(model: nn.Module, expected: dict[str, tuple[np.ndarray, np.ndarray]]) -> None:
    assert expected
    for name, (mean, var) in expected.items():
        layer = model.get_submodule(name)
        np.testing.assert_allclose(
            layer.running_mean.double().numpy(), mean, rtol=1e-5, atol=1e-6, err_msg=name
        )
        np.testing.assert_allclose(
            layer.running_var.double().numpy(), var, rtol=1e-5, atol=1e-6, err_msg=name
        )
