"""Small models and data shared by the ecosystem tests: one network per BatchNorm kind, same weights."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

import normzoo as nz

#: torch's BatchNorm2d (the reference) and every normzoo 2d kind.
KINDS: dict[str, type[nn.Module]] = {
    "torch": nn.BatchNorm2d,
    "batchnorm": nz.BatchNorm2d,
    "renorm": nz.BatchRenorm2d,
    "noisy": nz.NoisyBatchNorm2d,
}
NZ_KINDS = [kind for kind in KINDS if kind != "torch"]


def small_net(norm: Callable[[int], nn.Module] = nn.BatchNorm2d, seed: int = 0) -> nn.Sequential:
    """conv-BN-ReLU twice, then a linear head; the same weights for every ``norm`` (same seed)."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1, bias=False),
        norm(4),
        nn.ReLU(),
        nn.Conv2d(4, 6, 3, bias=False),
        norm(6),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(6, 2),
    )


def net_pair(kind: str, seed: int = 0) -> tuple[nn.Sequential, nn.Sequential]:
    """``(torch's model, the model with normzoo's kind)``: the same weights and statistics."""
    reference = small_net(nn.BatchNorm2d, seed)
    model = small_net(KINDS[kind], seed)
    model.load_state_dict(reference.state_dict())
    return reference, model


def images(n: int = 8, seed: int = 0, size: int = 6) -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=gen) * 2 + 1


def batches(count: int = 4, n: int = 8, seed: int = 0) -> list[Tensor]:
    return [images(n, seed + i) for i in range(count)]


def bn_layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if nz.is_batch_norm(m)]


def quiet(model: nn.Module) -> nn.Module:
    """Noisy layers without noise, so that training outputs can be compared with torch's BatchNorm."""
    for m in model.modules():
        if isinstance(m, nz.layers.noisy._NoisyBatchNorm):
            m.mean_range, m.std_range = 0.0, (0.0, 0.0)
    return model
