"""PreciseBN in a real Trainer: Algorithm 2 computed by hand, every BN kind, RNG and flags untouched, SWA,
and a 2-process DDP run (gloo) whose ranks agree with a single-process recompute on the union of the data."""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback, StochasticWeightAveraging
from monitor_helpers import TinyModule, TinyModuleWithVal, loader, make_trainer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import normzoo as nz
from normzoo.lightning.callbacks import PreciseBN

KINDS = [nn.BatchNorm1d, nz.BatchNorm1d, nz.BatchRenorm1d, nz.NoisyBatchNorm1d]


def _model(kind: type[nn.Module]) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(8, 16),
        kind(16),
        nn.ReLU(),
        nn.Dropout(0.3),
        nn.Linear(16, 16),
        kind(16),
        nn.ReLU(),
        nn.Linear(16, 3),
    )


def _bns(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if nz.is_batch_norm(m)]


def algorithm2(model: nn.Module, batches: list[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Ioffe & Szegedy's Algorithm 2 by hand: every BN layer becomes torch's BatchNorm1d with the same affine
    parameters and no running statistics (it normalizes with the batch's in eval mode too: no dropout, no
    noise), and E[x] is the mean of its batch means, Var[x] = m/(m-1) E[σ²_B]."""
    model = copy.deepcopy(model).eval()
    seen: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    for name, bn in [(n, m) for n, m in model.named_modules() if nz.is_batch_norm(m)]:
        plain = nn.BatchNorm1d(bn.num_features, eps=bn.eps, track_running_stats=False)
        plain.load_state_dict({"weight": bn.weight, "bias": bn.bias})
        plain.register_forward_pre_hook(
            lambda mod, args, name=name: seen.setdefault(name, []).append(
                (args[0].mean(0), args[0].var(0, correction=0))
            )
        )
        model.set_submodule(name, plain)
    with torch.no_grad():
        for x in batches:
            model(x)
    m = len(batches[0])
    return [
        (torch.stack([s[0] for s in stats]).mean(0), torch.stack([s[1] for s in stats]).mean(0) * m / (m - 1))
        for stats in seen.values()
    ]


class _State(Callback):
    """The random state, the training flags and the BN statistics whenever a validation starts."""

    def __init__(self) -> None:
        self.seen: list[dict[str, Any]] = []

    def on_validation_start(self, trainer: Any, pl_module: Any) -> None:
        self.seen.append(
            {
                "rng": torch.get_rng_state(),
                "loader_rng": getattr(trainer.train_dataloader.generator, "get_state", list)(),
                "flags": [m.training for m in pl_module.modules()],
                "stats": [torch.cat([b.running_mean, b.running_var]).clone() for b in _bns(pl_module)],
            }
        )


@pytest.mark.parametrize("kind", KINDS, ids=lambda k: f"{k.__module__.split('.')[0]}.{k.__name__}")
def test_statistics_before_validation_and_at_the_end_are_algorithm_2(tmp_path, kind: type[nn.Module]) -> None:
    data = loader(n=96, batch_size=16)
    before, after = _State(), _State()
    precise = PreciseBN(num_batches=None)
    module = TinyModuleWithVal(_model(kind))
    trainer = make_trainer(tmp_path, [before, precise, after], max_steps=-1, max_epochs=2)
    trainer.fit(module, data, loader(n=32))
    assert precise.updates == [6, 12, 12]  # before each of the two validations, and at the end
    for b, a in zip(before.seen, after.seen, strict=True):
        assert not all(torch.equal(x, y) for x, y in zip(b["stats"], a["stats"], strict=True))
    batches = [x for x, _ in data]
    for layer, (mean, var) in zip(_bns(module), algorithm2(module, batches), strict=True):
        torch.testing.assert_close(layer.running_mean, mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(layer.running_var, var, rtol=1e-5, atol=1e-6)
        assert int(layer.num_batches_tracked) == 12  # still the count of training steps


def test_random_state_and_training_flags_are_left_as_they_were(tmp_path) -> None:
    data = loader(n=96, batch_size=16).dataset
    shuffled = DataLoader(data, batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(1))
    before, after = _State(), _State()
    precise = PreciseBN(num_batches=3)
    module = TinyModuleWithVal(_model(nz.NoisyBatchNorm1d))
    trainer = make_trainer(tmp_path, [before, precise, after], max_steps=-1, max_epochs=2)
    trainer.fit(module, shuffled, loader(n=32))
    assert len(before.seen) == 2
    for b, a in zip(before.seen, after.seen, strict=True):
        assert torch.equal(b["rng"], a["rng"])
        assert torch.equal(b["loader_rng"], a["loader_rng"])
        assert b["flags"] == a["flags"]
        assert not all(torch.equal(x, y) for x, y in zip(b["stats"], a["stats"], strict=True))


def test_with_stochastic_weight_averaging_the_statistics_are_those_of_the_averaged_weights(tmp_path) -> None:
    swa = StochasticWeightAveraging(swa_lrs=0.05, swa_epoch_start=2)
    precise = PreciseBN(num_batches=None, before_validation=False)
    module = TinyModule(_model(nz.BatchNorm1d))
    trainer = make_trainer(tmp_path, [swa, precise], max_steps=-1, max_epochs=4)
    trainer.fit(module, loader(n=64, batch_size=16))
    assert precise.updates == [trainer.global_step]
    assert swa._model_contains_batch_norm  # SWA made its own BN pass (training mode), PreciseBN came after
    batches = [x for x, _ in loader(n=64, batch_size=16)]
    for layer, (mean, var) in zip(_bns(module), algorithm2(module, batches), strict=True):
        torch.testing.assert_close(
            layer.running_mean, mean, rtol=1e-5, atol=1e-6
        )  # ... the statistics theirs
        torch.testing.assert_close(layer.running_var, var, rtol=1e-5, atol=1e-6)
    assert all(m.momentum == 0.1 for m in _bns(module))

    wrong_order = [PreciseBN(), StochasticWeightAveraging(swa_lrs=0.05)]
    with pytest.raises(ValueError, match="PreciseBN: expected to come after StochasticWeightAveraging"):
        make_trainer(tmp_path, wrong_order, max_epochs=1).fit(TinyModule(_model(nz.BatchNorm1d)), loader())


def test_arguments_and_several_training_loaders(tmp_path) -> None:
    with pytest.raises(ValueError, match="PreciseBN: expected num_batches to be a positive int, got 0"):
        PreciseBN(num_batches=0)
    with pytest.raises(ValueError, match="before_validation or at_train_end"):
        PreciseBN(before_validation=False, at_train_end=False)

    class TwoLoaders(TinyModule):
        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            return super().training_step(batch["a"], batch_idx)

    trainer = make_trainer(tmp_path, [PreciseBN()], max_steps=1)
    with pytest.raises(
        ValueError, match="PreciseBN: expected one training dataloader, got dict; pass dataloader="
    ):
        trainer.fit(TwoLoaders(_model(nz.BatchNorm1d)), {"a": loader(), "b": loader()})


# -- DDP ---------------------------------------------------------------------------------------------------
N, BATCH = 32, 4


def _ddp_data() -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(N, 8, generator=g) * 3 + 1, torch.randint(0, 3, (N,), generator=g))


class _Saving(TinyModule):
    def __init__(self, out_dir: str) -> None:
        super().__init__(_model(nz.BatchNorm1d))
        self.out_dir = out_dir

    def on_train_end(self) -> None:  # after the callbacks' on_train_end: PreciseBN has run
        state = {k: v.clone() for k, v in self.model.state_dict().items()}
        batches = [x for x, _ in self.trainer.train_dataloader]  # this rank's shard
        torch.save((state, batches), os.path.join(self.out_dir, f"rank{dist.get_rank()}.pt"))


@pytest.mark.skipif(
    not dist.is_available() or "fork" not in torch.multiprocessing.get_all_start_methods(),
    reason="needs fork",
)
@pytest.mark.timeout(300)
def test_ddp_ranks_hold_the_statistics_of_the_union_of_their_data(tmp_path: Path) -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        pytest.skip("this process has initialized CUDA, so Lightning cannot fork it")
    trainer = make_trainer(
        tmp_path,
        [PreciseBN(num_batches=None, before_validation=False)],
        strategy="ddp_fork",
        devices=2,
        max_steps=2,
        use_distributed_sampler=True,
    )
    trainer.fit(_Saving(str(tmp_path)), DataLoader(_ddp_data(), batch_size=BATCH))
    (states, shards) = zip(*[torch.load(tmp_path / f"rank{r}.pt") for r in range(2)], strict=True)
    for key in states[0]:
        assert torch.equal(states[0][key], states[1][key]), key  # every rank holds the same numbers
    batches = [*shards[0], *shards[1]]  # the union of the ranks' batches, in one process
    assert len(batches) == N // BATCH
    model = _model(nz.BatchNorm1d)
    model.load_state_dict(states[0])
    reference = algorithm2(model, batches)
    single = nz.recompute_bn_stats(copy.deepcopy(model), batches)
    for i, (layer, (mean, var)) in enumerate(zip(_bns(model), reference, strict=True)):
        torch.testing.assert_close(layer.running_mean, mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(layer.running_var, var, rtol=1e-5, atol=1e-6)
        assert torch.equal(layer.running_mean, _bns(single)[i].running_mean)
        assert torch.equal(layer.running_var, _bns(single)[i].running_var)
    with pytest.raises(AssertionError):  # one rank's shard alone gives other numbers
        torch.testing.assert_close(algorithm2(model, shards[0])[0][1], reference[0][1])
