"""The registry of methods, memories and communicators, and the configuration layer.

Each component registers itself where it is defined (``@register``). Its parameters,
their types and defaults are read from its ``__init__`` signature, so the registry, the
factories (``grace_dl.topk(ratio=0.01)``), ``from_config`` and the generated docs never
disagree with the code. Unknown names, unknown keys and values of the wrong type raise
:class:`ConfigError`, naming the offender and listing what is valid.
"""

from __future__ import annotations

import inspect
import logging
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Callable

KINDS = ("compressor", "memory", "communicator")


class ConfigError(ValueError):
    """A configuration names something unknown or gives a bad value.

    The message is always one line: control characters that came from the input (a YAML
    key holding a newline) are shown escaped, so a CLI error stays one line."""

    def __init__(self, message: Any = "", *args: Any):
        text = str(message)
        if not text.isprintable():
            text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
        super().__init__(text, *args)


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
    from . import localsgd  # noqa: F401  (registers training algorithms)


# -- training algorithms ---------------------------------------------------------------
@dataclass(frozen=True)
class Algorithm:
    """A registered training algorithm: a schedule around the user's optimizer (local SGD)
    rather than a gradient compressor; it may run any registered compressor inside."""

    name: str
    cls: type
    paper: str
    summary: str
    params: dict[str, Param]


_ALGORITHMS: dict[str, Algorithm] = {}


def register_algorithm(name: str, *, paper: str, summary: str = "") -> Callable[[type], type]:
    """Class decorator: register a training algorithm under ``name``, with its ``paper``
    (the citations) and a one-line ``summary`` (default: the docstring's first line)."""

    def decorate(cls: type) -> type:
        if name in _ALGORITHMS:
            raise ValueError(f"algorithm {name!r} is registered twice")
        doc = (cls.__doc__ or "").strip().splitlines()
        _ALGORITHMS[name] = Algorithm(name, cls, paper, summary or (doc[0] if doc else ""), _params_of(cls))
        cls.registry_name = name
        return cls

    return decorate


