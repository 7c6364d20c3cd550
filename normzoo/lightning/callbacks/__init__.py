"""Diagnostics callbacks: see what normalization does to a model while it trains.

Each monitor samples the first optimizer step, every ``every_n_steps``-th and the last (``every_n_steps``
defaults to an interval chosen from the run's length), keeps its values in ``.history`` (saved in
checkpoints), logs a few grouped scalars through ``pl_module.log`` (per layer only with
``log_per_layer=True``), and writes its figure at the end of training to ``<log_dir>/figures/<name>.png``
and to the loggers (``save_figure(path)`` writes it anywhere). All of them are rank-zero safe under DDP.

Example:
    >>> from normzoo.lightning.callbacks import GradientFlowMonitor, WeightNormMonitor, EpochTimer
    >>> callbacks = [GradientFlowMonitor(), WeightNormMonitor(), EpochTimer()]
    >>> [c.name for c in callbacks]
    ['gradient_flow', 'weight_norm', 'time']
"""

from .._imports import require_lightning

require_lightning("normzoo.lightning.callbacks")

from ._base import DiagnosticCallback  # noqa: E402
from ._layers import find_blocks  # noqa: E402
from ._replay import default_loss  # noqa: E402
from .activations import ActivationMonitor  # noqa: E402
from .covariate_shift import CovariateShiftMonitor  # noqa: E402
from .drift import TrainEvalDriftMonitor  # noqa: E402
from .epoch_timer import EpochTimer  # noqa: E402
from .gradient_flow import GradientFlowMonitor  # noqa: E402
from .jacobian import JacobianSpectrumMonitor  # noqa: E402
from .loss_landscape import LossLandscapeMonitor  # noqa: E402
from .precise_bn import PreciseBN  # noqa: E402
from .skipped_step_guard import SkippedStepGuard  # noqa: E402
from .weight_norm import WeightNormMonitor  # noqa: E402

__all__ = [
    "ActivationMonitor",
    "CovariateShiftMonitor",
    "DiagnosticCallback",
    "EpochTimer",
    "GradientFlowMonitor",
    "JacobianSpectrumMonitor",
    "LossLandscapeMonitor",
    "PreciseBN",
    "SkippedStepGuard",
    "TrainEvalDriftMonitor",
    "WeightNormMonitor",
    "all_monitors",
    "default_loss",
    "find_blocks",
]


def all_monitors(**kwargs: object) -> list[DiagnosticCallback]:
    """One of each monitor with default settings; ``kwargs`` (e.g. ``figure_dir``) go to every one."""
    return [
        cls(**kwargs)  # type: ignore[arg-type]
        for cls in (
            WeightNormMonitor,
            GradientFlowMonitor,
            ActivationMonitor,
            JacobianSpectrumMonitor,
            CovariateShiftMonitor,
            LossLandscapeMonitor,
            EpochTimer,
        )
    ]
