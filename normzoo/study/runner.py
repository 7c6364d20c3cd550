"""Run the study: one Lightning training per :class:`~normzoo.study.grid.RunSpec`, cached in the output folder.

Each finished run is written to ``OUT/runs/<key>.json``, where ``key`` is a stable hash of everything that
determines its result (:func:`run_key`): a rerun loads those files instead of training again, and a study
that was interrupted resumes with the runs that have no file yet. A run file is written atomically (a
temporary file renamed into place), so an interruption never leaves a half-written result behind.

The runs are trained by an *executor*: ``local`` trains them in this process or in ``--workers`` spawned
worker processes, ``ray`` as the tasks of a Ray cluster (one task per run). Either way each run is one call
of :func:`_attempt`, and only the study's own process writes ``OUT``: caching, resume, the failed-run
reports and the progress bar are the same code for both.

The training is the seed's recipe through :class:`normzoo.lightning.ClassificationModule` (SGD + Nesterov,
reduce-on-plateau halving) and Lightning's ``EarlyStopping`` on the validation loss. After training the
weights of the epoch with the best validation accuracy are restored and evaluated on the test set.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import hashlib
import json
import logging
import math
import os
import platform
import signal
import socket
import sys
import threading
import time
import traceback
import warnings
from collections.abc import Generator, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .grid import BASELINE, NOISY_NOISE, PRESETS, VARIANTS, RunSpec, StudyConfig, build_plan

__all__ = [
    "REQUIRED_FIELDS",
    "RUN_SCHEMA",
    "DataNotFoundError",
    "StudyFolderInUseError",
    "StudyInterrupted",
    "StudyLock",
    "StudyResult",
    "check_executor",
    "check_output_folder",
    "load_run",
    "run_key",
    "run_one",
    "run_study",
]

#: Version of the run-file format; part of every run key, so a change of format invalidates the cache.
RUN_SCHEMA = 2

_log = logging.getLogger("normzoo.study")


# ---------------------------------------------------------------------------------------------------------
# keys and files


def run_identity(spec: RunSpec, config: StudyConfig) -> dict[str, Any]:
    """Everything that determines the result of ``spec``: the data of its cache key.

    A recipe setting that ``spec`` never reads (:func:`relevant_recipe`) does not count: the same vanilla run
    at batch 4 has one key whatever the normalization momentum of the plan's normalized runs.
    """
    return _identity(spec, config, relevant_recipe(spec))


def relevant_recipe(spec: RunSpec) -> dict[str, Any]:
    """``spec.recipe`` as :meth:`~normzoo.study.grid.Recipe.as_dict`, each setting the run does not read
    replaced by the baseline's value: ``norm_momentum`` of a vanilla run (it has no norm layer), ``init_std``
    unless ``init="normal"``, SGD's ``momentum`` and ``nesterov`` with Adam/AdamW, ``nesterov`` at momentum 0.

    Replacing (rather than dropping) keeps the cache key of every run that has those settings at the
    baseline's values the key it had before this rule existed.

    Example:
        >>> from normzoo.study.grid import BASELINE, FACTORS, RunSpec
        >>> bs4 = FACTORS["batch_size"].levels[1]  # batch 4, with a smaller norm momentum
        >>> def spec(variant):
        ...     return RunSpec(bs4, "mlp", variant, 0, BASELINE.replace(**bs4.params))
        >>> relevant_recipe(spec("batchnorm"))["norm_momentum"], "norm_momentum" in relevant_recipe(spec("vanilla"))
        (0.00625, False)
    """
    r = spec.recipe
    unused: dict[str, Any] = {}
    if VARIANTS.get(spec.variant, spec.variant) is None:
        unused["norm_momentum"] = BASELINE.norm_momentum
    if r.init != "normal":
        unused["init_std"] = BASELINE.init_std
    if r.optimizer != "sgd":
        unused["momentum"] = BASELINE.momentum
        unused["nesterov"] = BASELINE.nesterov
    elif r.momentum == 0:
        unused["nesterov"] = BASELINE.nesterov
    return r.replace(**unused).as_dict()


def _identity(spec: RunSpec, config: StudyConfig, recipe: dict[str, Any]) -> dict[str, Any]:
    preset = config.preset_obj
    return {
        "schema": RUN_SCHEMA,
        "dataset": config.dataset,
        "model": spec.model,
        "model_kwargs": _jsonable(dict(preset.model_kwargs.get(spec.model, {}))),
        "variant": spec.variant,
        "seed": spec.seed,
        "recipe": recipe,
        "max_epochs": config.effective_max_epochs,
        "max_steps": config.effective_max_steps,
        "limit_train_batches": config.effective_limit_train_batches,
        "accelerator": _accelerator_name(config.accelerator),
        # for a run with random layers, what its diagnostics record depends on how the covariate shift
        # monitor draws their randomness (True alone was the same noise on every pass)
        "diagnostics": (
            {"ics_randomness": "fresh"} if spec.diagnostics and _has_random_layers(spec) else spec.diagnostics
        ),
        # how Batch Renormalization's schedule is derived (see normzoo.study.renorm)
        "renorm_schedule": "paper, scaled to the run (5/25/40 %)" if spec.variant == "renorm" else None,
        # noisy BN's noise (a key only noisy runs have, so that every other key stays as it was)
        **({"noise": _jsonable(NOISY_NOISE)} if spec.variant == "noisy" else {}),
    }


def _has_random_layers(spec: RunSpec) -> bool:
    return spec.variant == "noisy" or spec.recipe.dropout > 0


def run_key(spec: RunSpec, config: StudyConfig) -> str:
    """A stable 16-hex-digit hash of :func:`run_identity` (canonical JSON, SHA-256).

    Example:
        >>> from normzoo.study.grid import build_plan
        >>> cfg = StudyConfig(preset="tiny")
        >>> a, b = build_plan(cfg)[:2]
        >>> run_key(a, cfg) == run_key(a, cfg), run_key(a, cfg) == run_key(b, cfg), len(run_key(a, cfg))
        (True, False, 16)
    """
    return _hash(run_identity(spec, config))


def _legacy_run_key(spec: RunSpec, config: StudyConfig) -> str | None:
    """The key ``spec`` had before :func:`relevant_recipe` (whole recipe), or ``None`` where it is the same:
    a cache written by an older normzoo still loads (see :func:`_load_cached`)."""
    old = _hash(_identity(spec, config, spec.recipe.as_dict()))
    return None if old == run_key(spec, config) else old


def _hash(identity: Mapping[str, Any]) -> str:
    text = json.dumps(identity, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return _jsonable(value.item())
    return str(value)


def _write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


#: The fields every run record has; a cached file without one of them is incomplete and trained again.
REQUIRED_FIELDS = (
    "schema", "key", "experiment", "level", "variant", "model", "dataset", "seed", "test_acc", "best_val_acc",
    "epochs", "steps", "stop_reason", "num_classes", "recipe", "history",
)  # fmt: skip


def load_run(path: Path) -> dict[str, Any] | None:
    """The record in a run file, or ``None`` when it is missing, unreadable, of another schema or incomplete
    (an incomplete one is reported in the log: it is trained again)."""
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as error:
        _log.warning("%s is unreadable (%s): training that run again", path, error)
        return None
    if not isinstance(record, dict) or record.get("schema") != RUN_SCHEMA:
        return None
    missing = [name for name in REQUIRED_FIELDS if name not in record]
    if missing or record.get("key") != path.stem or not record.get("steps"):
        what = f"lacks {', '.join(missing)}" if missing else "belongs to another run or has no steps"
        _log.warning("%s is incomplete (it %s): training that run again", path, what)
        return None
    return record


def check_output_folder(out: str | Path) -> Path:
    """Create ``out`` if needed and check that it is a writable folder, before any training.

    Raises ``ValueError`` naming ``--out`` when it is a file or cannot be written.

    Example:
        >>> target = getfixture("tmp_path") / "a-file"
        >>> _ = target.write_text("x")
        >>> check_output_folder(target)
        Traceback (most recent call last):
        ...
        ValueError: --out .../a-file is a file, expected a folder for the study's results
    """
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise ValueError(f"--out {path} is a file, expected a folder for the study's results")
    try:
        (path / "runs").mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test.{os.getpid()}"
        probe.write_text("", encoding="utf-8")
        probe.unlink()
    except OSError as error:
        raise ValueError(f"--out {path} is not a writable folder: {error.strerror or error}") from None
    return path


class StudyFolderInUseError(RuntimeError):
    """Raised when another live study holds the output folder (see :class:`StudyLock`)."""


class StudyLock:
    """An exclusive lock on a study's output folder (``OUT/.lock``, ``fcntl.flock``), holding the owner's pid.

    A second study started in the same folder fails at once with a message naming the process that holds
    it, instead of deleting its in-flight files and overwriting its ``results.json``. The operating system
    releases the lock when its process ends, however it ends (a killed study leaves no stale lock). Where
    ``fcntl`` does not exist (Windows) the folder is not locked.
    """

    def __init__(self, out: str | Path) -> None:
        self.path = Path(out) / ".lock"
        self._file: Any = None

    def __enter__(self) -> StudyLock:
        try:
            import fcntl
        except ImportError:  # pragma: no cover - Windows
            return self
        handle = open(self.path, "a+", encoding="utf-8")
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            owner = handle.read().strip() or "unknown"
            handle.close()
            raise StudyFolderInUseError(
                f"another normzoo study (pid {owner}) is writing {self.path.parent}: wait for it to finish, "
                "or choose another --out"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        self._file = handle
        return self

    def __exit__(self, *exc: object) -> None:
        if self._file is not None:
            with contextlib.suppress(OSError):
                self._file.truncate(0)
            self._file.close()  # closing releases the flock
            self._file = None


# ---------------------------------------------------------------------------------------------------------
# the Lightning side


def _accelerator_name(accelerator: str) -> str:
    if accelerator == "auto":
        return "gpu" if torch.cuda.is_available() else "cpu"
    return "gpu" if accelerator == "cuda" else accelerator


@contextlib.contextmanager
def _quiet_lightning() -> Iterator[None]:
    """Silence Lightning's per-Trainer banners and the warnings that are expected for tiny datasets."""
    loggers = [
        logging.getLogger(n)
        for n in ("lightning", "lightning.pytorch", "lightning.fabric", "pytorch_lightning")
    ]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    with warnings.catch_warnings():
        for pattern in (
            ".*does not have many workers.*",
            ".*number of training batches.*",
            ".*is smaller than the logging interval.*",
            ".*LeafSpec.*",
            ".*GPU available but not used.*",
            ".*tensorboardX.*",
            ".*`isinstance\\(treespec, LeafSpec\\)`.*",
        ):
            warnings.filterwarnings("ignore", message=pattern)
        warnings.filterwarnings("ignore", category=UserWarning, module="lightning")
        try:
            yield
        finally:
            for lg, level in zip(loggers, levels, strict=True):
                lg.setLevel(level)


