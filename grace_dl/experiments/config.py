"""The YAML schema of an experiment: loading, validation and defaults.

An experiment file is a mapping; every key is optional and has a default (see
``docs/user-guide.md`` for the full reference)::

    name: quickstart
    framework: torch            # torch | tensorflow
    task: {name: digits}        # digits | charlm | synthetic, with the task's options
    model: {arch: mlp, hidden: 64}
    optimizer: {name: sgd, lr: 0.1, momentum: 0.9, weight_decay: 0.0}
    schedule: {name: constant}  # constant | cosine | step
    compression: {compressor: topk, ratio: 0.05}
    local_sgd: {period: 4}      # optional: average models every 4 steps (compression then
                                # compresses the model differences; default none)
    workers: 2
    launcher: horovodrun-gloo   # horovodrun-gloo | horovodrun-mpi | simulator
    seed: 0
    epochs: 5                   # or steps: 200
    batch_size: 32              # per worker
    eval_every: 20              # steps
    output_dir: results/quickstart

A sweep replaces ``compression`` by ``sweep: {methods: [...]}``, a list of compression
mappings run one after the other on the same base experiment and then compared (an
entry may also give its run a ``name`` and its own ``optimizer`` settings, merged over
the base ones).

Unknown keys and bad values raise :class:`grace_dl.ConfigError` with a one-line message
that starts with the key's path, e.g. ``optimizer.lr: must be float > 0, got 'abc'``.
"""

from __future__ import annotations

import copy
import os
import re
from dataclasses import asdict, dataclass, field
from typing import Any

from ..registry import ConfigError, _check_value, entries, list_methods, read_yaml, resolve_grace_names

FRAMEWORKS = ("torch", "tensorflow")
LAUNCHERS = ("horovodrun-gloo", "horovodrun-mpi", "simulator")
TASKS = ("digits", "charlm", "synthetic")
OPTIMIZERS = ("sgd", "adam")
SCHEDULES = ("constant", "cosine", "step")

#: Standard-library modules whose sources make the character-level corpus (fixed, so the
#: task is the same on every machine with the same Python version).
CHARLM_MODULES = ("textwrap", "string", "shlex", "fnmatch", "glob", "bisect", "heapq", "colorsys",
                  "keyword", "copy", "functools", "contextlib")

# Options of each task and model: name -> (default, checker). Checkers are built below.
_UNSET = object()


def _fmt(value: Any) -> str:
    return repr(value)