def algorithms() -> dict[str, Algorithm]:
    """All registered training algorithms, by name."""
    _ensure_loaded()
    return dict(_ALGORITHMS)


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
    ``{"compressor": "topk", "ratio": 0.01, "memory": "residual"}``. GRACE's names are
    accepted where they name nothing registered (see :data:`GRACE_NAMES` and
    :func:`resolve_grace_names`); the defaults stay grace-dl's.
    """
    if isinstance(config, (str, os.PathLike)):
        config = read_yaml(config)
    if not isinstance(config, dict):
        raise ConfigError(f"a method config must be a mapping, got {type(config).__name__}")
    config = resolve_grace_names(config)
    if "compressor" not in config:
        raise ConfigError("method config lacks the required key 'compressor'")
    return make(config.pop("compressor"), **config)



# -- GRACE (sands-lab/grace) names ------------------------------------------------------
_log = logging.getLogger("grace_dl")
_LEFT_OUT = "docs/left-out.md"


@dataclass(frozen=True)
class GraceName:
    """How one name of a GRACE ``grace_from_params`` dict maps onto grace-dl.

    Attributes:
        ours: grace-dl's name (a registered component, or a parameter); None when the
            name is accepted without effect (``why`` is logged once) or refused.
        why: for a name without effect, the reason logged; for a refused one, the error.
        refused: the name is refused with ``why`` (a method left out, or a GRACE
            communicator grace-dl does not have).
        refuse_if: for a parameter, a test of the value: values it holds for are refused
            with ``why`` (others have no effect, or map to ``ours``).
        defaults: GRACE's helper defaults for this compressor or memory, in GRACE's keys
            (applied by :func:`grace_from_params` only).
        memories: for a compressor, GRACE's memory name -> grace-dl's, where this method
            differs from the memory rows; None refuses that memory with this method,
            with ``memory_why`` (GRACE's Signum keeps its momentum in the compressor,
            grace-dl's in memory ``signum_momentum``, which leaves no room for another).
        memory_why: why the memories mapped to None are refused.
        serves: for a memory, the only GRACE compressor it works with (GRACE's ``dgc`` and
            ``powersgd`` memories read their compressor's context or Q).
        communicator: for a compressor that did its own exchange inside GRACE's
            ``compress`` (PowerSGD), grace-dl's communicator, whatever GRACE's dict names.
    """

    ours: str | None
    why: str = ""
    refused: bool = False
    refuse_if: Callable[[Any], bool] | None = None
    defaults: dict[str, Any] = field(default_factory=dict)
    memories: dict[str, str | None] = field(default_factory=dict)
    memory_why: str = ""
    serves: str | None = None
    communicator: str | None = None


def _left_out(method: str, instead: str) -> GraceName:
    return GraceName(None, refused=True, why=f"GRACE's {method!r} is left out of grace-dl on purpose (see "
                     f"{_LEFT_OUT}); use compressor {instead!r} instead")


#: Every name GRACE's ``grace_from_params`` accepts (its torch, TensorFlow and
#: torch.distributed helpers), keyed by (kind, GRACE's name), kind one of
#: ``"compressor"``, ``"memory"``, ``"communicator"`` and ``"param"``. The defaults are
#: those of GRACE's helper. Read by :func:`grace_from_params` (GRACE's meaning and
#: defaults) and :func:`from_config` (only names that are not registered here).
GRACE_NAMES: dict[tuple[str, str], GraceName] = {
    # compressors
    ("compressor", "none"): GraceName("none"),
    ("compressor", "fp16"): GraceName("fp16"),
    ("compressor", "topk"): GraceName("topk", defaults={"compress_ratio": 0.3}),
    ("compressor", "randomk"): GraceName("randomk", defaults={"compress_ratio": 0.3}),
    ("compressor", "threshold"): GraceName("threshold", defaults={"threshold": 0.01}),
    ("compressor", "dgc"): GraceName("dgc", defaults={"compress_ratio": 0.3}),
    ("compressor", "qsgd"): GraceName("qsgd", defaults={"quantum_num": 127}),
    # GRACE's CUDA kernels of the same methods (torch.distributed helper)
    ("compressor", "qsgd_cuda"): GraceName("qsgd", defaults={"quantum_num": 127}),
    ("compressor", "natural"): GraceName("natural"),
    ("compressor", "natural_cuda"): GraceName("natural"),
    ("compressor", "onebit"): GraceName("onebit"),
    ("compressor", "signsgd"): GraceName("signsgd"),
    ("compressor", "signum"): GraceName(
        "signum", defaults={"momentum": 0.9},
        memories={"none": "signum_momentum", "residual": None, "dgc": None, "efsignsgd": None, "powersgd": None},
        memory_why="grace-dl's signum keeps its momentum in its own memory, so it takes no other; use 'memory': "
                   "'none' (the momentum still applies)"),
    ("compressor", "efsignsgd"): GraceName("efsignsgd", defaults={"lr": 0.1}),
    ("compressor", "terngrad"): GraceName("terngrad"),
    # GRACE's PowerSGD allreduces P and Q inside compress and hands its communicator nothing
    ("compressor", "powersgd"): GraceName(
        "powersgd", communicator="powersgd",
        memories={"none": None, "residual": None, "dgc": None, "efsignsgd": None},
        memory_why="its Q and error feedback live in memory 'powersgd' (GRACE's powersgd failed without it); "
                   "use 'memory': 'powersgd'"),
    ("compressor", "sketch"): GraceName(
        None, refused=True,
        why="GRACE's 'sketch' is SketchML's quantile-bucket quantizer (Jiang et al. 2018), not grace-dl's "
            f"'sketch' (the count sketch of Ivkin et al. 2019); see {_LEFT_OUT}; use compressor 'qsgd' "
            "(quantum_num=127: 8 bits per element) instead, or grace_dl.sketch for the count sketch"),
    ("compressor", "u8bit"): _left_out("u8bit", "qsgd"),
    ("compressor", "adaq"): _left_out("adaq", "adaptive_threshold"),
    ("compressor", "inceptionn"): _left_out("inceptionn", "fp16"),
    # memories
    ("memory", "none"): GraceName("none"),
    ("memory", "residual"): GraceName("residual"),
    ("memory", "dgc"): GraceName("dgc_momentum", serves="dgc",
                                 defaults={"momentum": 0.9, "gradient_clipping": False}),
    # GRACE's EF memory scales the error feedback by lr and its aggregate divides by lr:
    # for a constant lr that is the unscaled residual memory
    ("memory", "efsignsgd"): GraceName("residual", defaults={"lr": 0.1}),
    ("memory", "powersgd"): GraceName("powersgd", serves="powersgd", defaults={"compress_rank": 1}),
    # communicators
    ("communicator", "allreduce"): GraceName("allreduce"),
    ("communicator", "allgather"): GraceName("allgather"),
    ("communicator", "broadcast"): GraceName("broadcast"),
    ("communicator", "alltoall"): GraceName(
        None, refused=True,
        why="GRACE's 'alltoall' (torch.distributed only: reduce-scatter of codes, then a second compression "
            "and an allgather) is not a grace-dl communicator; use 'communicator': 'allgather'"),
    # parameters
    ("param", "compress_ratio"): GraceName("ratio"),
    ("param", "quantum_num"): GraceName("levels"),
    ("param", "bucket_size"): GraceName("bucket_size"),
    ("param", "compress_rank"): GraceName("rank"),
    ("param", "momentum"): GraceName("momentum"),
    ("param", "threshold"): GraceName("threshold"),
    ("param", "world_size"): GraceName(None, why="grace-dl takes the number of workers from the transport"),
    ("param", "kernel"): GraceName(None, why="GRACE's choice of top-k kernel; grace-dl runs the framework's own"),
    ("param", "lr"): GraceName(
        None, why="GRACE's efsignsgd scaled its error feedback by lr and divided the aggregate by lr, which "
                  "cancels; grace-dl's efsignsgd is the unscaled form"),
    ("param", "momentum_factor"): GraceName(
        None, why="GRACE's TensorFlow powersgd added a running average of past aggregates to each aggregate "
                  "(its torch one did not); grace-dl's powersgd follows the paper: use the optimizer's momentum"),
    ("param", "gradient_clipping"): GraceName(
        None, refuse_if=bool,
        why="gradient_clipping=True (GRACE's dgc memory) clamped each element to the workers' root-mean-square "
            "gradient norm; grace-dl's dgc clips the gradient's norm instead: set clip_norm"),
    ("param", "quantiles"): GraceName(None, why="a parameter of GRACE's sketch (SketchML), which grace-dl does not have"),
    ("param", "error_bound"): GraceName(None, why="a parameter of GRACE's inceptionn, which grace-dl leaves out"),
}

_noted: set[str] = set()


def _note_no_effect(key: str, why: str) -> None:
    # once per key and process: a script builds its method once per tensor group or rank
    if key not in _noted:
        _noted.add(key)
        _log.warning("grace-dl: GRACE key %r has no effect here: %s", key, why)


def _grace_row(kind: str, name: Any) -> GraceName | None:
    return GRACE_NAMES.get((kind, name)) if isinstance(name, str) else None


def _translate_param(key: str, value: Any, config: dict[str, Any], noted: bool = True) -> None:
    """Put GRACE's ``key: value`` into ``config`` under grace-dl's name (or drop it)."""
    row = _grace_row("param", key)
    if row is None:
        config[key] = value
        return
    if row.refuse_if is not None and row.refuse_if(value):
        raise ConfigError(f"{key}={value!r}: {row.why}")
    if row.ours is None:
        if noted:
            _note_no_effect(key, row.why)
        return
    config[row.ours] = value


def resolve_grace_names(config: dict[str, Any]) -> dict[str, Any]:
    """``config`` (a method mapping, as :func:`from_config` takes) with GRACE's names
    replaced by grace-dl's where they name nothing registered here: compressors
    (``natural_cuda`` -> ``natural``; a left-out method raises ConfigError naming
    :file:`docs/left-out.md` and the method to use), memories (``dgc`` ->
    ``dgc_momentum``), communicators and parameters (``compress_ratio`` -> ``ratio``);
    a GRACE parameter without effect here is dropped with a note in the log (once)."""
    out: dict[str, Any] = {}
    for kind in KINDS:
        if kind not in config:
            continue
        name = config[kind]
        row = _grace_row(kind, name)
        if row is not None and name not in entries(kind):
            if row.refused:
                raise ConfigError(row.why)
            name = row.ours
        out[kind] = name
    names = {kind: out.get(kind) for kind in KINDS}
    comp_entry = entries("compressor").get(names["compressor"])
    if comp_entry is not None:
        names["memory"] = names["memory"] or comp_entry.cls.memory
        names["communicator"] = names["communicator"] or comp_entry.cls.communicator
    native = set(_STRUCTURAL)
    for kind, name in names.items():
        entry = entries(kind).get(name) if isinstance(name, str) else None
        native |= set(entry.params) if entry is not None else set()
    for key, value in config.items():
        if key in KINDS:
            continue
        if key in native:
            out[key] = value
        else:
            _translate_param(key, value, out)
    return out


def grace_from_params(params: dict[str, Any]):
    """Build a Grace from a GRACE-style parameter dict, with GRACE's meaning and defaults.

    Every key and name that GRACE's ``grace_from_params`` (torch, TensorFlow and
    torch.distributed helpers) accepts is taken, through :data:`GRACE_NAMES`: for
    example ``{'compressor': 'topk', 'memory': 'residual', 'communicator': 'allgather'}``
    builds ``topk`` with ``ratio=0.3`` (GRACE's default) and residual memory, over
    allgather. As in GRACE, a missing ``compressor``, ``memory`` or ``communicator`` is
    ``'none'``, ``'none'`` and ``'allreduce'``, and a GRACE key the chosen method does
    not read is ignored (with a note in the log, once per key, as for keys that have no
    effect here: ``world_size``, ``kernel``). grace-dl's own names and parameters are
    accepted too (``'warm_start': False``); unknown keys raise ConfigError.

    A dict GRACE accepted but whose result was meaningless raises a one-line
    ConfigError saying what to change: a compressor whose payload cannot be summed over
    ``allreduce`` (GRACE's allreduce added the compressed arrays, indices and codes
    included, elementwise), and the methods left out (``u8bit``, ``adaq``,
    ``inceptionn``, GRACE's SketchML ``sketch``; see :file:`docs/left-out.md`).

    Args:
        params: GRACE's dict: ``compressor``, ``memory``, ``communicator`` and the
            method's parameters (``compress_ratio``, ``quantum_num``, ``momentum``,
            ``compress_rank``, ...).
    """
    if not isinstance(params, dict):
        raise ConfigError(f"params must be a dict, got {type(params).__name__}")
    given = dict(params)
    names = {"compressor": given.pop("compressor", "none"), "memory": given.pop("memory", "none"),
             "communicator": given.pop("communicator", "allreduce")}
    rows = {}
    for kind, name in names.items():
        row = _grace_row(kind, name)
        if row is None:
            if isinstance(name, str) and name in entries(kind):
                continue  # a grace-dl name GRACE did not have (sidco, natural_dithering ...)
            grace = sorted(n for k, n in GRACE_NAMES if k == kind and not GRACE_NAMES[k, n].refused)
            raise ConfigError(f"unknown {kind} {name!r}; GRACE's: {', '.join(grace)}; "
                              f"grace-dl's: {', '.join(sorted(entries(kind)))}")
        if row.refused:
            raise ConfigError(row.why)
        rows[kind] = row
    comp_row, mem_row = rows.get("compressor"), rows.get("memory")
    if comp_row is not None and comp_row.memories.get(names["memory"], "") is None:
        raise ConfigError(f"GRACE's {names['compressor']!r} with memory {names['memory']!r}: {comp_row.memory_why}")
    if mem_row is not None and mem_row.serves is not None and mem_row.serves != names["compressor"]:
        raise ConfigError(f"GRACE's memory {names['memory']!r} works only with compressor {mem_row.serves!r} (it "
                          f"reads that compressor's state; GRACE failed with {names['compressor']!r}); use "
                          f"'memory': 'residual'")
    if comp_row is not None:
        names["compressor"] = comp_row.ours
        names["memory"] = comp_row.memories.get(names["memory"], names["memory"])
        names["communicator"] = comp_row.communicator or names["communicator"]
    for kind in ("memory", "communicator"):
        row = _grace_row(kind, names[kind])
        if row is not None:
            names[kind] = row.ours
    cls = entries("compressor")[names["compressor"]].cls
    if names["communicator"] == "allreduce" and not cls.summable:
        absent = " (GRACE's default)" if "communicator" not in params else ""
        raise ConfigError(f"{params.get('compressor', 'none')!r} over 'allreduce'{absent}: GRACE's allreduce added "
                          f"the compressed arrays (indices and codes included) elementwise, which gives no "
                          f"meaningful aggregate for {cls.__name__}; set 'communicator': 'allgather'")

    # GRACE's helper defaults for its compressor and memory, under the user's keys
    values = {}
    for row in (comp_row, mem_row):
        values.update(row.defaults if row is not None else {})
    values.update(given)
    accepted = set(_STRUCTURAL)
    for kind, name in names.items():
        accepted |= set(entries(kind)[name].params)
    config: dict[str, Any] = dict(names)
    for key, value in values.items():
        row = _grace_row("param", key)
        target = row.ours if row is not None else key
        if row is not None and target is not None and target not in accepted and key not in accepted:
            # GRACE's helper reads each key only for the methods that take it
            if key in given:
                _note_no_effect(key, f"{names['compressor']!r} with memory {names['memory']!r} does not read it "
                                     f"(nor did GRACE's helper)")
            continue
        if key in accepted:
            config[key] = value
        else:
            _translate_param(key, value, config, noted=key in given)
    return from_config(config)