def _metric(metrics: Mapping[str, Any], *names: str) -> float | None:
    for name in names:
        if name in metrics:
            value = metrics[name]
            return float(value.item() if isinstance(value, torch.Tensor) else value)
    return None


def _make_history_callback() -> Any:
    """A callback that records per-epoch losses, validation accuracy, training wall time and the best state."""
    import lightning as L

    class _History(L.Callback):
        def __init__(self) -> None:
            self.history: list[dict[str, Any]] = []
            self.best_val_acc = -1.0
            self.best_epoch = -1
            self.best_state: dict[str, torch.Tensor] | None = None
            self._t0: float | None = None
            self._c0: float | None = None
            self._train_s: float | None = None
            self._train_cpu_s: float | None = None
            self._step0 = 0
            self._validated = False

        def _sync(self, trainer: L.Trainer) -> None:
            if trainer.strategy.root_device.type == "cuda":
                torch.cuda.synchronize(trainer.strategy.root_device)

        def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
            self._sync(trainer)
            self._t0, self._c0 = time.perf_counter(), time.process_time()
            self._train_s = self._train_cpu_s = None
            self._step0 = int(trainer.global_step)
            self._validated = False

        def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
            if trainer.sanity_checking or self._t0 is None or self._train_s is not None:
                return
            self._sync(trainer)
            self._stop()

        def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
            if not trainer.sanity_checking:
                self._validated = True

        def _stop(self) -> None:
            if self._t0 is None or self._c0 is None:  # pragma: no cover - epochs always start first
                return
            self._train_s = time.perf_counter() - self._t0
            self._train_cpu_s = time.process_time() - self._c0

        def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
            if self._t0 is None:
                return
            if not self._validated:
                # an epoch cut short by max_steps, without a validation: its metrics would be the last
                # epoch's, so it gets no entry (its steps still count in the run's "steps")
                return
            if self._train_s is None:  # pragma: no cover - validation stops the clock first
                self._sync(trainer)
                self._stop()
            m = trainer.callback_metrics
            val_acc = _metric(m, "val/acc", "val/acc_epoch")
            entry = {
                "epoch": int(trainer.current_epoch) + 1,
                "train_loss": _metric(m, "train/loss_epoch", "train/loss"),
                "val_loss": _metric(m, "val/loss", "val/loss_epoch"),
                "val_acc": val_acc,
                "train_acc": _metric(m, "train/acc_epoch", "train/acc"),
                "lr": float(trainer.optimizers[0].param_groups[0]["lr"]) if trainer.optimizers else None,
                "time_s": self._train_s,
                "cpu_s": self._train_cpu_s,
                "steps": int(trainer.global_step) - self._step0,
            }
            self.history.append({k: _jsonable(v) for k, v in entry.items()})
            if val_acc is not None and val_acc > self.best_val_acc:
                self.best_val_acc = val_acc
                self.best_epoch = int(trainer.current_epoch) + 1
                self.best_state = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}

    return _History()


