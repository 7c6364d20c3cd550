"""insert_bn on the model corpus: where the layers go, their sizes, bias removal, laziness, errors."""

from __future__ import annotations

import copy
import functools
import io
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import normzoo as nz
from normzoo.surgery import LazyNorm, NormAct

from ._corpus import (
    CASES,
    DataDependent,
    InplaceNet,
    ReusedActivation,
    Swish,
    TransformerBlock,
    cnn2d,
    mlp,
    norm_acts,
    outputs_equal,
    train_step,
)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.mark.parametrize("case_name", sorted(CASES))
def test_layers_go_before_every_activation(case_name: str) -> None:
    case = CASES[case_name]
    model = case.build()
    inserted = nz.insert_bn(model)
    found = norm_acts(inserted)
    assert sorted(found) == sorted(name for name, *_ in case.expected)
    for name, cls, features, channels_last in case.expected:
        layer = found[name]
        assert type(layer.norm) is cls, name
        assert layer.norm.num_features == features, name
        assert layer.channels_last is channels_last, name
    # the originals are untouched (a deep copy was modified)
    assert not norm_acts(model)


@pytest.mark.parametrize("case_name", sorted(CASES))
def test_example_input_gives_the_same_layers(case_name: str) -> None:
    case = CASES[case_name]
    inserted = nz.insert_bn(case.build(), example_input=case.input())
    found = norm_acts(inserted)
    assert sorted(found) == sorted(name for name, *_ in case.expected)
    for name, cls, features, channels_last in case.expected:
        assert type(found[name].norm) is cls
        assert found[name].norm.num_features == features
        assert found[name].channels_last is channels_last
    for name in case.biases_dropped:
        assert inserted.get_submodule(name).bias is None, name


@pytest.mark.parametrize("case_name", sorted(CASES))
def test_training_step_runs(case_name: str) -> None:
    case = CASES[case_name]
    model = nz.insert_bn(case.build())
    x = case.input()
    loss = train_step(model, x)
    assert loss == loss  # not NaN
    model.eval()
    assert model(x).shape == case.build()(x).shape


@pytest.mark.parametrize("case_name", sorted(CASES))
def test_remove_after_insert_is_the_original_function(case_name: str) -> None:
    case = CASES[case_name]
    model = case.build()
    round_trip = nz.remove_bn(nz.insert_bn(model, remove_bias=False))
    x = case.input()
    assert outputs_equal(model, round_trip, x, train=False)
    if case_name != "functional_resnet":  # dropout in training mode draws different masks
        assert outputs_equal(model, round_trip, x, train=True)
    # and it is the original model again, module for module
    assert [type(m) for m in round_trip.modules()] == [type(m) for m in model.modules()]
    assert round_trip.state_dict().keys() == model.state_dict().keys()
    assert "forward" not in round_trip.__dict__


@pytest.mark.parametrize("case_name", sorted(CASES))
def test_remove_bias_does_not_change_training_outputs(case_name: str) -> None:
    case = CASES[case_name]
    model = case.build()
    with_bias = nz.insert_bn(model, remove_bias=False)
    without_bias = nz.insert_bn(model)
    for name in case.biases_dropped:
        assert without_bias.get_submodule(name).bias is None, name
        assert with_bias.get_submodule(name).bias is not None, name
    for name, module in without_bias.named_modules():
        if isinstance(module, (nn.Linear, nn.modules.conv._ConvNd)) and name not in case.biases_dropped:
            assert module.bias is not None, f"{name} lost its bias"
    assert outputs_equal(with_bias, without_bias, case.input(), train=True, atol=1e-5) or case_name == (
        "functional_resnet"
    )


def test_transformer_tokens_are_normalized_over_channels() -> None:
    model = nz.insert_bn(TransformerBlock(), remove_bias=False)
    x = torch.randn(3, 7, 16)
    model.train()
    captured = []
    model.act.norm.register_forward_pre_hook(lambda m, args: captured.append(args[0].detach()))
    model(x)
    (rows,) = captured
    assert rows.shape == (21, 64)  # (B·N, C): statistics over batch and tokens, per channel
    assert torch.allclose(model.act.norm.running_mean, 0.1 * rows.mean(0), atol=1e-6)


