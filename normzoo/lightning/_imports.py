"""Optional dependencies of :mod:`normzoo.lightning`: import them or say exactly what to install.

``import normzoo`` needs torch alone. Everything under ``normzoo.lightning`` needs the ``lightning`` extra
(Lightning and torchmetrics), which :func:`require_lightning` checks where it is first needed (the public
names of ``normzoo.lightning``, the callbacks, the module, the sync plugin), except
:mod:`normzoo.lightning.plotting`, which needs matplotlib alone. A few pieces need more (timm for
``ClassificationModule("resnet18", ...)``, scikit-learn for the digits data, torchvision for
MNIST/SVHN/CIFAR), and :func:`import_optional` imports those at the point of use.

Both ask by importing, not through ``lightning_utilities``' ``RequirementCache``: its answer is cached for
the life of the process (``module_available`` is an ``lru_cache``), so a module that went missing after
the first question, or that a test hides, would still count as present.

Example:
    >>> import_optional("math", extra="lightning", feature="a doctest").sqrt(4.0)
    2.0
    >>> import_optional("no_such_module_xyz", extra="timm", feature="a timm backbone")
    Traceback (most recent call last):
    ...
    ImportError: a timm backbone needs the 'no_such_module_xyz' package, which is not installed: pip install "normzoo[timm]"
"""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["LIGHTNING_MODULES", "import_optional", "install_hint", "require_lightning"]

#: The modules that every part of :mod:`normzoo.lightning` needs.
LIGHTNING_MODULES = ("lightning", "torchmetrics")


def install_hint(extra: str) -> str:
    """The command that installs normzoo's optional dependency group ``extra``.

    Example:
        >>> install_hint("lightning")
        'pip install "normzoo[lightning]"'
    """
    return f'pip install "normzoo[{extra}]"'


def import_optional(module: str, *, extra: str, feature: str) -> ModuleType:
    """Import ``module``, or raise an ImportError naming ``feature``, the module and the pip command.

    Args:
        module: the module to import (``"timm"``, ``"sklearn.datasets"``...).
        extra: the normzoo extra that installs it (``"lightning"``, ``"timm"``, ``"study"``).
        feature: what needs it, for the message.
    """
    try:
        return importlib.import_module(module)
    except ImportError as error:
        package = module.split(".")[0]
        raise ImportError(
            f"{feature} needs the {package!r} package, which is not installed: {install_hint(extra)}"
        ) from error


def require_lightning(feature: str = "normzoo.lightning") -> None:
    """Raise an ImportError naming ``pip install "normzoo[lightning]"`` unless Lightning and torchmetrics import."""
    missing: list[str] = []
    first_error: ImportError | None = None
    for module in LIGHTNING_MODULES:
        try:
            importlib.import_module(module)
        except ImportError as error:
            missing.append(module)
            first_error = first_error or error
    if missing:
        names = " and ".join(repr(m) for m in missing)
        raise ImportError(
            f"{feature} needs {names}, which {'is' if len(missing) == 1 else 'are'} not installed: "
            f"{install_hint('lightning')}"
        ) from first_error