class _Data:
    """The study's data module, loaded once; its batch size is set for each run."""

    def __init__(self, config: StudyConfig) -> None:
        self.config = config
        self._dm: Any = None

    def get(self, batch_size: int, classes_per_batch: int | None = None) -> Any:
        if self._dm is None:
            from normzoo.lightning.data import get_datamodule

            kwargs: dict[str, Any] = {"batch_size": batch_size, "eval_batch_size": 512}
            if self.config.dataset not in _GENERATED_DATASETS:
                kwargs["root"] = self.config.data_root or "data"
                kwargs["download"] = self.config.download
            if _accelerator_name(self.config.accelerator) != "cpu":
                kwargs["pin_memory"] = True
            dm = get_datamodule(self.config.dataset, **kwargs)
            dm.prepare_data()
            dm.setup("fit")
            self._dm = dm  # only once it is set up: a missing folder raises again on the next call
        dm = self._dm
        dm.batch_size = batch_size
        dm.classes_per_batch = classes_per_batch
        # A last training batch of one sample would make BatchNorm raise: drop it only in that case.
        dm.drop_last = len(dm.train_set) % batch_size == 1
        return dm


def planned_steps(spec: RunSpec, config: StudyConfig, n_train: int) -> int:
    """The optimizer steps ``spec`` takes unless early stopping ends it: the epoch cap times the steps per
    epoch (the batch limit applied), or the step cap when that comes first."""
    per_epoch = (
        n_train // spec.recipe.batch_size
        if n_train % spec.recipe.batch_size == 1
        else math.ceil(n_train / spec.recipe.batch_size)
    )
    limit = config.effective_limit_train_batches
    if limit is not None:
        per_epoch = min(per_epoch, limit)
    steps = per_epoch * config.effective_max_epochs
    max_steps = config.effective_max_steps
    return min(steps, max_steps) if max_steps is not None else steps


def validated_epoch_length(steps_per_epoch: int, max_epochs: int, max_steps: int | None) -> int:
    """The training steps between two validations, so that the step cap falls on a validation.

    A run that the step cap ends inside an epoch would lose that epoch's training (no validation, so its
    weights are never the best ones), and one that the cap ends inside its *first* epoch would never be
    validated at all. Such a run is trained in equal "epochs" of at most ``steps_per_epoch`` steps that add
    up to ``max_steps`` (each a fresh shuffle of the data, cut short); other runs keep their epochs.

    Example:
        >>> validated_epoch_length(1800, 15, 1500), validated_epoch_length(900, 15, 1500)  # batch 2 and 4
        (1500, 750)
        >>> validated_epoch_length(450, 15, 1500), validated_epoch_length(57, 15, 1500)    # batch 8 and 64
        (375, 57)
    """
    if max_steps is None or steps_per_epoch * max_epochs <= max_steps or max_steps % steps_per_epoch == 0:
        return steps_per_epoch
    chunks = math.ceil(max_steps / steps_per_epoch)
    return math.ceil(max_steps / chunks)


def renorm_schedule(spec: RunSpec, config: StudyConfig, n_train: int) -> Any:
    """The Batch Renormalization schedule of ``spec``: the paper's, scaled to the run's planned steps."""
    from normzoo import PaperSchedule

    return PaperSchedule(total_steps=max(1, planned_steps(spec, config, n_train)))


def _build_model(spec: RunSpec, config: StudyConfig, dm: Any, schedule: Any = None) -> nn.Module:
    import functools

    from normzoo.layers import BatchNorm1d, BatchRenorm1d, NoisyBatchNorm1d
    from normzoo.models import build_cnn, build_mlp

    from .grid import VARIANTS

    r = spec.recipe
    norm: Any = VARIANTS[spec.variant]
    options: dict[str, Any] = {}
    if r.norm_momentum is not None:
        options["momentum"] = r.norm_momentum
    if norm == "renorm" and schedule is not None:
        options["schedule"] = schedule
    if norm == "noisy":
        options.update(NOISY_NOISE)
    if norm is not None and options:
        # a partial of the 1d class: get_norm_layer picks the family's 1d/2d/3d class for the model
        families = {"batchnorm": BatchNorm1d, "renorm": BatchRenorm1d, "noisy": NoisyBatchNorm1d}
        norm = functools.partial(families[norm], **options)
    common: dict[str, Any] = {
        "norm": norm,
        "activation": r.activation,
        "init": r.init,
        "init_std": r.init_std,
        "dropout": r.dropout,
    }
    extra: dict[str, Any] = dict(config.preset_obj.model_kwargs.get(spec.model, {}))
    if spec.model == "mlp":
        return build_mlp(int(dm.num_features), int(dm.num_classes), **extra, **common)
    shape = tuple(dm.input_shape)
    return build_cnn(int(dm.in_channels), int(dm.num_classes), ndim=len(shape) - 1, **extra, **common)


