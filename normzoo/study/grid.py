"""The experiment grid of ``normzoo study`` as data: the baseline recipe, the factors, the presets.

The grid follows the seed study: every factor is varied *alone* from the baseline recipe, and each setting is
trained once per (model, normalization variant, seed). A :class:`Preset` is a union of :class:`Block` s (which
models and variants run which factors), so the ``quick`` preset can run the cheap MLP on every factor and the
slower CNN on the few factors where the seed study's CNN claims live. Selections made on the command line or in
a config file *narrow* a preset (see :func:`build_plan`); ``--preset full`` starts from the whole grid.

Example:
    >>> [level.label for level in FACTORS["activation"].levels]
    ['sigmoid', 'tanh', 'elu', 'leaky_relu', 'softplus']
    >>> sorted(PRESETS)
    ['full', 'quick', 'tiny']
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "BASELINE",
    "DATASETS",
    "EXECUTORS",
    "FACTORS",
    "MODELS",
    "PRESETS",
    "VARIANTS",
    "Block",
    "Factor",
    "Level",
    "Preset",
    "Recipe",
    "RunSpec",
    "StudyConfig",
    "build_plan",
    "resolve_selectors",
    "unknown_name_error",
]


@dataclass(frozen=True)
class Recipe:
    """The training settings of one run; the defaults are the seed study's baseline recipe.

    ``init_std`` is used by ``init="normal"`` only. ``early_stop_patience`` and ``plateau_patience`` count
    epochs without improvement of the validation loss.
    """

    activation: str = "relu"
    init: str = "kaiming"
    init_std: float = 1.0
    optimizer: str = "sgd"
    lr: float = 0.01
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 0.0
    dropout: float = 0.0
    batch_size: int = 64
    #: ``None`` for shuffled batches, else the number of classes each training batch is drawn from
    classes_per_batch: int | None = None
    #: momentum of the norm layers' running statistics; ``None``: the layers' default, 0.1
    norm_momentum: float | None = None
    plateau_factor: float = 0.5
    plateau_patience: int = 5
    early_stop_patience: int = 20

    def replace(self, **changes: Any) -> Recipe:
        """A copy with ``changes`` applied; unknown names raise ``TypeError``.

        Example:
            >>> BASELINE.replace(lr=0.1).lr, BASELINE.lr
            (0.1, 0.01)
        """
        return dataclasses.replace(self, **changes)

    def as_dict(self) -> dict[str, Any]:
        """The fields as a dict; ``norm_momentum`` only when it is set (so that the cache keys of the runs
        that leave it at the layers' default are the ones they had before the field existed)."""
        out = dataclasses.asdict(self)
        if out["norm_momentum"] is None:
            del out["norm_momentum"]
        return out


#: The seed study's baseline: ReLU, Kaiming init, SGD + Nesterov momentum 0.9, lr 0.01, lr x0.5 after 5 epochs
#: without improvement, early stop after 20, batch 64 (standardization and the 10 % validation split are the
#: data modules' defaults).
BASELINE = Recipe()

#: Normalization variants: the name used in results and on the command line -> ``norm=`` of the model builders.
VARIANTS: dict[str, str | None] = {
    "vanilla": None,
    "batchnorm": "batchnorm",
    "renorm": "renorm",
    "noisy": "noisy",
}

#: Where the runs are trained: in this process and its worker processes, or as the tasks of a Ray cluster.
EXECUTORS = ("local", "ray")

#: The noise of the study's noisy BatchNorm: half the layer's default (``mean_range=0.5``,
#: ``std_range=(0.1, 0.5)``). Santurkar et al.'s claim is that BN with noise redrawn at every step trains about
#: as well as BN; the noise's size is the experiment's free parameter. On MNIST-1D's MLP (quick preset's
#: baseline, 3 seeds) the layer's default cost it 6 points against BN (51.8 % vs 58.2 %, below vanilla's
#: 55.4 %), half of it 1.6 points (56.6 %), while its covariate shift stays far above BN's; see docs/study.md.
NOISY_NOISE: dict[str, Any] = {"mean_range": 0.25, "std_range": (0.05, 0.25)}

#: Models of the seed experiments (built by :mod:`normzoo.models`).
MODELS: dict[str, str] = {
    "mlp": "multi-layer perceptron (the second seed study's MNIST MLP)",
    "cnn": "deep convolutional network (the seed study's CNN)",
}

#: Datasets: ``mnist1d`` (the default) is generated on this machine by the ``mnist1d`` package and ``digits``
#: ships with scikit-learn (no network for either); the others are read by torchvision from ``--data-root``
#: (downloaded there only with ``--download``).
DATASETS: dict[str, str] = {
    "mnist1d": "MNIST-1D, 4,000/1,000 signals of length 40, generated locally: hard enough to separate the "
    "variants (published: logistic 32 %, MLP 68 %, CNN 94 %)",
    "digits": "scikit-learn's 1,797 8x8 handwritten digits, bundled (too easy: every model scores >= 95 %)",
    "mnist": "MNIST from --data-root (torchvision layout)",
    "fashion_mnist": "Fashion-MNIST from --data-root (torchvision layout)",
    "svhn": "SVHN from --data-root (torchvision layout)",
    "cifar10": "CIFAR-10 from --data-root (torchvision layout)",
    "cifar100": "CIFAR-100 from --data-root (torchvision layout)",
}


@dataclass(frozen=True)
class Level:
    """One setting of a factor: ``params`` are the recipe fields that differ from :data:`BASELINE`."""

    factor: str
    label: str
    params: Mapping[str, Any]

    @property
    def selector(self) -> str:
        return f"{self.factor}:{self.label}"


@dataclass(frozen=True)
class Factor:
    """A factor of the seed study and its settings (the claims it tests live in
    :data:`normzoo.study.stats.CLAIMS`)."""

    name: str
    title: str
    levels: tuple[Level, ...]


def _factor(name: str, title: str, levels: Sequence[tuple[str, Mapping[str, Any]]]) -> Factor:
    return Factor(name, title, tuple(Level(name, label, dict(params)) for label, params in levels))


def _batch_size_params(batch_size: int) -> dict[str, Any]:
    """A batch-size level: below the baseline's 64, the running statistics' momentum shrinks with the batch
    (``0.1 · b / 64``) so that they average over about the same number of samples (~640) at every batch size.

    With torch's 0.1 at batch 4 the running statistics average about 40 samples: too noisy an estimate for
    evaluation, and Batch Renormalization, which corrects each batch towards them, then corrects towards
    noise (measured with ``examples/brn_reference.py``: at batch 4 it recovers nothing of BN's loss with
    momentum 0.1, most of it with 0.01).

    Example:
        >>> _batch_size_params(4), _batch_size_params(128)
        ({'batch_size': 4, 'norm_momentum': 0.00625}, {'batch_size': 128})
    """
    if batch_size >= BASELINE.batch_size:
        return {"batch_size": batch_size}
    return {"batch_size": batch_size, "norm_momentum": 0.1 * batch_size / BASELINE.batch_size}


#: The factors, in report order. ``baseline`` is the reference every other factor is compared with.
FACTORS: dict[str, Factor] = {
    f.name: f
    for f in (
        _factor(
            "baseline",
            "Baseline (ReLU, Kaiming, SGD+Nesterov, lr 0.01, batch 64)",
            [("baseline", {})],
        ),
        _factor(
            "activation",
            "Activation function",
            [
                ("sigmoid", {"activation": "sigmoid", "init": "xavier"}),
                ("tanh", {"activation": "tanh"}),
                ("elu", {"activation": "elu"}),
                ("leaky_relu", {"activation": "leaky_relu"}),
                ("softplus", {"activation": "softplus"}),
            ],
        ),
        _factor(
            "lr",
            "Learning rate x10",
            [("lr=0.1", {"lr": 0.1})],
        ),
        _factor(
            "init",
            "Initialization N(0, 1)",
            [("normal(1.0)", {"init": "normal", "init_std": 1.0})],
        ),
        _factor(
            "weight_decay",
            "L2 weight decay 5e-4",
            [("wd=5e-4", {"weight_decay": 5e-4})],
        ),
        _factor(
            "dropout",
            "Dropout 0.5",
            [("p=0.5", {"dropout": 0.5})],
        ),
        _factor(
            "batch_size",
            "Batch size",
            [(f"bs={b}", _batch_size_params(b)) for b in (2, 4, 8, 16, 32, 128, 256, 512, 1024)],
        ),
        _factor(
            "non_iid",
            "Non-i.i.d. minibatches (each batch from two classes)",
            [("2 classes/batch", {"classes_per_batch": 2})],
        ),
        _factor(
            "optimizer",
            "Optimizer SGD vs Adam",
            [("adam", {"optimizer": "adam", "lr": 0.001})],
        ),
    )
}


def unknown_name_error(kind: str, name: str, valid: Iterable[str]) -> ValueError:
    """The error for a name that is not in ``valid``, listing the valid ones.

    Example:
        >>> print(unknown_name_error("variant", "layernorm", VARIANTS))
        unknown variant 'layernorm'; valid variants: vanilla, batchnorm, renorm, noisy
    """
    return ValueError(f"unknown {kind} {name!r}; valid {kind}s: {', '.join(valid)}")


def _all_selectors() -> list[str]:
    return [level.selector for factor in FACTORS.values() for level in factor.levels]


def resolve_selectors(selectors: Iterable[str]) -> list[Level]:
    """Levels named by ``selectors``: ``"factor"`` (all its levels) or ``"factor:label"`` (one level).

    The result keeps :data:`FACTORS` order and has no duplicates.

    Example:
        >>> [lv.selector for lv in resolve_selectors(["lr", "batch_size:bs=4", "baseline"])]
        ['baseline:baseline', 'lr:lr=0.1', 'batch_size:bs=4']
        >>> resolve_selectors(["momentum"])
        Traceback (most recent call last):
        ...
        ValueError: unknown factor 'momentum'; valid factors: baseline, activation, lr, init, weight_decay, dropout, batch_size, non_iid, optimizer
    """
    wanted: set[str] = set()
    for raw in selectors:
        sel = raw.strip()
        if not sel:
            continue
        name, _, label = sel.partition(":")
        if name not in FACTORS:
            raise unknown_name_error("factor", name, FACTORS)
        levels = FACTORS[name].levels
        if not label:
            wanted.update(level.selector for level in levels)
            continue
        matching = [level for level in levels if level.label == label]
        if not matching:
            valid = ", ".join(lv.label for lv in levels)
            raise ValueError(f"unknown level {label!r} of factor {name!r}; valid levels: {valid}")
        wanted.add(matching[0].selector)
    return [level for level in (lv for f in FACTORS.values() for lv in f.levels) if level.selector in wanted]


@dataclass(frozen=True)
class Block:
    """Part of a preset: every level of ``factors`` for every model and variant listed."""

    models: tuple[str, ...]
    variants: tuple[str, ...]
    factors: tuple[str, ...]


@dataclass(frozen=True)
class Preset:
    """A named study: the blocks it runs, the seeds, the epoch cap and the diagnostics it records."""

    name: str
    description: str
    blocks: tuple[Block, ...]
    seeds: tuple[int, ...]
    max_epochs: int
    #: selectors of the levels whose first seed also records gradient flow and weight norms
    diagnostics: tuple[str, ...] = ("baseline", "activation:sigmoid")
    #: per-model overrides of the recipe (e.g. a smaller CNN for the tiny preset)
    model_kwargs: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    #: limit of training batches per epoch (None: all); the tiny preset uses it to stay within seconds
    limit_train_batches: int | None = None
    #: cap on optimizer steps per run (None: none), so that small batches (many steps per epoch) stop in
    #: time; whichever of ``max_epochs`` and ``max_steps`` comes first ends a run that early stopping did not
    max_steps: int | None = None


_ALL_FACTORS = tuple(FACTORS)
_ALL_VARIANTS = tuple(VARIANTS)

PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset(
            "quick",
            "The default: under 10 minutes on a 2-core CPU (two worker processes). On MNIST-1D: the MLP on every "
            "factor, vanilla vs BatchNorm; all four variants (vanilla, BatchNorm, Batch Renormalization, noisy "
            "BN) on the MLP at the baseline, tiny batches (2, 4, 8) and non-i.i.d. batches; the 1-D CNN "
            "(8-32 channels), vanilla vs BatchNorm, at the baseline and with sigmoid; two seeds; at most 15 "
            "epochs and 1,500 steps per run.",
            blocks=(
                Block(
                    ("mlp",),
                    ("vanilla", "batchnorm"),
                    tuple(f for f in _ALL_FACTORS if f != "batch_size")
                    + tuple(f"batch_size:bs={b}" for b in (2, 4, 8, 256)),
                ),
                Block(
                    ("mlp",),
                    ("renorm", "noisy"),
                    ("baseline", "batch_size:bs=2", "batch_size:bs=4", "batch_size:bs=8", "non_iid"),
                ),
                Block(("mlp",), ("noisy",), ("activation:sigmoid",)),  # the "why BN works" measurements
                Block(("cnn",), ("vanilla", "batchnorm"), ("baseline", "activation:sigmoid")),
            ),
            seeds=(0, 1),
            max_epochs=15,
            max_steps=1500,
            diagnostics=("baseline", "activation:sigmoid"),
            model_kwargs={"cnn": {"channels": (8, 8, 16, 16, 32, 32)}},
        ),
        Preset(
            "full",
            "The whole grid: both models, all variants, every factor, three seeds, up to 200 epochs. Meant for "
            "a GPU (--accelerator gpu) or a long CPU run; interrupted runs resume.",
            blocks=(Block(tuple(MODELS), _ALL_VARIANTS, _ALL_FACTORS),),
            seeds=(0, 1, 2),
            max_epochs=200,
        ),
        Preset(
            "tiny",
            "For tests: the MLP, vanilla vs BN (and Batch Renormalization at the baseline), three settings, two "
            "seeds, 3 epochs of 4 batches. Shows nothing about BatchNorm; it checks the machinery in seconds.",
            blocks=(
                Block(("mlp",), ("vanilla", "batchnorm"), ("baseline", "lr", "batch_size:bs=128")),
                Block(("mlp",), ("renorm",), ("baseline",)),
            ),
            seeds=(0, 1),
            max_epochs=3,
            diagnostics=("baseline",),
            model_kwargs={"mlp": {"hidden": (16, 16)}, "cnn": {"channels": (4, 8)}},
            limit_train_batches=4,
        ),
    )
}


