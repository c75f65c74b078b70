"""The registry of methods, memories and communicators, and the configuration layer.

Each component registers itself where it is defined (``@register``). Its parameters,
their types and defaults are read from its ``__init__`` signature, so the registry, the
factories (``grace_dl.topk(ratio=0.01)``), ``from_config`` and the generated docs never
disagree with the code. Unknown names, unknown keys and values of the wrong type raise
:class:`ConfigError`, naming the offender and listing what is valid.
"""

from __future__ import annotations

import inspect
import os
import types
import typing
from dataclasses import dataclass
from typing import Any, Callable

KINDS = ("compressor", "memory", "communicator")


class ConfigError(ValueError):
    """A configuration names something unknown or gives a bad value."""


@dataclass(frozen=True)
class Param:
    """One constructor parameter of a registered component."""

    name: str
    type: Any
    default: Any

    @property
    def type_name(self) -> str:
        """A short readable name of the parameter's type."""
        return getattr(self.type, "__name__", str(self.type).replace("typing.", ""))


@dataclass(frozen=True)
class Entry:
    """A registered component."""

    kind: str
    name: str
    cls: type
    paper: str
    summary: str
    params: dict[str, Param]


_REGISTRY: dict[str, dict[str, Entry]] = {k: {} for k in KINDS}


def _params_of(cls: type) -> dict[str, Param]:
    sig = inspect.signature(cls.__init__)
    hints = typing.get_type_hints(cls.__init__)
    params = {}
    for p in list(sig.parameters.values())[1:]:
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        if p.default is p.empty:
            raise TypeError(f"{cls.__name__}.{p.name} needs a default to be registered")
        params[p.name] = Param(p.name, hints.get(p.name, Any), p.default)
    return params


def register(kind: str, name: str, *, paper: str = "", summary: str = "") -> Callable[[type], type]:
    """Class decorator: register a compressor, memory or communicator under ``name``.

    Args:
        kind: ``"compressor"``, ``"memory"`` or ``"communicator"``.
        name: the registry name (what configs and factories use).
        paper: the citation of the method (default: empty).
        summary: one line for the generated docs (default: the class docstring's first line).
    """
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; valid: {KINDS}")

    def decorate(cls: type) -> type:
        if name in _REGISTRY[kind]:
            raise ValueError(f"{kind} {name!r} is registered twice "
                             f"({_REGISTRY[kind][name].cls.__qualname__} and {cls.__qualname__})")
        doc = (cls.__doc__ or "").strip().splitlines()
        _REGISTRY[kind][name] = Entry(kind, name, cls, paper, summary or (doc[0] if doc else ""),
                                      _params_of(cls))
        cls.registry_name = name
        return cls

    return decorate


def entries(kind: str) -> dict[str, Entry]:
    """All registered components of one kind, by name."""
    _ensure_loaded()
    return dict(_REGISTRY[kind])


def list_methods() -> list[str]:
    """Names of all registered compression methods."""
    return sorted(entries("compressor"))


def _ensure_loaded() -> None:
    # registration happens on import of the modules that define the components
    from . import communicators, compressors, memories  # noqa: F401


def _check_value(where: str, param: Param, value: Any) -> Any:
    expected = param.type
    # "float | None" and Optional[float] both list their members in get_args
    is_union = typing.get_origin(expected) in (typing.Union, types.UnionType)
    allowed = typing.get_args(expected) if is_union else (expected,)
    for t in allowed:
        if t is Any:
            return value
        if t is type(None) and value is None:
            return value
        if t is bool and isinstance(value, bool):
            return value
        if t is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if t is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            try:
                return float(value)
            except OverflowError:  # an int beyond float's range
                continue
        if t is str and isinstance(value, str):
            return value
    raise ConfigError(f"{where}: {param.name} must be {param.type_name}, got {value!r} "
                      f"({type(value).__name__})")


def build(kind: str, name: str, params: dict[str, Any] | None = None) -> Any:
    """Instantiate the registered ``kind`` called ``name`` with checked ``params``."""
    table = entries(kind)
    if not isinstance(name, str) or name not in table:
        raise ConfigError(f"unknown {kind} {name!r}; valid: {', '.join(sorted(table))}")
    entry = table[name]
    params = dict(params or {})
    unknown = sorted(set(params) - set(entry.params))
    if unknown:
        valid = ", ".join(entry.params) or "(none)"
        raise ConfigError(f"{kind} {name!r} has no parameter {unknown[0]!r}; valid: {valid}")
    checked = {k: _check_value(f"{kind} {name!r}", entry.params[k], v) for k, v in params.items()}
    try:
        return entry.cls(**checked)
    except (ValueError, TypeError) as err:
        raise ConfigError(f"{kind} {name!r}: {err}") from None


# Keys of a method configuration that are not parameters of a component.
_STRUCTURAL = ("compressor", "memory", "communicator", "seed", "policies")