#: the diagnostics a run with ``diagnostics=True`` records: results.json key -> the monitor's class name
DIAGNOSTICS = {
    "gradient_flow": "GradientFlowMonitor",
    "weight_norm": "WeightNormMonitor",
    "ics": "CovariateShiftMonitor",
    "landscape": "LossLandscapeMonitor",
    "jacobian": "JacobianSpectrumMonitor",
}


def _diagnostic_callbacks(steps_per_epoch: int) -> list[Any]:
    """The library's monitors, figures off (the report draws them from the recorded histories): gradient flow
    and weight norms about four times per epoch; the probing ones (Santurkar's internal covariate shift and
    loss landscape, the Jacobian spectrum), which cost a few extra passes each, once per epoch."""
    from normzoo.lightning.callbacks import (
        CovariateShiftMonitor,
        GradientFlowMonitor,
        JacobianSpectrumMonitor,
        LossLandscapeMonitor,
        WeightNormMonitor,
    )

    every = max(1, steps_per_epoch // 4)
    return [
        GradientFlowMonitor(every_n_steps=every, save_figures=False, warn=False),
        WeightNormMonitor(every_n_steps=every, save_figures=False),
        # fresh noise for G': noisy BN's shift is its noise redrawn at every step (Santurkar et al.'s point);
        # replayed with the same noise, that shift would be measured away
        CovariateShiftMonitor(every_n_steps=steps_per_epoch, randomness="fresh", save_figures=False),
        LossLandscapeMonitor(every_n_steps=steps_per_epoch, save_figures=False),
        JacobianSpectrumMonitor(every_n_steps=steps_per_epoch, save_figures=False),
    ]


def _epoch_timer() -> Any:
    try:
        from normzoo.lightning.callbacks import EpochTimer
    except ImportError:  # pragma: no cover - fall back to the history callback's own timing
        return None
    return EpochTimer(save_figures=False)


def _diagnostics_summary(callbacks: Sequence[Any]) -> dict[str, Any]:
    """The monitors' in-memory histories as plain JSON data, under the keys of :data:`DIAGNOSTICS`."""
    keys = {cls: key for key, cls in DIAGNOSTICS.items()}
    return {
        keys[type(cb).__name__]: _jsonable(_to_plain(cb.history))
        for cb in callbacks
        if type(cb).__name__ in keys
    }


def _to_plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_plain(v) for v in value]
    if hasattr(value, "_asdict"):
        return _to_plain(value._asdict())
    if hasattr(value, "__dataclass_fields__"):
        import dataclasses

        return _to_plain(dataclasses.asdict(value))
    if isinstance(value, torch.Tensor):
        return value.tolist()
    return value