@dataclass(frozen=True)
class RunSpec:
    """One training run of the plan: a level of a factor for one model, variant and seed."""

    level: Level
    model: str
    variant: str
    seed: int
    recipe: Recipe
    diagnostics: bool = False

    @property
    def experiment(self) -> str:
        return self.level.factor


@dataclass
class StudyConfig:
    """Everything a study needs; built from a preset, a config file and command-line options.

    ``factors``, ``models`` and ``variants`` are *filters* of the preset's blocks (``None``: keep all).
    """

    preset: str = "quick"
    out: str = "normzoo-study"
    factors: list[str] | None = None
    models: list[str] | None = None
    variants: list[str] | None = None
    dataset: str = "mnist1d"
    data_root: str | None = None
    download: bool = False
    seeds: list[int] | None = None
    max_epochs: int | None = None
    max_steps: int | None = None
    early_stop_patience: int | None = None
    accelerator: str = "cpu"
    devices: int | str = 1
    threads: int | None = 1
    batch_sizes: list[int] | None = None
    limit_train_batches: int | None = None
    #: worker processes training runs side by side (``None``: the number of CPU cores, at most the runs); with
    #: the Ray executor, the most runs in flight at once (``None``: as many as the cluster's resources allow)
    workers: int | None = None
    #: where the runs are trained: ``"local"`` (this process or its worker processes) or ``"ray"`` (tasks
    #: of a Ray cluster, see docs/study.md); the results are the same
    executor: str = "local"
    #: the Ray cluster to connect to (``None``: Ray's own resolution: ``RAY_ADDRESS``, a cluster started with
    #: ``ray start`` on this machine, else a local instance started for the study and shut down after it)
    ray_address: str | None = None
    progress: bool = True
    force: bool = False
    figures: bool = True
    draw_margin: float = 0.01

    def validate(self) -> None:
        """Raise ``ValueError`` naming the valid choices for any unknown name.

        Example:
            >>> StudyConfig(models=["resnet"]).validate()
            Traceback (most recent call last):
            ...
            ValueError: unknown model 'resnet'; valid models: mlp, cnn
        """
        if self.preset not in PRESETS:
            raise unknown_name_error("preset", self.preset, PRESETS)
        if self.dataset not in DATASETS:
            raise unknown_name_error("dataset", self.dataset, DATASETS)
        for name in self.models or ():
            if name not in MODELS:
                raise unknown_name_error("model", name, MODELS)
        for name in self.variants or ():
            if name not in VARIANTS:
                raise unknown_name_error("variant", name, VARIANTS)
        resolve_selectors(self.factors or ())
        if self.seeds is not None and not self.seeds:
            raise ValueError("seeds must not be empty")
        if self.seeds is not None and any(s < 0 for s in self.seeds):
            raise ValueError(f"seeds must be non-negative integers, got {self.seeds}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be at least 1, got {self.threads}")
        if self.workers is not None and self.workers < 1:
            raise ValueError(f"workers must be at least 1, got {self.workers}")
        if isinstance(self.devices, int) and self.devices < 1:
            raise ValueError(f"devices must be at least 1 (or 'auto'), got {self.devices}")
        if self.limit_train_batches is not None and self.limit_train_batches < 1:
            raise ValueError(
                f"limit_train_batches must be at least 1 (or unset for every batch), got "
                f"{self.limit_train_batches}: a run of zero steps has no result"
            )
        if self.max_epochs is not None and self.max_epochs < 1:
            raise ValueError(f"max_epochs must be at least 1, got {self.max_epochs}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps must be at least 1 (or unset), got {self.max_steps}")
        if self.early_stop_patience is not None and self.early_stop_patience < 1:
            raise ValueError(f"early_stop_patience must be at least 1, got {self.early_stop_patience}")
        for b in self.batch_sizes or ():
            if b < 2:
                raise ValueError(f"batch sizes must be at least 2 (BatchNorm needs 2 samples), got {b}")
        if not 0 <= self.draw_margin < 1:
            raise ValueError(f"draw_margin must be in [0, 1), got {self.draw_margin}")
        if self.executor not in EXECUTORS:
            raise unknown_name_error("executor", self.executor, EXECUTORS)
        if self.accelerator not in ("cpu", "gpu", "cuda", "mps", "auto"):
            raise unknown_name_error("accelerator", self.accelerator, ("cpu", "gpu", "cuda", "mps", "auto"))

    @property
    def preset_obj(self) -> Preset:
        return PRESETS[self.preset]

    @property
    def effective_seeds(self) -> list[int]:
        return list(self.seeds) if self.seeds is not None else list(self.preset_obj.seeds)

    @property
    def effective_max_epochs(self) -> int:
        return self.max_epochs if self.max_epochs is not None else self.preset_obj.max_epochs

    @property
    def effective_max_steps(self) -> int | None:
        return self.max_steps if self.max_steps is not None else self.preset_obj.max_steps

    @property
    def effective_limit_train_batches(self) -> int | None:
        if self.limit_train_batches is not None:
            return self.limit_train_batches
        return self.preset_obj.limit_train_batches