def _fail(path: str, what: str, value: Any = _UNSET) -> ConfigError:
    got = "" if value is _UNSET else f", got {_fmt(value)}"
    return ConfigError(f"{path}: {what}{got}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _int(path: str, value: Any, lo: int | None = None, hi: int | None = None) -> int:
    ok = _is_int(value) and (lo is None or value >= lo) and (hi is None or value <= hi)
    if not ok:
        bounds = " and ".join(b for b in (f">= {lo}" if lo is not None else "",
                                          f"<= {hi}" if hi is not None else "") if b)
        raise _fail(path, f"must be int{' ' + bounds if bounds else ''}", value)
    return int(value)


def _float(path: str, value: Any, *, gt: float | None = None, ge: float | None = None,
           lt: float | None = None, le: float | None = None) -> float:
    # YAML reads 1e-3 (no dot) as a string; accept numeric strings of that form only
    if isinstance(value, str) and re.fullmatch(r"[+-]?\d+(\.\d*)?[eE][+-]?\d+", value.strip()):
        value = float(value)
    ok = _is_number(value) and value == value and abs(value) != float("inf")
    if ok:
        ok = ((gt is None or value > gt) and (ge is None or value >= ge)
              and (lt is None or value < lt) and (le is None or value <= le))
    if not ok:
        bounds = [f"> {gt:g}" if gt is not None else "", f">= {ge:g}" if ge is not None else "",
                  f"< {lt:g}" if lt is not None else "", f"<= {le:g}" if le is not None else ""]
        bounds = " and ".join(b for b in bounds if b)
        raise _fail(path, f"must be float{' ' + bounds if bounds else ''}", value)
    return float(value)


def _choice(path: str, value: Any, choices: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise _fail(path, f"must be one of {', '.join(choices)}", value)
    return value


def _str(path: str, value: Any, pattern: str | None = None, what: str = "a string") -> str:
    if not isinstance(value, str) or not value or (pattern and not re.fullmatch(pattern, value)):
        raise _fail(path, f"must be {what}", value)
    return value


def _mapping(path: str, value: Any, shorthand_key: str | None = None) -> dict[str, Any]:
    """A mapping, or a bare string standing for ``{shorthand_key: value}``."""
    if value is None:
        return {}
    if shorthand_key and isinstance(value, str):
        return {shorthand_key: value}
    if not isinstance(value, dict):
        extra = f" or a {shorthand_key} name" if shorthand_key else ""
        raise _fail(path, f"must be a mapping{extra}", value)
    for key in value:
        if not isinstance(key, str):
            raise _fail(path, "keys must be strings", key)
    return dict(value)


def _unknown(path: str, mapping: dict[str, Any], valid) -> None:
    unknown = [k for k in mapping if k not in valid]
    if unknown:
        prefix = f"{path}." if path else ""
        raise ConfigError(f"{prefix}{unknown[0]}: unknown key; valid: {', '.join(valid)}")


def _modules(path: str, value: Any) -> tuple[str, ...]:
    if not isinstance(value, (list, tuple)) or not value:
        raise _fail(path, "must be a non-empty list of standard-library module names", value)
    for i, name in enumerate(value):
        _str(f"{path}[{i}]", name, r"[A-Za-z_][\w.]*", "a module name")
    return tuple(value)


# task name -> {option: (default, checker(path, value))}
TASK_OPTIONS: dict[str, dict[str, tuple[Any, Any]]] = {
    "digits": {
        "test_fraction": (0.2, lambda p, v: _float(p, v, gt=0.0, lt=1.0)),
    },
    "charlm": {
        "modules": (CHARLM_MODULES, _modules),
        "max_chars": (60_000, lambda p, v: _int(p, v, 1_000)),
        "seq_len": (48, lambda p, v: _int(p, v, 2)),
        "test_fraction": (0.1, lambda p, v: _float(p, v, gt=0.0, lt=1.0)),
    },
    "synthetic": {
        "kind": ("least_squares", lambda p, v: _choice(p, v, ("least_squares", "logistic"))),
        "samples": (4096, lambda p, v: _int(p, v, 2)),
        "dim": (64, lambda p, v: _int(p, v, 1)),
        "noise": (0.1, lambda p, v: _float(p, v, ge=0.0)),
        "l2": (1e-3, lambda p, v: _float(p, v, ge=0.0)),
    },
}

# task name -> {option: (default, checker)}; ``arch`` lists the models of the task
MODEL_OPTIONS: dict[str, dict[str, tuple[Any, Any]]] = {
    "digits": {
        "arch": ("mlp", lambda p, v: _choice(p, v, ("mlp", "cnn"))),
        "hidden": (64, lambda p, v: _int(p, v, 1)),
    },
    "charlm": {
        "arch": ("gru", lambda p, v: _choice(p, v, ("gru", "lstm"))),
        "embed": (32, lambda p, v: _int(p, v, 1)),
        "hidden": (128, lambda p, v: _int(p, v, 1)),
        "layers": (1, lambda p, v: _int(p, v, 1, 4)),
    },
    "synthetic": {
        "arch": ("linear", lambda p, v: _choice(p, v, ("linear",))),
    },
}

OPTIMIZER_OPTIONS: dict[str, dict[str, tuple[Any, Any]]] = {
    "sgd": {
        "lr": (0.1, lambda p, v: _float(p, v, gt=0.0)),
        "momentum": (0.0, lambda p, v: _float(p, v, ge=0.0, lt=1.0)),
        "weight_decay": (0.0, lambda p, v: _float(p, v, ge=0.0)),
    },
    "adam": {
        "lr": (1e-3, lambda p, v: _float(p, v, gt=0.0)),
        "weight_decay": (0.0, lambda p, v: _float(p, v, ge=0.0)),
    },
}

SCHEDULE_OPTIONS: dict[str, dict[str, tuple[Any, Any]]] = {
    "constant": {
        "warmup_steps": (0, lambda p, v: _int(p, v, 0)),
    },
    "cosine": {
        "warmup_steps": (0, lambda p, v: _int(p, v, 0)),
        "min_lr": (0.0, lambda p, v: _float(p, v, ge=0.0)),
    },
    "step": {
        "warmup_steps": (0, lambda p, v: _int(p, v, 0)),
        "step_size": (100, lambda p, v: _int(p, v, 1)),
        "gamma": (0.1, lambda p, v: _float(p, v, gt=0.0, le=1.0)),
    },
}

TOP_KEYS = ("name", "framework", "task", "model", "optimizer", "schedule", "compression", "local_sgd", "workers",
            "launcher", "seed", "steps", "epochs", "batch_size", "eval_every", "output_dir", "sweep")


def _bool(path: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise _fail(path, "must be true or false", value)
    return value


#: options of the ``local_sgd`` section (see :class:`grace_dl.LocalSGD`)
LOCAL_SGD_OPTIONS: dict[str, tuple[Any, Any]] = {
    "period": (4, lambda p, v: _int(p, v, 1)),
    "switch_step": (0, lambda p, v: _int(p, v, 0)),
    "adaptive": (False, _bool),
    "min_period": (1, lambda p, v: _int(p, v, 1)),
    "overlap": (False, _bool),
    "pull": (0.5, lambda p, v: _float(p, v, gt=0.0, le=1.0)),
}


def validate_local_sgd(value: Any, path: str = "local_sgd") -> dict[str, Any] | None:
    """Check a ``local_sgd`` section (None or false: off; true: the defaults; or a mapping
    of :data:`LOCAL_SGD_OPTIONS`); returns it with defaults filled in, or None."""
    if value is None or value is False:
        return None
    raw = {} if value is True else _mapping(path, value)
    checked = _options(path, raw, LOCAL_SGD_OPTIONS)
    if checked["min_period"] > checked["period"]:
        raise _fail(f"{path}.min_period", f"must be <= period ({checked['period']})", checked["min_period"])
    return checked


def build_local_sgd(local_sgd: dict[str, Any], compression: dict[str, Any], path: str = "local_sgd",
                    compression_path: str = "compression"):
    """A :class:`grace_dl.LocalSGD` from validated ``local_sgd`` and ``compression``
    sections (the compression then compresses the model differences); a compression
    that does not average (a majority vote) raises ConfigError."""
    from ..localsgd import LocalSGD

    try:
        return LocalSGD(**local_sgd, compression=build_compression(compression, compression_path))
    except ValueError as err:
        raise ConfigError(f"{path}: {err}") from None


def _options(path: str, raw: dict[str, Any], options: dict[str, tuple[Any, Any]],
             extra_valid: tuple[str, ...] = ()) -> dict[str, Any]:
    """Check ``raw``'s keys against ``options`` and return every option, defaults filled in."""
    _unknown(path, raw, extra_valid + tuple(options))
    return {key: check(f"{path}.{key}", raw[key] if key in raw else default)
            for key, (default, check) in options.items()}


def _named_section(path: str, value: Any, name_key: str, table: dict[str, dict[str, tuple[Any, Any]]],
                   default_name: str) -> dict[str, Any]:
    """A ``{name: <one of table>, option: value ...}`` section (or just the name)."""
    raw = _mapping(path, value, name_key)
    name = _choice(f"{path}.{name_key}", raw.pop(name_key, default_name), tuple(table))
    return {name_key: name, **_options(path, raw, table[name], (name_key,))}


def validate_compression(value: Any, path: str = "compression", seed: int = 0) -> dict[str, Any]:
    """Check a compression mapping (what :func:`grace_dl.from_config` takes: ``compressor``
    (alias ``method``), ``memory``, ``communicator``, the parameters, and ``policies``) by building it;
    returns the normalised mapping (``compressor`` key, ``seed`` filled in)."""
    raw = _mapping(path, value, "compressor")
    if "method" in raw:
        if "compressor" in raw:
            raise ConfigError(f"{path}.method: give either method or compressor, not both")
        raw["compressor"] = raw.pop("method")
    raw = resolve_grace_names(raw)  # GRACE's names, as from_config takes them
    if "compressor" not in raw:
        raise ConfigError(f"{path}.compressor: required (one of {', '.join(list_methods())})")
    method = raw["compressor"]
    if not isinstance(method, str) or method not in list_methods():
        raise ConfigError(f"{path}.compressor: unknown method {method!r}; registered: {', '.join(list_methods())}")
    cls = entries("compressor")[method].cls
    memory = raw.get("memory") or cls.memory
    communicator = raw.get("communicator") or cls.communicator
    for kind, chosen in (("memory", memory), ("communicator", communicator)):
        if not isinstance(chosen, str) or chosen not in entries(kind):
            raise ConfigError(f"{path}.{kind}: unknown {kind} {chosen!r}; valid: {', '.join(sorted(entries(kind)))}")
    owners = [entries("compressor")[method], entries("memory")[memory], entries("communicator")[communicator]]
    structural = ("compressor", "memory", "communicator", "seed", "policies")
    for key, val in raw.items():
        if key in structural:
            continue
        params = [e.params[key] for e in owners if key in e.params]
        if not params:
            valid = sorted({k for e in owners for k in e.params} | set(structural))
            raise ConfigError(f"{path}.{key}: {method!r} has no parameter {key!r}; valid: {', '.join(valid)}")
        try:
            raw[key] = _check_value("x", params[0], val)
        except ConfigError:
            raise _fail(f"{path}.{key}", f"must be {params[0].type_name}", val) from None
    raw["seed"] = _int(f"{path}.seed", raw.get("seed", seed), 0)
    if "policies" in raw:
        raw["policies"] = _mapping(f"{path}.policies", raw["policies"])
    build_compression(raw, path)
    return raw


def build_compression(mapping: dict[str, Any], path: str = "compression"):
    """A :class:`~grace_dl.core.Grace` from a validated compression mapping; errors are
    ConfigError naming ``path``."""
    from ..registry import from_config

    try:
        return from_config(dict(mapping))
    except ConfigError as err:
        text = str(err)
        # "compressor 'topk': ratio must be ..." -> "compression.ratio: must be ..."
        match = re.match(r"(?:compressor|memory|communicator) '[^']*': (\w+) (.*)", text)
        if match and match.group(1) in mapping:
            raise ConfigError(f"{path}.{match.group(1)}: {match.group(2)}") from None
        # "policies.min_numel must be ..." -> "compression.policies.min_numel: must be ..."
        match = re.match(r"(policies(?:\.\w+|\[[^\]]*\])*):? (.*)", text)
        if match:
            raise ConfigError(f"{path}.{match.group(1)}: {match.group(2)}") from None
        raise ConfigError(f"{path}: {text}") from None


def check_momentum(compression: dict[str, Any], optimizer: dict[str, Any], compression_path: str = "compression",
                   optimizer_path: str = "optimizer") -> None:
    """Refuse an optimizer momentum on top of a method that keeps its own (DGC, Signum,
    1-bit Adam): momentum would be applied twice and training diverges; and Adam on top of
    a method that hands back Adam's direction (1-bit Adam) (see :mod:`grace_dl.checks`)."""
    from ..checks import adaptive_optimizer_message, momentum_param, own_momenta

    momentum = optimizer.get("momentum", 0.0)
    if optimizer.get("name") == "adam":
        message = adaptive_optimizer_message(build_compression(compression, compression_path), "optimizer adam")
        if message is not None:
            raise ConfigError(f"{optimizer_path}.name: {message}")
    if not momentum > 0:
        return
    method = build_compression(compression, compression_path)
    momenta = own_momenta(method)
    if momenta:
        memory, own = momenta[0]
        raise ConfigError(f"{optimizer_path}.momentum: {compression['compressor']} keeps its own momentum "
                          f"({memory} memory, momentum={own:g}), so momentum={momentum:g} in the optimizer would "
                          f"apply momentum twice and training diverges; set {optimizer_path}.momentum: 0 (the "
                          f"method's momentum takes its place: {compression_path}.{momentum_param(method)})")


@dataclass
class ExperimentConfig:
    """A validated experiment, every default filled in (see the module docstring)."""

    name: str
    framework: str = "torch"
    task: dict[str, Any] = field(default_factory=dict)
    model: dict[str, Any] = field(default_factory=dict)
    optimizer: dict[str, Any] = field(default_factory=dict)
    schedule: dict[str, Any] = field(default_factory=dict)
    compression: dict[str, Any] | None = None
    local_sgd: dict[str, Any] | None = None
    workers: int = 2
    launcher: str = "horovodrun-gloo"
    seed: int = 0
    steps: int | None = None
    epochs: int | None = None
    batch_size: int = 32
    eval_every: int | None = None
    output_dir: str = ""
    sweep: list[dict[str, Any]] | None = None

    def to_dict(self) -> dict[str, Any]:
        """The configuration as plain data (what ``config.yaml`` of a run holds)."""
        out = asdict(self)
        if out["local_sgd"] is None:
            del out["local_sgd"]
        if out["sweep"] is None:
            del out["sweep"]
        else:
            out["sweep"] = {"methods": out["sweep"]}
            del out["compression"]
        return _plain(out)

    def run_configs(self) -> list["ExperimentConfig"]:
        """One config per run: itself, or one per method of a sweep (in its own sub-directory)."""
        if self.sweep is None:
            return [self]
        runs = []
        for entry in self.sweep:
            method = dict(entry)
            label = method.pop("name")
            optimizer = method.pop("optimizer", self.optimizer)
            local_sgd = method.pop("local_sgd", self.local_sgd)
            runs.append(ExperimentConfig(**{**asdict(self), "sweep": None, "compression": method,
                                            "name": label, "optimizer": optimizer, "local_sgd": local_sgd,
                                            "output_dir": os.path.join(self.output_dir, label)}))
        return runs


def _plain(value: Any) -> Any:
    """Tuples as lists, recursively (YAML's safe dumper knows lists only)."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _labels(methods: list[dict[str, Any]]) -> list[str]:
    labels, seen = [], {}
    for m in methods:
        label = m.get("name") or m["compressor"]
        seen[label] = seen.get(label, 0) + 1
        labels.append(label if seen[label] == 1 else f"{label}-{seen[label]}")
    return labels


def validate(raw: Any, *, default_name: str = "experiment") -> ExperimentConfig:
    """Check a parsed YAML document and fill in defaults; ConfigError on the first problem."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"the experiment must be a mapping of keys, got {type(raw).__name__}")
    raw = copy.deepcopy(raw)
    _unknown("", raw, TOP_KEYS)
    name = _str("name", raw.get("name", default_name), r"[\w.+-]+", "a name of letters, digits, . _ + -")
    framework = _choice("framework", raw.get("framework", "torch"), FRAMEWORKS)
    task = _named_section("task", raw.get("task"), "name", TASK_OPTIONS, "digits")
    # the models (and their options) depend on the task
    model = _options("model", _mapping("model", raw.get("model"), "arch"), MODEL_OPTIONS[task["name"]])
    optimizer = _named_section("optimizer", raw.get("optimizer"), "name", OPTIMIZER_OPTIONS, "sgd")
    schedule = _named_section("schedule", raw.get("schedule"), "name", SCHEDULE_OPTIONS, "constant")
    workers = _int("workers", raw.get("workers", 2), 1, 64)
    launcher = _choice("launcher", raw.get("launcher", "horovodrun-gloo"), LAUNCHERS)
    seed = _int("seed", raw.get("seed", 0), 0)
    steps, epochs = raw.get("steps"), raw.get("epochs")
    if steps is not None and epochs is not None:
        raise ConfigError("steps: give steps or epochs, not both")
    if steps is not None:
        steps = _int("steps", steps, 1)
    else:
        epochs = _int("epochs", 1 if epochs is None else epochs, 1)
    batch_size = _int("batch_size", raw.get("batch_size", 32), 1)
    eval_every = raw.get("eval_every")
    if eval_every is not None:
        eval_every = _int("eval_every", eval_every, 1)
    output_dir = _str("output_dir", raw.get("output_dir", os.path.join("results", name)), what="a path")

    local_sgd = validate_local_sgd(raw.get("local_sgd"))
    compression, sweep = None, None
    if "sweep" in raw:
        if "compression" in raw:
            raise ConfigError("compression: a sweep takes its methods from sweep.methods; remove compression")
        spec = _mapping("sweep", raw["sweep"])
        _unknown("sweep", spec, ("methods",))
        methods = spec.get("methods")
        if not isinstance(methods, list) or not methods:
            raise _fail("sweep.methods", "must be a non-empty list of compression mappings", methods)
        sweep = []
        for i, m in enumerate(methods):
            m = _mapping(f"sweep.methods[{i}]", m, "compressor")
            label = m.pop("name", None)
            own_optimizer = m.pop("optimizer", None)
            own_local = m.pop("local_sgd", _UNSET)
            checked = validate_compression(m, f"sweep.methods[{i}]", seed)
            if own_local is not _UNSET:
                checked["local_sgd"] = validate_local_sgd(own_local, f"sweep.methods[{i}].local_sgd")
            chosen_local = checked.get("local_sgd", local_sgd)
            if chosen_local is not None:
                build_local_sgd(chosen_local, {k: v for k, v in checked.items() if k not in ("optimizer", "local_sgd")},
                                f"sweep.methods[{i}].local_sgd", f"sweep.methods[{i}]")
            if own_optimizer is not None:
                # merged over the base optimizer (replaced when it names another optimizer)
                own = _mapping(f"sweep.methods[{i}].optimizer", own_optimizer, "name")
                merged = own if own.get("name", optimizer["name"]) != optimizer["name"] else {**optimizer, **own}
                checked["optimizer"] = _named_section(f"sweep.methods[{i}].optimizer", merged, "name",
                                                      OPTIMIZER_OPTIONS, "sgd")
            method = {k: v for k, v in checked.items() if k not in ("optimizer", "local_sgd")}
            check_momentum(method, checked.get("optimizer", optimizer), f"sweep.methods[{i}]",
                           f"sweep.methods[{i}].optimizer" if own_optimizer is not None else "optimizer")
            if label is not None:
                checked["name"] = _str(f"sweep.methods[{i}].name", label, r"[\w.+-]+",
                                       "a name of letters, digits, . _ + -")
            sweep.append(checked)
        for m, label in zip(sweep, _labels(sweep)):
            m["name"] = label
    else:
        compression = validate_compression(raw.get("compression", "none"), "compression", seed)
        check_momentum(compression, optimizer)
        if local_sgd is not None:
            build_local_sgd(local_sgd, compression)

    return ExperimentConfig(name=name, framework=framework, task=task, model=model, optimizer=optimizer,
                            schedule=schedule, compression=compression, local_sgd=local_sgd, workers=workers,
                            launcher=launcher,
                            seed=seed, steps=steps, epochs=epochs, batch_size=batch_size, eval_every=eval_every,
                            output_dir=output_dir, sweep=sweep)


def load(path: str | os.PathLike, overrides: dict[str, Any] | None = None) -> ExperimentConfig:
    """Read and validate an experiment YAML file. ``overrides`` maps dotted key paths to
    values that replace the file's (``{"output_dir": "out", "optimizer.lr": 0.05}``;
    ``steps`` replaces the file's ``epochs`` and the other way round)."""
    path = os.fspath(path)
    raw = read_yaml(path)
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: an experiment must be a mapping of keys, got {type(raw).__name__}")
    overrides = dict(overrides or {})
    # steps and epochs exclude each other: overriding one replaces the file's other
    for key, other in (("steps", "epochs"), ("epochs", "steps")):
        if key in overrides and other not in overrides:
            raw.pop(other, None)
    for dotted, value in overrides.items():
        _set_path(raw, dotted, value)
    stem = re.sub(r"[^\w.+-]", "_", os.path.splitext(os.path.basename(path))[0]) or "experiment"
    return validate(raw, default_name=stem)


def _set_path(raw: dict[str, Any], dotted: str, value: Any) -> None:
    """Set ``raw[a][b] = value`` for ``dotted = "a.b"`` (a bare-string section such as
    ``task: digits`` becomes ``{name: digits}`` first)."""
    keys = dotted.split(".")
    node = raw
    for i, key in enumerate(keys[:-1]):
        child = node.get(key)
        if isinstance(child, str):
            child = {SHORTHAND.get(".".join(keys[:i + 1]), "name"): child}
        elif child is None:
            child = {}
        elif not isinstance(child, dict):
            raise ConfigError(f"{'.'.join(keys[:i + 1])}: is not a mapping, cannot set {dotted}")
        node[key] = child
        node = child
    node[keys[-1]] = value


#: The key a bare string stands for in each section (``task: digits`` is ``task: {name: digits}``).
SHORTHAND = {"task": "name", "model": "arch", "optimizer": "name", "schedule": "name", "compression": "compressor"}


def dump(config: ExperimentConfig, path: str | os.PathLike) -> None:
    """Write ``config`` as YAML (loadable by :func:`load`)."""
    import yaml

    with open(path, "w", encoding="utf-8") as f:
        yaml.safe_dump(config.to_dict(), f, sort_keys=False)