def run_one(spec: RunSpec, config: StudyConfig, data: _Data | None = None) -> dict[str, Any]:
    """Train one run of the plan and return its record (see ``docs/study.md`` for the fields)."""
    import lightning as L
    from lightning.pytorch.callbacks import EarlyStopping

    from normzoo import __version__
    from normzoo.lightning import ClassificationModule
    from normzoo.models import count_parameters

    from .renorm import summarize_activity

    data = data or _Data(config)
    dm = data.get(spec.recipe.batch_size, spec.recipe.classes_per_batch)
    r = spec.recipe
    schedule = renorm_schedule(spec, config, len(dm.train_set)) if spec.variant == "renorm" else None
    L.seed_everything(spec.seed, workers=True, verbose=False)
    model = _build_model(spec, config, dm, schedule)
    module = ClassificationModule(
        model,
        int(dm.num_classes),
        optimizer=r.optimizer,
        lr=r.lr,
        momentum=r.momentum,
        nesterov=r.nesterov,
        weight_decay=r.weight_decay,
        scheduler="plateau",
        plateau_factor=r.plateau_factor,
        plateau_patience=r.plateau_patience,
    )
    history = _make_history_callback()
    timer = _epoch_timer()
    limit = config.effective_limit_train_batches
    steps_per_epoch = math.ceil(len(dm.train_set) / r.batch_size)
    if limit is not None:
        steps_per_epoch = min(steps_per_epoch, limit)
    validated = validated_epoch_length(
        steps_per_epoch, config.effective_max_epochs, config.effective_max_steps
    )
    if validated < steps_per_epoch:
        steps_per_epoch = limit = validated
    diagnostics = _diagnostic_callbacks(steps_per_epoch) if spec.diagnostics else []
    activity = None
    if schedule is not None:
        from .renorm import RenormActivity

        activity = RenormActivity(every_n_steps=max(1, int(schedule.total_steps) // 200))
        diagnostics.append(activity)
    early = EarlyStopping(monitor="val/loss", mode="min", patience=r.early_stop_patience, check_finite=True)
    accelerator = _accelerator_name(config.accelerator)
    with _quiet_lightning():
        trainer = L.Trainer(
            accelerator=accelerator,
            devices=config.devices,
            max_epochs=config.effective_max_epochs,
            max_steps=config.effective_max_steps if config.effective_max_steps is not None else -1,
            callbacks=[history, early, *([timer] if timer is not None else []), *diagnostics],
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            num_sanity_val_steps=0,
            limit_train_batches=limit if limit is not None else 1.0,
            log_every_n_steps=1_000_000,
        )
        t_start = time.perf_counter()
        sigint = signal.getsignal(signal.SIGINT)
        try:
            trainer.fit(module, datamodule=dm)
        except SystemExit as exc:
            # Lightning turns Ctrl-C into a "graceful shutdown" that ends in sys.exit(1): give the caller the
            # KeyboardInterrupt back (the very one, a StudyInterrupted for SIGTERM), so that the study can say
            # how to resume.
            if trainer.interrupted:
                original = exc.__context__
                raise (original if isinstance(original, KeyboardInterrupt) else KeyboardInterrupt()) from exc
            raise
        finally:
            with contextlib.suppress(ValueError, TypeError):  # not the main thread / no Python handler
                signal.signal(signal.SIGINT, sigint)
        wall_fit = time.perf_counter() - t_start
        final_val_acc = history.history[-1]["val_acc"] if history.history else None
        if history.best_state is not None:
            module.load_state_dict(history.best_state)
        tested = trainer.test(module, datamodule=dm, verbose=False)
    test_acc = _metric(tested[0], "test/acc", "test/acc_epoch") if tested else None

    if timer is not None:  # the library's EpochTimer: training time of each epoch, validation excluded
        timed = {int(rec["epoch"]) + 1: rec.get("train_s") for rec in timer.history}
        for h in history.history:
            if timed.get(h["epoch"]) is not None:
                h["time_s"] = float(timed[h["epoch"]])
    epochs = len(history.history)

    full = max((h["steps"] for h in history.history), default=0)

    def steady_mean(key: str) -> float | None:
        # The first epoch carries one-off costs (allocator warm-up, lazy init): the mean leaves it out when
        # there are at least three epochs; an epoch cut short by max_steps is left out too.
        values = [h[key] for h in history.history if h.get(key) is not None and h["steps"] == full]
        values = values[1:] if len(values) >= 3 else values
        return sum(values) / len(values) if values else None

    diverged = any(h["val_loss"] is None or h["train_loss"] is None for h in history.history)
    steps_done = int(trainer.global_step)
    stopped_early = bool(early.stopped_epoch > 0)
    if diverged:
        stop_reason = "diverged"
    elif stopped_early:
        stop_reason = "early_stopping"
    elif config.effective_max_steps is not None and steps_done >= config.effective_max_steps:
        stop_reason = "max_steps"
    else:
        stop_reason = "max_epochs"
    record: dict[str, Any] = {
        "schema": RUN_SCHEMA,
        "key": run_key(spec, config),
        "experiment": spec.experiment,
        "level": spec.level.label,
        "variant": spec.variant,
        "model": spec.model,
        "dataset": config.dataset,
        "params": _jsonable(dict(spec.level.params)),
        "seed": spec.seed,
        "best_val_acc": history.best_val_acc if history.best_epoch > 0 else None,
        "best_epoch": history.best_epoch if history.best_epoch > 0 else None,
        "final_val_acc": final_val_acc,
        "test_acc": test_acc,
        "epochs": epochs,
        "max_epochs": config.effective_max_epochs,
        "stopped_early": stopped_early,
        "stop_reason": stop_reason,
        "max_steps": config.effective_max_steps,
        "steps": steps_done,
        "diverged": diverged,
        "epoch_time_s": steady_mean("time_s"),
        "epoch_cpu_time_s": steady_mean("cpu_s"),
        "fit_time_s": wall_fit,
        "num_params": count_parameters(model),
        "num_classes": int(dm.num_classes),
        "recipe": r.as_dict(),
        "model_kwargs": _jsonable(dict(config.preset_obj.model_kwargs.get(spec.model, {}))),
        "limit_train_batches": limit,
        "accelerator": accelerator,
        "device": _device_name(accelerator),
        "torch_threads": torch.get_num_threads(),
        "versions": {
            "normzoo": __version__,
            "torch": torch.__version__,
            "lightning": L.__version__,
            "python": platform.python_version(),
        },
        "finished_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "history": [
            {
                k: h[k]
                for k in (
                    "epoch",
                    "train_loss",
                    "val_loss",
                    "val_acc",
                    "time_s",
                    "cpu_s",
                    "steps",
                    "lr",
                    "train_acc",
                )
            }
            for h in history.history
        ],
        "diagnostics": _diagnostics_summary([d for d in diagnostics if d is not activity]) or None,
        "noise": _jsonable(NOISY_NOISE) if spec.variant == "noisy" else None,
        "renorm": None
        if schedule is None or activity is None
        else {
            # the layers' defaults: r_max 3 and d_max 5, reached at the schedule's breakpoints
            "schedule": {**schedule.as_dict(), "r_max": 3.0, "d_max": 5.0},
            "activity": _jsonable(activity.history),
            "after_warmup": _jsonable(summarize_activity(activity.history, schedule.breakpoints[0])),
        },
    }
    return record


def _device_name(accelerator: str) -> str:
    if accelerator == "gpu" and torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return platform.processor() or platform.machine() or "cpu"


# ---------------------------------------------------------------------------------------------------------
# the study loop


def _run_weight(spec: RunSpec, config: StudyConfig, n_train: int) -> float:
    """A rough relative cost of a run for the time-left estimate: epochs x (steps per epoch + a per-epoch
    cost of about 13 steps), the epochs limited by the step cap, a CNN step costing about 3.3 MLP steps
    (fitted on the quick preset's runs on a CPU)."""
    steps = math.ceil(n_train / spec.recipe.batch_size)
    limit = config.effective_limit_train_batches
    if limit is not None:
        steps = min(steps, limit)
    epochs = float(config.effective_max_epochs)
    if config.effective_max_steps is not None:
        epochs = min(epochs, math.ceil(config.effective_max_steps / steps))
    return epochs * (steps * (3.3 if spec.model == "cnn" else 1.0) + 13)


@dataclass
class StudyResult:
    """What :func:`run_study` did: the records in plan order and how many runs were trained or loaded."""

    out: Path
    records: list[dict[str, Any]]
    trained: int = 0
    cached: int = 0
    wall_time_s: float = 0.0
    trained_keys: list[str] = field(default_factory=list)
    #: runs that raised: ``{"key", "experiment", "level", "model", "variant", "seed", "error", "log"}``
    failed: list[dict[str, Any]] = field(default_factory=list)


def _format_seconds(seconds: float) -> str:
    seconds = max(0, round(seconds))
    minutes, s = divmod(seconds, 60)
    hours, m = divmod(minutes, 60)
    return f"{hours}h{m:02d}m" if hours else f"{m}m{s:02d}s"


def run_study(config: StudyConfig, *, plan: Sequence[RunSpec] | None = None) -> StudyResult:
    """Run (or load from the cache) every run of the study and write ``results.json``.

    Runs whose file exists in ``OUT/runs/`` are loaded, not trained (unless ``config.force``). The others are
    trained by ``config.executor`` (``"local"``: this process or ``config.workers`` worker processes;
    ``"ray"``: one task per run on a Ray cluster, see :func:`check_executor`); either way this process alone
    writes ``OUT``. The progress bar (tqdm, on stderr) shows runs done and an estimate of the time left. A run
    that raises is listed in :attr:`StudyResult.failed` (its traceback in ``OUT/runs/<key>.error.txt``) and
    the study goes on; a rerun retries it. ``KeyboardInterrupt`` (Ctrl-C) stops the study, and so does
    SIGTERM where its disposition is the default (it raises :class:`StudyInterrupted`): the worker processes
    or Ray tasks in flight are stopped and the finished runs stay cached.

    Raises:
        ImportError: ``config.executor == "ray"`` and Ray is not installed (before any run).
        DataNotFoundError: a Ray worker's node has no copy of the dataset's folder.
    """
    check_executor(config)
    plan = list(plan) if plan is not None else build_plan(config)
    if not plan:
        raise ValueError(
            "the selection leaves no run to do: the factors/models/variants chosen do not meet in preset "
            f"{config.preset!r}; --preset full starts from the whole grid"
        )
    out = check_output_folder(config.out)
    runs_dir = out / "runs"
    with StudyLock(out):
        # only now, holding the folder: temporary files left by a study that was killed are no one's
        for stale in runs_dir.glob(".*.tmp"):
            with contextlib.suppress(OSError):
                stale.unlink()
        return _run_locked(config, plan, out, runs_dir)


def check_executor(config: StudyConfig) -> None:
    """Raise ``ImportError`` with the command that installs it when ``config.executor`` needs a missing
    package (Ray for ``"ray"``); :func:`run_study` calls it before anything else.

    Example:
        >>> check_executor(StudyConfig(executor="local"))  # needs nothing
    """
    if config.executor == "ray":
        _import_ray()


def _import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise ImportError(
            '--executor ray needs Ray, which is not installed here: pip install "normzoo[ray]" (on every '
            "node of the cluster), or use --executor local"
        ) from None
    return ray


class StudyInterrupted(KeyboardInterrupt):
    """The study's process received ``signum`` (SIGTERM): raised in its main thread, it stops the study exactly
    as Ctrl-C does (a ``KeyboardInterrupt``), and the command exits with ``128 + signum``."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"received {signal.Signals(signum).name}")
        self.signum = signum


@contextlib.contextmanager
def _sigterm_stops_study() -> Iterator[None]:
    """While the study runs, SIGTERM raises :class:`StudyInterrupted` instead of ending the process at once
    (which left the worker processes training). Only the default disposition is replaced: a handler the
    caller installed, or an ignored SIGTERM, is theirs to keep. Signals reach the main thread only."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGTERM)
    if previous is not signal.SIG_DFL:
        yield
        return
    received: list[int] = []

    def interrupt(signum: int, frame: Any) -> None:
        received.append(signum)
        raise StudyInterrupted(signum)

    signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    except KeyboardInterrupt as error:
        # code between the handler and here may raise a KeyboardInterrupt of its own instead (Ray's wait
        # turns any exception of a signal handler into a new one): the caller still learns it was SIGTERM
        if received and not isinstance(error, StudyInterrupted):
            raise StudyInterrupted(received[-1]) from error
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)