def test_reused_activation_gets_one_layer_per_call() -> None:
    model = nz.insert_bn(ReusedActivation())
    assert isinstance(model.act, nn.ReLU)  # the shared module itself stays
    assert model.norm_act.norm.num_features == 10
    assert model.norm_act_1.norm.num_features == 7
    code = model.forward.code(True)
    assert code.index("self.norm_act(") < code.index("self.act(") < code.index("self.norm_act_1(")


def test_inplace_activations_keep_their_semantics() -> None:
    model = InplaceNet()
    inserted = nz.insert_bn(model, remove_bias=False)
    x = torch.randn(8, 6)
    inserted.train()
    out = inserted(x)
    out.sum().backward()  # in-place ops after the norm layers do not break autograd

    def bn(t: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(t, None, None, training=True)

    h = F.relu(bn(model.fc1(x)))
    h = F.relu(bn(model.fc2(h)))
    expected = F.relu(bn(model.fc3(h))) * 2  # g * 2 saw the in-place relu, so it sees it after the norm too
    assert torch.allclose(out, expected, atol=1e-5)


def test_already_normalized_activations_get_none() -> None:
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.GroupNorm(2, 4), nn.Dropout(),
        nn.GELU(), nn.Conv2d(4, 4, 1), nn.ReLU(),
    )  # fmt: skip
    inserted = nz.insert_bn(model)
    assert list(norm_acts(inserted)) == ["8"]
    with pytest.warns(UserWarning, match="already follows a normalization layer"):
        twice = nz.insert_bn(inserted)
    assert list(norm_acts(twice)) == ["8"]


def test_inserting_twice_into_a_rewritten_forward_adds_nothing() -> None:
    once = nz.insert_bn(CASES["functional_resnet"].build())
    with pytest.warns(UserWarning, match="nothing was inserted"):
        twice = nz.insert_bn(once)
    assert sorted(norm_acts(twice)) == sorted(norm_acts(once))


def test_residual_sum_after_a_norm_counts_as_normalized() -> None:
    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 3, padding=1)
            self.bn = nn.BatchNorm2d(4)
            self.act = nn.ReLU()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.act(self.bn(self.conv(x)) + x)

    with pytest.warns(UserWarning, match="nothing was inserted"):
        assert not norm_acts(nz.insert_bn(Block()))
    vanilla = nz.insert_bn(nz.remove_bn(Block()))
    assert vanilla.act.norm.num_features == 4
    assert vanilla.conv.bias is not None  # the conv feeds the sum, not the norm alone


def test_untraceable_forward_keeps_module_activations_and_warns() -> None:
    with pytest.warns(
        UserWarning, match=r"F\.relu in DataDependent\.forward.*could not trace it.*control flow"
    ):
        model = nz.insert_bn(DataDependent())
    assert isinstance(model.act, NormAct)
    assert isinstance(model.act.norm, LazyNorm)
    assert model.act.norm.features == 6
    assert model.act.norm.layout == "last"
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)  # before the first forward
    weight = model.act.norm.weight
    x = torch.randn(8, 5)
    model(x).sum().backward()
    optimizer.step()
    assert isinstance(model.act.norm, nz.BatchNorm1d)
    assert model.act.norm.num_features == 6
    assert model.act.norm.weight is weight
    assert not torch.equal(weight, torch.ones(6))