def _batch_size_levels(sizes: Sequence[int]) -> list[Level]:
    return [
        Level("batch_size", f"bs={b}", _batch_size_params(int(b))) for b in sizes if b != BASELINE.batch_size
    ]


def build_plan(config: StudyConfig) -> list[RunSpec]:
    """The runs of a study, in a stable order (factor, level, model, variant, seed).

    The preset's blocks give the candidate runs; ``config.factors`` / ``models`` / ``variants`` keep only the
    runs they name; ``config.batch_sizes`` replaces the batch-size levels (64 is the baseline's).

    Example:
        >>> plan = build_plan(StudyConfig(preset="tiny", variants=["batchnorm"], seeds=[7]))
        >>> [(r.experiment, r.level.label, r.variant, r.seed) for r in plan]
        [('baseline', 'baseline', 'batchnorm', 7), ('lr', 'lr=0.1', 'batchnorm', 7), ('batch_size', 'bs=128', 'batchnorm', 7)]
    """
    config.validate()
    preset = config.preset_obj
    wanted_factors: set[str] | None = None
    wanted_levels: set[str] | None = None
    if config.factors:
        wanted_factors = {sel.strip() for sel in config.factors if sel.strip() and ":" not in sel}
        wanted_levels = {lv.selector for lv in resolve_selectors(config.factors)}
    custom_bs = _batch_size_levels(config.batch_sizes) if config.batch_sizes is not None else None
    diag = {lv.selector for lv in resolve_selectors(preset.diagnostics)}
    seeds = config.effective_seeds

    def wanted(level: Level) -> bool:
        if wanted_levels is None or wanted_factors is None:
            return True
        return level.factor in wanted_factors or level.selector in wanted_levels

    candidates: dict[tuple[str, str, str], Level] = {}
    for block in preset.blocks:
        levels = resolve_selectors(block.factors)
        if custom_bs is not None and any(lv.factor == "batch_size" for lv in levels):
            levels = [lv for lv in levels if lv.factor != "batch_size"] + custom_bs
        for level in filter(wanted, levels):
            for model in block.models:
                if config.models and model not in config.models:
                    continue
                for variant in block.variants:
                    if not config.variants or variant in config.variants:
                        candidates[(level.selector, model, variant)] = level

    factor_rank = {name: i for i, name in enumerate(FACTORS)}
    model_rank = {m: i for i, m in enumerate(MODELS)}
    variant_rank = {v: i for i, v in enumerate(VARIANTS)}

    def sort_key(item: tuple[tuple[str, str, str], Level]) -> tuple[int, float, int, int]:
        (_, model, variant), level = item
        if level.factor == "batch_size":
            within = float(level.params["batch_size"])
        else:
            within = float([lv.label for lv in FACTORS[level.factor].levels].index(level.label))
        return (factor_rank[level.factor], within, model_rank[model], variant_rank[variant])

    plan: list[RunSpec] = []
    for (selector, model, variant), level in sorted(candidates.items(), key=sort_key):
        recipe = BASELINE.replace(**level.params)
        if config.early_stop_patience is not None:
            recipe = recipe.replace(early_stop_patience=config.early_stop_patience)
        for i, seed in enumerate(seeds):
            plan.append(
                RunSpec(level, model, variant, int(seed), recipe, diagnostics=i == 0 and selector in diag)
            )
    return plan