def _run_locked(config: StudyConfig, plan: list[RunSpec], out: Path, runs_dir: Path) -> StudyResult:
    # leave the caller's process as it was: thread count and the variables that seed_everything sets
    threads_before = torch.get_num_threads()
    env_before = {name: os.environ.get(name) for name in ("PL_GLOBAL_SEED", "PL_SEED_WORKERS")}
    if config.threads:
        torch.set_num_threads(config.threads)
    try:
        with _sigterm_stops_study():
            return _run_plan(config, plan, out, runs_dir)
    finally:
        torch.set_num_threads(threads_before)
        for name, value in env_before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def default_workers(config: StudyConfig) -> int:
    """``config.workers``, or the CPU cores this process may use when training on the CPU (1 on a GPU)."""
    if config.workers is not None:
        return config.workers
    if _accelerator_name(config.accelerator) != "cpu":
        return 1
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


class DataNotFoundError(FileNotFoundError):
    """A worker of the study (a Ray task on another node) found no copy of the dataset where the study's
    process read it: torchvision datasets are read from ``--data-root`` at the same path on every node."""


def _for_workers(config: StudyConfig) -> StudyConfig:
    """``config`` as it is sent to worker processes and Ray tasks: what this process resolves by looking at
    itself resolved here, so that a worker elsewhere trains (and keys) the same run. ``accelerator="auto"``
    becomes what it means here, and the data folder an absolute path (a Ray worker on another node does not
    run in this process's working directory)."""
    changes: dict[str, Any] = {"accelerator": _accelerator_name(config.accelerator)}
    if config.dataset not in _GENERATED_DATASETS:
        changes["data_root"] = str(Path(config.data_root or "data").expanduser().absolute())
    return dataclasses.replace(config, **changes)


#: datasets made on the machine that trains (no folder to read): nothing to share between nodes
_GENERATED_DATASETS = ("digits", "mnist1d")

#: one data module per worker process (and its data settings), built on its first run
_WORKER_DATA: dict[tuple[Any, ...], _Data] = {}


def _worker_init(threads: int | None) -> None:
    if threads:
        torch.set_num_threads(threads)


def _node_name() -> str:
    """This machine, as a message to the user names it: the host name, and the node's IP inside Ray."""
    host = socket.gethostname()
    ray = sys.modules.get("ray")
    if ray is not None:
        with contextlib.suppress(Exception):
            if ray.is_initialized():
                return f"node {host} ({ray.util.get_node_ip_address()})"
    return f"node {host}"


#: what an attempt returns: ``(status, value, traceback)``, status ``"ok"``, ``"error"`` or ``"no-data"``
Outcome = tuple[str, Any, str]


