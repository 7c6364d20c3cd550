"""Diagnostics callbacks: see what normalization does to a model while it trains.

Each monitor samples every ``every_n_steps`` optimizer steps, keeps its values in ``.history`` (saved in
checkpoints), logs a few grouped scalars through ``pl_module.log`` (per layer only with
``log_per_layer=True``), and writes its figure at the end of training to ``<log_dir>/figures/<name>.png``
and to the loggers (``save_figure(path)`` writes it anywhere). All of them are rank-zero safe under DDP.

Example:
    >>> from normzoo.lightning.callbacks import GradientFlowMonitor, WeightNormMonitor, EpochTimer
    >>> callbacks = [GradientFlowMonitor(), WeightNormMonitor(), EpochTimer()]
    >>> [c.name for c in callbacks]
    ['gradient_flow', 'weight_norm', 'time']
"""

from ._base import DiagnosticCallback, LayerMonitor, ProbingMonitor, default_loss, find_blocks
from .activations import ActivationMonitor
from .covariate_shift import CovariateShiftMonitor
from .epoch_timer import EpochTimer
from .gradient_flow import GradientFlowMonitor
from .jacobian import JacobianSpectrumMonitor
from .loss_landscape import LossLandscapeMonitor
from .weight_norm import WeightNormMonitor

__all__ = [
    "ActivationMonitor",
    "CovariateShiftMonitor",
    "DiagnosticCallback",
    "EpochTimer",
    "GradientFlowMonitor",
    "JacobianSpectrumMonitor",
    "LayerMonitor",
    "LossLandscapeMonitor",
    "ProbingMonitor",
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
