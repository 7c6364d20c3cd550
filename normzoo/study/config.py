"""Load a study's settings from a TOML or JSON file.

A config file holds the same settings as the command line, with the option names written with underscores
(``max_epochs`` for ``--max-epochs``), either at the top level or under a ``[study]`` table::

    # study.toml
    [study]
    preset = "quick"
    factors = ["baseline", "activation:sigmoid", "batch_size"]
    models = ["mlp"]
    variants = ["vanilla", "batchnorm", "renorm"]
    seeds = [0, 1, 2]
    max_epochs = 100
    batch_sizes = [4, 16, 256]

The same as JSON: ``{"study": {"preset": "quick", "seeds": [0, 1, 2]}}``. Command-line options override the
file, which overrides the preset. TOML is read with the standard library's ``tomllib`` (Python 3.11+) or the
``tomli`` package where it is installed; on Python 3.10 without ``tomli`` use JSON (or ``pip install tomli``).

Example:
    >>> config_from_mapping({"preset": "tiny", "max-epochs": 2, "seeds": [3]}).max_epochs
    2
    >>> config_from_mapping({"epochs": 2})
    Traceback (most recent call last):
    ...
    ValueError: unknown setting 'epochs' in the config; valid settings: preset, out, factors, models, ...
"""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

from .grid import StudyConfig

__all__ = ["config_from_mapping", "load_config_file", "merge_config", "read_config_file"]


def _fields_of(annotation: str) -> set[str]:
    """The settings of :class:`StudyConfig` whose annotation (without ``| None``) is ``annotation``: every
    setting is declared once, on the dataclass, and its type there decides how a file's value is read."""
    return {
        f.name for f in dataclasses.fields(StudyConfig) if str(f.type).replace(" | None", "") == annotation
    }


_LIST_FIELDS = {**dict.fromkeys(_fields_of("list[str]"), str), **dict.fromkeys(_fields_of("list[int]"), int)}
_INT_FIELDS = _fields_of("int")
_BOOL_FIELDS = _fields_of("bool")
_FLOAT_FIELDS = _fields_of("float")
_STR_FIELDS = _fields_of("str")


def _toml_module() -> ModuleType | None:
    if sys.version_info >= (3, 11):
        import tomllib

        return tomllib
    try:
        import tomli  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        return None
    return tomli  # type: ignore[no-any-return,unused-ignore]


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The raw settings in ``path`` (``.toml`` or ``.json``), the ``[study]`` table if there is one."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {str(path)!r} does not exist")
    text = path.read_text(encoding="utf-8")
    suffix = path.suffix.lower()
    if suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"config file {str(path)!r} is not valid JSON: {error}") from error
    elif suffix == ".toml":
        toml = _toml_module()
        if toml is None:
            raise RuntimeError(
                f"reading {str(path)!r} needs TOML support: Python 3.11+ has it built in; on Python 3.10 "
                "install 'tomli' (pip install tomli) or write the config as JSON"
            )
        try:
            data = toml.loads(text)
        except toml.TOMLDecodeError as error:
            raise ValueError(f"config file {str(path)!r} is not valid TOML: {error}") from error
    else:
        raise ValueError(f"config file {str(path)!r} must end in .toml or .json")
    if not isinstance(data, dict):
        raise ValueError(f"config file {str(path)!r} must hold a table/object of settings")
    if "study" in data:
        extra = sorted(k for k in data if k != "study")
        if extra:
            raise ValueError(f"config file {str(path)!r}: settings {extra} are outside the [study] table")
        data = data["study"]
        if not isinstance(data, dict):
            raise ValueError(f"config file {str(path)!r}: 'study' must be a table/object")
    return dict(data)


def _field_names() -> list[str]:
    return [f.name for f in dataclasses.fields(StudyConfig)]


def _coerce(key: str, value: Any) -> Any:
    def fail(expected: str) -> ValueError:
        return ValueError(f"setting {key!r} must be {expected}, got {value!r}")

    if value is None:
        return None
    if key in _LIST_FIELDS:
        item_type = _LIST_FIELDS[key]
        if isinstance(value, str):
            value = [v for v in (part.strip() for part in value.split(",")) if v]
        if not isinstance(value, (list, tuple)):
            raise fail(f"a list of {item_type.__name__}")
        if item_type is int:
            if not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
                try:
                    return [int(v) for v in value]
                except (TypeError, ValueError):
                    raise fail("a list of integers") from None
            return list(value)
        if not all(isinstance(v, str) for v in value):
            raise fail("a list of strings")
        return list(value)
    if key in _INT_FIELDS:
        if isinstance(value, bool) or not isinstance(value, int):
            raise fail("an integer")
        return value
    if key in _BOOL_FIELDS:
        if not isinstance(value, bool):
            raise fail("true or false")
        return value
    if key in _FLOAT_FIELDS:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise fail("a number")
        return float(value)
    if key in _STR_FIELDS:
        if not isinstance(value, str):
            raise fail("a string")
        return value
    if key == "devices":
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise fail("an integer or a string")
        return value
    return value


def _normalize(settings: Mapping[str, Any], source: str) -> dict[str, Any]:
    names = _field_names()
    out: dict[str, Any] = {}
    for raw_key, value in settings.items():
        key = str(raw_key).replace("-", "_")
        if key not in names:
            raise ValueError(f"unknown setting {raw_key!r} in {source}; valid settings: {', '.join(names)}")
        out[key] = _coerce(key, value)
    return out


def merge_config(base: StudyConfig, settings: Mapping[str, Any], source: str = "the config") -> StudyConfig:
    """A copy of ``base`` with ``settings`` applied (names checked, values type-checked).

    Example:
        >>> merge_config(StudyConfig(preset="full"), {"seeds": "0,1"}).seeds
        [0, 1]
    """
    return dataclasses.replace(base, **_normalize(settings, source))


def config_from_mapping(settings: Mapping[str, Any], source: str = "the config") -> StudyConfig:
    """A :class:`StudyConfig` from a mapping of settings (defaults for the rest)."""
    return merge_config(StudyConfig(), settings, source)


def load_config_file(path: str | Path) -> StudyConfig:
    """A :class:`StudyConfig` from a TOML or JSON file (see the module docstring for the format)."""
    return config_from_mapping(read_config_file(path), f"config file {str(path)!r}")