def make(compressor: str, **kwargs: Any):
    """Build a ready :class:`~grace_dl.core.Grace` for a registered method.

    ``memory`` and ``communicator`` (registry names or instances) default to what the
    compressor is meant for; ``seed`` defaults to 0; ``policies`` (a mapping, see
    :func:`grace_dl.policies.parse_policies`: ``min_numel``, ``warmup_steps``,
    ``overrides``) defaults to none; every other keyword goes to the component(s) whose
    constructor takes it. An unknown keyword raises ConfigError listing the valid ones.
    """
    from .core import Communicator, Grace, Memory
    from .policies import parse_policies

    policies_config = kwargs.pop("policies", None)
    base_config = {"compressor": compressor, **{k: v for k, v in kwargs.items() if k != "seed"}}

    comp_entry = entries("compressor").get(compressor)
    if comp_entry is None:
        raise ConfigError(f"unknown compressor {compressor!r}; valid: {', '.join(list_methods())}")
    memory = kwargs.pop("memory", None) or comp_entry.cls.memory
    communicator = kwargs.pop("communicator", None) or comp_entry.cls.communicator
    seed = kwargs.pop("seed", 0)

    targets: list[tuple[str, Any]] = [("compressor", compressor)]
    if not isinstance(memory, Memory):
        targets.append(("memory", memory))
    if not isinstance(communicator, Communicator):
        targets.append(("communicator", communicator))
    for kind, name in targets[1:]:
        if not isinstance(name, str) or name not in entries(kind):
            raise ConfigError(f"unknown {kind} {name!r}; valid: {', '.join(sorted(entries(kind)))}")

    accepted = {kind: set(entries(kind)[name].params) for kind, name in targets}
    unknown = sorted(k for k in kwargs if not any(k in a for a in accepted.values()))
    if unknown:
        valid = sorted(set().union(*accepted.values()) | set(_STRUCTURAL))
        raise ConfigError(f"{compressor!r} has no parameter {unknown[0]!r}; valid: {', '.join(valid)}")
    chosen = {kind: {k: v for k, v in kwargs.items() if k in accepted[kind]} for kind, _ in targets}
    if "communicator" in chosen and "aggregate" in accepted["communicator"]:
        chosen["communicator"].setdefault("aggregate", comp_entry.cls.aggregate)
    built = {kind: build(kind, name, chosen[kind]) for kind, name in targets}
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ConfigError(f"seed must be int, got {seed!r}")
    policies = parse_policies(policies_config, base_config, from_config)
    try:
        return Grace(built["compressor"],
                     built.get("memory", memory if isinstance(memory, Memory) else None),
                     built.get("communicator", communicator if isinstance(communicator, Communicator) else None),
                     seed=seed, policies=policies)
    except ValueError as err:
        raise ConfigError(str(err)) from None


def parse_yaml(text: Any, where: str) -> Any:
    """The parsed YAML document ``text`` (a string or a file); a malformed or too deeply
    nested document raises a one-line :class:`ConfigError` starting with ``where`` (with
    the line and column of a syntax error).

    Numbers in exponent notation without a dot (``1e-9``) are floats, as in YAML 1.2
    (PyYAML's YAML 1.1 reads them as strings)."""
    import yaml

    try:
        return yaml.load(text, Loader=_yaml_loader())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        at = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"{where}: malformed YAML{at}: {problem}") from None
    except RecursionError:
        raise ConfigError(f"{where}: YAML nested too deeply to read") from None


_LOADER: Any = None


def _yaml_loader() -> Any:
    global _LOADER
    if _LOADER is None:
        import re

        import yaml

        class Loader(yaml.SafeLoader):
            """PyYAML's safe loader, reading ``1e-9`` as a float."""

        Loader.add_implicit_resolver("tag:yaml.org,2002:float",
                                     re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
                                     list("-+0123456789"))
        _LOADER = Loader
    return _LOADER


def read_yaml(path: str | os.PathLike) -> Any:
    """The parsed YAML document at ``path`` (see :func:`parse_yaml`); a missing, unreadable,
    malformed or too deeply nested file raises a one-line :class:`ConfigError` naming the
    file (and the line and column of a syntax error)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ConfigError(f"{path}: no such config file")
    try:
        with open(path, encoding="utf-8") as f:
            return parse_yaml(f, path)
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: cannot read: {err}") from None


def from_config(config: dict[str, Any] | str | os.PathLike):
    """Build a Grace from a dict or a YAML file path.

    The mapping has ``compressor`` (required), optional ``memory``, ``communicator`` and
    ``seed``, and the parameters of those components, flat: for example
    ``{"compressor": "topk", "ratio": 0.01, "memory": "residual"}``.
    """
    if isinstance(config, (str, os.PathLike)):
        config = read_yaml(config)
    if not isinstance(config, dict):
        raise ConfigError(f"a method config must be a mapping, got {type(config).__name__}")
    config = dict(config)
    if "compressor" not in config:
        raise ConfigError("method config lacks the required key 'compressor'")
    return make(config.pop("compressor"), **config)


# GRACE's parameter names -> ours.
GRACE_KEY_MAP = {"compress_ratio": "ratio", "quantum_num": "levels"}
# GRACE keys that our pipeline takes from the transport instead.
GRACE_IGNORED_KEYS = ("world_size",)


def grace_from_params(params: dict[str, Any]):
    """Build a Grace from a GRACE-style parameter dict, e.g.
    ``{'compressor': 'topk', 'memory': 'residual', 'communicator': 'allgather',
    'compress_ratio': 0.01}`` (GRACE's ``grace_from_params``)."""
    if not isinstance(params, dict):
        raise ConfigError(f"params must be a dict, got {type(params).__name__}")
    translated = {}
    for key, value in params.items():
        if key in GRACE_IGNORED_KEYS:
            continue
        translated[GRACE_KEY_MAP.get(key, key)] = value
    return from_config(translated)