def _attempt(spec: RunSpec, config: StudyConfig, data: _Data | None = None) -> Outcome:
    """Train ``spec``: ``("ok", record, "")``, or ``("error", "Type: message", traceback)`` when it raised,
    or ``("no-data", message naming this node and the folder, traceback)`` when the dataset is not here.

    Runs in the study's process, in a worker process or in a Ray task; outside the study's process the data
    module is built once per process (and data settings).
    """
    if data is None:
        key = (config.dataset, config.data_root, config.download, _accelerator_name(config.accelerator))
        data = _WORKER_DATA.setdefault(key, _Data(config))
    try:
        data.get(spec.recipe.batch_size, spec.recipe.classes_per_batch)
    except FileNotFoundError as error:  # only a worker can get here: the study's process read the data first
        return "no-data", f"{_node_name()}: {error}", traceback.format_exc()
    try:
        return "ok", run_one(spec, config, data), ""
    except Exception as error:  # one broken run must not cost the others: report it, go on
        return "error", f"{type(error).__name__}: {error}", traceback.format_exc()


def _attempts(
    config: StudyConfig, plan: list[RunSpec], todo: list[int], data: _Data, workers: int
) -> Generator[tuple[int, Outcome], None, None]:
    """``(index, outcome of _attempt)`` for every run of ``todo``: in this process one after the other, or in
    ``workers`` worker processes as they finish. Each run is seeded on its own and trains with the same
    number of threads either way, so its record is the same."""
    if workers <= 1 or len(todo) <= 1:
        for i in todo:
            yield i, _attempt(plan[i], config, data)
        return
    import concurrent.futures as cf
    import multiprocessing

    # "spawn": a fresh interpreter per worker, never a fork of a process that holds torch's thread pools
    pool = cf.ProcessPoolExecutor(
        max_workers=min(workers, len(todo)),
        mp_context=multiprocessing.get_context("spawn"),
        initializer=_worker_init,
        initargs=(config.threads,),
    )
    try:
        remote = _for_workers(config)
        futures = {pool.submit(_attempt, plan[i], remote): i for i in todo}
        for future in cf.as_completed(futures):
            yield futures[future], future.result()
    except BaseException:
        # Ctrl-C, SIGTERM (or the caller giving up): the runs in flight are lost either way, and a worker would
        # go on to the runs already queued for it, so stop the workers now instead of waiting for them
        _terminate_workers(pool)
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _terminate_workers(pool: Any) -> None:
    # SIGKILL, not SIGTERM: a worker inside Lightning's fit takes SIGTERM as "stop after this epoch" and goes
    # on for seconds; its run is lost either way
    if hasattr(pool, "kill_workers"):  # Python 3.14+
        pool.kill_workers()
        return
    for process in list((getattr(pool, "_processes", None) or {}).values()):
        with contextlib.suppress(Exception):
            process.kill()


def _ray_task(spec: RunSpec, config: StudyConfig) -> Outcome:
    """One run as a Ray task: the worker's torch threads set as a local worker's are, then :func:`_attempt`."""
    # Ctrl-C in a terminal reaches the workers of a local Ray instance too (they share its process group):
    # the study's process answers it by cancelling the tasks, and a task that also stopped on its own raced
    # with that cancellation (seen once: Ray 2.60 aborted the study's process in a failed check, "Tried to
    # complete task that was not pending", and left two of its agents running). On a cluster started with
    # `ray start` the workers never get the terminal's Ctrl-C; now they do not on a laptop either.
    with contextlib.suppress(ValueError):  # not the main thread: Ray runs a task in it, but keep it safe
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    _worker_init(config.threads)
    return _attempt(spec, config)


def ray_resources(config: StudyConfig) -> dict[str, float]:
    """What each run's Ray task asks for: ``config.threads`` CPUs (1 when unset), and on a GPU its devices.

    Example:
        >>> ray_resources(StudyConfig(threads=2)), ray_resources(StudyConfig(accelerator="gpu"))
        ({'num_cpus': 2}, {'num_cpus': 1, 'num_gpus': 1})
    """
    resources: dict[str, float] = {"num_cpus": config.threads or 1}
    if _accelerator_name(config.accelerator) == "gpu":
        resources["num_gpus"] = config.devices if isinstance(config.devices, int) else 1
    return resources


def _ray_attempts(
    config: StudyConfig, plan: list[RunSpec], todo: list[int]
) -> Generator[tuple[int, Outcome], None, None]:
    """``(index, outcome of _attempt)`` for every run of ``todo``, each trained by one Ray task, as they finish.

    Connects to the Ray instance this process already has, else ``ray.init(address=config.ray_address)``
    (Ray's own resolution when ``None``: ``RAY_ADDRESS``, a cluster started with ``ray start``, else a new
    local instance), and shuts down what it started. At most ``config.workers`` tasks are in flight when it
    is set; otherwise every run is submitted and Ray schedules them by their :func:`ray_resources`. Stopped
    early (Ctrl-C, SIGTERM, an error of the caller), it cancels the outstanding tasks (on a cluster it
    joined) or shuts down the instance it started, tasks and all.
    """
    ray = _import_ray()
    started = not ray.is_initialized()
    if started:
        sigterm = signal.getsignal(signal.SIGTERM)
        try:
            ray.init(address=config.ray_address)
        except ConnectionError as error:
            where = config.ray_address or os.environ.get("RAY_ADDRESS") or "auto"
            raise ConnectionError(
                f"could not connect to the Ray cluster at {where!r}: {error} (is it running? `ray status` "
                "on its head node says; without --ray-address and RAY_ADDRESS a local instance is started)"
            ) from error
        # ray.init makes SIGTERM a sys.exit: put back the handler that stops the study (or the caller's)
        with contextlib.suppress(ValueError, TypeError):  # not the main thread / no Python handler
            signal.signal(signal.SIGTERM, sigterm)
    pending: dict[Any, int] = {}
    try:
        _log.info("Ray: %s", ray.cluster_resources())
        task = ray.remote(_ray_task).options(**ray_resources(config))
        remote = ray.put(_for_workers(config))
        queue = list(todo)
        limit = config.workers or len(queue)
        while queue or pending:
            while queue and len(pending) < limit:
                i = queue.pop(0)
                pending[task.remote(plan[i], remote)] = i
            # a timeout, so that Ctrl-C and SIGTERM are handled within a second
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=1.0)
            for ref in ready:
                i = pending.pop(ref)
                try:
                    outcome: Outcome = ray.get(ref)
                except ray.exceptions.RayError as error:  # the task's worker died (out of memory, a crash)
                    outcome = ("error", f"{type(error).__name__}: {error}", str(error))
                yield i, outcome
    except BaseException:
        # An instance the study started goes down with its tasks in the shutdown below. Cancelling them first
        # races with their replies: Ray 2.60 then aborts this process ("Tried to complete task that was not
        # pending"), seen on SIGTERM in a CI run. Tasks on a cluster the study joined must be cancelled.
        if not started:
            for ref in pending:
                with contextlib.suppress(Exception):
                    ray.cancel(ref, force=True)
        raise
    finally:
        if started:
            ray.shutdown()