def test_pending_layers_load_a_checkpoint() -> None:
    with pytest.warns(UserWarning, match="could not trace"):
        trained = nz.insert_bn(DataDependent(), example_input=torch.randn(4, 5))
    trained.train()
    trained(torch.randn(8, 5))
    buffer = io.BytesIO()
    torch.save(trained.state_dict(), buffer)
    buffer.seek(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fresh = nz.insert_bn(DataDependent())
    fresh.load_state_dict(torch.load(buffer))
    x = torch.randn(4, 5)
    trained.eval()
    fresh.eval()
    assert torch.equal(trained(x), fresh(x))


def test_example_input_sizes_from_the_tensor() -> None:
    with pytest.warns(UserWarning, match="could not trace"):
        model = nz.insert_bn(DataDependent(), example_input=torch.randn(4, 5))
    assert type(model.act.norm) is nz.BatchNorm1d
    assert model.act.channels_last is True


def test_example_input_as_tuple_and_dict() -> None:
    class TwoInputs(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(3, 4)
            self.b = nn.Linear(5, 4)
            self.act = nn.ReLU()

        def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return self.act(self.a(x) + self.b(y))

    inputs = (torch.randn(4, 3), torch.randn(4, 5))
    by_tuple = nz.insert_bn(TwoInputs(), example_input=inputs)
    by_dict = nz.insert_bn(TwoInputs(), example_input={"x": inputs[0], "y": inputs[1]})
    assert by_tuple.act.norm.num_features == by_dict.act.norm.num_features == 4


def test_wrong_example_input_names_the_failing_module() -> None:
    with pytest.raises(
        ValueError,
        match=r"expected example_input of shape \(4, 7\) to run through Sequential, got RuntimeError in module '0' \(Linear\)",
    ):
        nz.insert_bn(mlp(), example_input=torch.randn(4, 7))
    model = mlp()
    with pytest.raises(ValueError, match="example_input"):
        nz.insert_bn(model, example_input=torch.randn(4, 7), inplace=True)
    assert not norm_acts(model)  # nothing was changed before the error


def test_norm_kinds() -> None:
    for norm, cls in [
        ("renorm", nz.BatchRenorm2d),
        ("noisy", nz.NoisyBatchNorm2d),
        ("torch", nn.BatchNorm2d),
        (nz.BatchRenorm1d, nz.BatchRenorm2d),
        (functools.partial(nz.BatchRenorm2d, r_max=2.0), nz.BatchRenorm2d),
    ]:
        model = nz.insert_bn(cnn2d(), norm)
        assert type(model[1].norm) is cls, norm
    model = nz.insert_bn(cnn2d(), functools.partial(nz.BatchRenorm2d, r_max=2.0))
    assert model[1].norm.r_max == 2.0
    model = nz.insert_bn(mlp(), lambda c: nn.LayerNorm(c))
    assert isinstance(model[1].norm, nn.LayerNorm)
    assert model[0].bias is not None  # LayerNorm over features does not cancel a per-feature bias


def test_activations_argument_overrides_the_defaults() -> None:
    model = nz.insert_bn(mlp(), activations=[nn.Tanh])
    assert list(norm_acts(model)) == ["3"]
    model = nz.insert_bn(CASES["functional_resnet"].build(), activations=[torch.sigmoid])
    assert list(norm_acts(model)) == ["norm_sigmoid"]
    model = nz.insert_bn(CASES["functional_resnet"].build(), activations=["relu"])
    assert list(norm_acts(model)) == ["norm_relu_1"]
    with pytest.raises(ValueError, match=r"not a torch\.Tensor method"):
        nz.insert_bn(mlp(), activations=["no_such_method"])
    with pytest.raises(TypeError, match="activations"):
        nz.insert_bn(mlp(), activations=[3])


def test_hand_written_activation_module_is_wrapped() -> None:
    model = nz.insert_bn(nn.Sequential(nn.Linear(4, 6), Swish(), nn.Linear(6, 2)))
    assert isinstance(model[1], NormAct)
    assert isinstance(model[1].act, Swish)
    assert model[1].norm.num_features == 6


def test_flags_device_dtype_grad_and_hooks_are_kept() -> None:
    model = mlp().double().eval()
    model[4].weight.requires_grad_(False)
    calls: list[str] = []
    model[4].register_forward_hook(lambda *_: calls.append("linear"))
    model[1].register_forward_hook(lambda *_: calls.append("relu"))
    inserted = nz.insert_bn(model)
    assert not inserted.training
    assert not any(m.training for m in inserted.modules())
    assert all(p.dtype == torch.float64 for p in inserted.parameters())
    assert inserted[4].weight.requires_grad is False
    inserted(torch.randn(4, 6, dtype=torch.float64))
    assert calls == ["relu", "linear"]


def test_inplace_flag() -> None:
    model = mlp()
    assert nz.insert_bn(model, inplace=True) is model
    assert norm_acts(model)


def test_rewritten_forward_copies_and_pickles() -> None:
    model = nz.insert_bn(CASES["functional_resnet"].build()).eval()
    x = CASES["functional_resnet"].input()
    clone = copy.deepcopy(model)
    assert clone.forward.module is clone
    assert torch.equal(clone(x), model(x))
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert torch.equal(loaded(x), model(x))
    assert type(model).__name__ == "FunctionalResNet"  # the class is kept


def test_rewritten_forward_follows_the_training_flag() -> None:
    model = nz.insert_bn(CASES["functional_resnet"].build())
    assert "training = True" in model.forward.code(True)
    assert "training = False" in model.forward.code(False)
    model.eval()
    x = CASES["functional_resnet"].input()
    assert torch.equal(model(x), model(x))  # no dropout in eval


def test_not_a_module() -> None:
    with pytest.raises(TypeError, match=r"expected a torch\.nn\.Module, got function"):
        nz.insert_bn(lambda x: x)  # type: ignore[arg-type]


def test_no_activation_warns_and_keeps_the_model() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    with pytest.warns(UserWarning, match="found no activation"):
        out = nz.insert_bn(model)
    assert str(out) == str(model)
    assert all(
        torch.equal(a, b) for a, b in zip(out.state_dict().values(), model.state_dict().values(), strict=True)
    )


def test_unknown_norm_lists_the_valid_names() -> None:
    with pytest.raises(ValueError, match="unknown norm 'layernorm'; expected one of 'batchnorm', 'renorm'"):
        nz.insert_bn(mlp(), "layernorm")


def test_unsupported_rank_warns_at_the_first_forward() -> None:
    class SixD(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.act = nn.ReLU()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.act(x.reshape(1, 2, 2, 2, 2, -1))

    model = nz.insert_bn(SixD())
    with pytest.warns(UserWarning, match="no 1d, 2d or 3d normalization fits"):
        out = model(torch.randn(2, 2, 2, 2, 2))
    assert out.shape == (1, 2, 2, 2, 2, 2)


def test_size_passes_through_an_earlier_activation() -> None:
    class Chain(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 6)
            self.act = nn.SiLU()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.act(self.fc(x)).tanh()

    model = nz.insert_bn(Chain())
    assert type(model.norm_tanh.norm) is nz.BatchNorm1d  # sized at once from fc, through the SiLU
    assert model.norm_tanh.norm.num_features == 6
    assert model.fc.bias is None  # dropped for the first norm, which fc feeds alone


class OptionalShortcut(nn.Module):
    """timm's DlaBasic in small: ``shortcut=None`` means "use x", and one ReLU called twice forces a rewrite."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, 4)
        self.fc2 = nn.Linear(4, 4)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor, shortcut: torch.Tensor | None = None) -> torch.Tensor:
        if shortcut is None:
            shortcut = x
        return self.relu(self.fc2(self.relu(self.fc1(x))) + shortcut)


class CallsBothWays(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.first = OptionalShortcut()
        self.second = OptionalShortcut()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.first(x, x * 2)
        return self.second(y) if bool(y.sum() > -1e9) else y  # data-dependent: this forward is not traced


def test_a_rewritten_forward_keeps_branches_on_optional_none_arguments() -> None:
    """Tracing sees ``shortcut`` as a tensor; a call without it must still take the ``is None`` branch."""
    model = CallsBothWays()
    inserted = nz.insert_bn(model, norm=lambda features: nn.Identity(), remove_bias=False)
    assert len(norm_acts(inserted)) == 4  # two per block, one per call of its ReLU
    x = torch.randn(3, 4)
    torch.testing.assert_close(inserted(x), model(x), rtol=0, atol=0)
    torch.testing.assert_close(inserted.second(x), model.second(x), rtol=0, atol=0)  # shortcut=None
    buffer = io.BytesIO()
    torch.save(inserted, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)  # the code of every variant travels with the model
    torch.testing.assert_close(loaded.second(x), model.second(x), rtol=0, atol=0)
    torch.testing.assert_close(loaded.first(x, x), model.first(x, x), rtol=0, atol=0)
    batch_normed = nz.insert_bn(model, example_input=x)
    assert batch_normed(x).shape == (3, 4)


@pytest.mark.parametrize("name", ["dla34", "hrnet_w18_small"])
def test_timm_vanilla_models_take_new_layers_with_example_input(name: str) -> None:
    timm = pytest.importorskip("timm")
    vanilla = nz.remove_bn(timm.create_model(name, pretrained=False, num_classes=4)).eval()
    x = torch.randn(2, 3, 32, 32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # activations out of fx's reach are listed, as documented
        inserted = nz.insert_bn(vanilla, example_input=x, remove_bias=False)
    layers = norm_acts(inserted)
    assert len(layers) > 10
    assert not any(layer.pending for layer in layers.values())
    assert inserted.eval()(x).shape == (2, 4)
    assert inserted.train()(x).shape == (2, 4)
    assert outputs_equal(nz.remove_bn(inserted), vanilla, x, train=False)