def _load_cached(runs_dir: Path, key: str, spec: RunSpec, config: StudyConfig) -> dict[str, Any] | None:
    """The record of ``spec`` in ``runs_dir``, or ``None``. A run cached under its key of an older normzoo
    (whose key held settings the run does not read, see :func:`relevant_recipe`) is moved to its key."""
    record = load_run(runs_dir / f"{key}.json")
    if record is not None:
        return record
    old = _legacy_run_key(spec, config)
    if old is None or (record := load_run(runs_dir / f"{old}.json")) is None:
        return None
    record["key"] = key
    _write_json_atomic(runs_dir / f"{key}.json", record)
    with contextlib.suppress(OSError):
        (runs_dir / f"{old}.json").unlink()
    return record


def _run_plan(config: StudyConfig, plan: list[RunSpec], out: Path, runs_dir: Path) -> StudyResult:
    keys = [run_key(spec, config) for spec in plan]
    records: list[dict[str, Any] | None] = [None] * len(plan)
    todo: list[int] = []
    for i, key in enumerate(keys):
        record = None if config.force else _load_cached(runs_dir, key, plan[i], config)
        if record is None:
            todo.append(i)
        else:
            records[i] = record
    result = StudyResult(out=out, records=[], cached=len(plan) - len(todo))

    data = _Data(config)
    t0 = time.perf_counter()
    if todo:
        n_train = len(data.get(plan[todo[0]].recipe.batch_size).train_set)
        weights = {i: _run_weight(plan[i], config, n_train) for i in todo}
        total_weight = sum(weights.values())
        done_weight = 0.0
        bar = _progress_bar(len(plan), result.cached, config.progress)
        one_by_one = False
        if config.executor == "ray":
            outcomes = _ray_attempts(config, plan, todo)
            bar.set_description("ray")
        else:
            workers = default_workers(config)
            outcomes = _attempts(config, plan, todo, data, workers)
            one_by_one = workers <= 1
            if not one_by_one:
                bar.set_description(f"{min(workers, len(todo))} workers")
        # closing the executor's generator on an exception here (the bar closed after it) stops it at once:
        # worker processes terminated, Ray tasks cancelled
        with contextlib.ExitStack() as stack:
            stack.callback(bar.close)
            stack.enter_context(contextlib.closing(outcomes))
            for i, (status, value, trace) in outcomes:
                spec = plan[i]
                if one_by_one:
                    bar.set_description(
                        f"{spec.model} {spec.experiment}:{spec.level.label} {spec.variant} s{spec.seed}"
                    )
                error_log = runs_dir / f"{keys[i]}.error.txt"
                if status == "no-data":
                    error_log.write_text(trace, encoding="utf-8")
                    raise DataNotFoundError(
                        f"{str(value).rstrip('.')}. A worker reads the dataset from the folder this process read it from, at "
                        f"the same path on every node (--data-root {_for_workers(config).data_root}); copy it "
                        "there, or mount it, and run the same command again (the finished runs are kept)"
                    )
                if status == "error":
                    error_log.write_text(trace, encoding="utf-8")
                    result.failed.append(
                        {
                            "key": keys[i],
                            "experiment": spec.experiment,
                            "level": spec.level.label,
                            "model": spec.model,
                            "variant": spec.variant,
                            "seed": spec.seed,
                            "error": value,
                            "log": str(error_log),
                        }
                    )
                    _log.error("run %s failed: %s (traceback in %s)", keys[i], value, error_log)
                else:
                    record = value
                    _write_json_atomic(runs_dir / f"{keys[i]}.json", record)
                    with contextlib.suppress(OSError):
                        error_log.unlink()
                    records[i] = record
                    result.trained += 1
                    result.trained_keys.append(keys[i])
                done_weight += weights[i]
                elapsed = time.perf_counter() - t0
                left = elapsed / done_weight * (total_weight - done_weight) if done_weight else 0.0
                bar.set_postfix_str(f"~{_format_seconds(left)} left", refresh=False)
                bar.update(1)
    result.wall_time_s = time.perf_counter() - t0

    for i, record in enumerate(records):
        if record is None:  # a failed run
            continue
        spec = plan[i]
        # a cached run may have been trained under other labels, or with other values of settings it does not
        # read (relevant_recipe): label it as this plan does
        record.update(
            experiment=spec.experiment,
            level=spec.level.label,
            params=_jsonable(dict(spec.level.params)),
            recipe=spec.recipe.as_dict(),
        )
    result.records = [r for r in records if r is not None]
    write_results(config, result)
    return result


def _progress_bar(total: int, initial: int, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(
        total=total,
        initial=initial,
        unit="run",
        disable=not enabled,
        file=sys.stderr,
        dynamic_ncols=True,
        bar_format="{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} runs [{elapsed}{postfix}]",
        postfix="estimating time left",
    )


def write_results(config: StudyConfig, result: StudyResult) -> Path:
    """Write ``OUT/results.json``: the study's settings and one record per run."""
    data = {
        "schema": RUN_SCHEMA,
        "study": {
            "preset": config.preset,
            "preset_description": PRESETS[config.preset].description,
            "dataset": config.dataset,
            "seeds": config.effective_seeds,
            "max_epochs": config.effective_max_epochs,
            "max_steps": config.effective_max_steps,
            "early_stop_patience": config.early_stop_patience,
            "accelerator": _accelerator_name(config.accelerator),
            "draw_margin": config.draw_margin,
            "factors": config.factors,
            "models": config.models,
            "variants": config.variants,
            "batch_sizes": config.batch_sizes,
            "runs": len(result.records),
            "trained": result.trained,
            "cached": result.cached,
            "failed": result.failed,
            "written_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        },
        "runs": result.records,
    }
    path = Path(config.out) / "results.json"
    _write_json_atomic(path, data)
    return path
