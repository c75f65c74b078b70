"""What a training benchmark runs: methods, links and presets (framework-free)."""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field
from typing import Any

import yaml

from ..registry import ConfigError, entries

#: launchers: ``hvd`` = ``horovodrun -np N --gloo`` with Horovod's DistributedOptimizer,
#: ``ddp`` = N spawned torch.distributed (Gloo) processes with DistributedDataParallel
LAUNCHERS = ("hvd", "ddp")
#: Horovod's own compressors (``compression=hvd.Compression.<name>``)
HOROVOD_BUILTINS = ("none", "fp16")
#: torch's own DDP paths: no hook (DDP's allreduce), ``fp16_compress_hook``, ``powerSGD_hook``
DDP_BUILTINS = ("allreduce", "fp16_hook", "powersgd_hook")
#: parameters of torch's PowerSGD hook that a spec may set (``rank`` is its matrix_approximation_rank)
#: ``bucket_mb`` is DDP's bucket_cap_mb (default 1024: one bucket, see worker.py for why)
POWERSGD_HOOK_PARAMS = ("rank", "start_iter", "min_compression_rate", "warm_start", "error_feedback", "bucket_mb")
#: local SGD (:mod:`grace_dl.localsgd`): the models, not the gradients, are averaged every
#: ``period`` steps; ``post_local_sgd`` is the same method with a ``switch_step`` required.
#: Under ``hvd`` grace-dl's ``LocalSGD`` wraps the optimizer (no DistributedOptimizer); under
#: ``ddp`` its ``post_local_sgd_hook`` and ``PostLocalSGDOptimizer`` run
LOCAL_SGD_NAMES = ("local_sgd", "post_local_sgd")
#: the optimizers a method may name with ``optimizer=`` (default ``sgd``: SGD without momentum)
OPTIMIZERS = ("sgd", "adam")


@dataclass(frozen=True)
class MethodSpec:
    """One way to exchange gradients, written ``LAUNCHER:NAME[,KEY=VALUE...]``.

    ``hvd:none`` and ``hvd:fp16`` are Horovod's own compressors, ``ddp:allreduce``,
    ``ddp:fp16_hook`` and ``ddp:powersgd_hook,rank=4`` torch's own DDP paths; any other
    name is a grace-dl method (``hvd:topk,ratio=0.01``, ``ddp:powersgd,rank=4``), and a
    ``grace.`` prefix picks grace-dl's method where a name is also a built-in
    (``hvd:grace.fp16``). A grace-dl method also takes ``fusion=BYTES``, its fusion
    bucket size (``policies.fusion_bytes``, :mod:`grace_dl.fusion`; default the method's),
    and under ``hvd`` ``background=0|1``, whether its pipelines run on a background thread
    (:class:`grace_dl.torch.HorovodCompression`'s ``background``; default the adapter's),
    and ``placeholders=0|1``, whether Horovod allreduces grace-dl's empty placeholder of
    every gradient at every step (``placeholder_allreduce``; default 0: only at the first),
    and ``round_batch=BYTES``, the adapter's ``round_batch_bytes`` (0: one Horovod
    allreduce per pipeline and round, as before :class:`grace_dl.torch.horovod.RoundBatcher`;
    default the adapter's: one per round for the whole step). ``tree=PATH`` runs a grace-dl
    method's ranks on another copy of the library (the directory holding its ``grace_dl``,
    such as a checkout of an earlier commit), so that before and after a change run in one
    invocation. Every ``hvd`` method also takes ``cycle_ms=MS``, Horovod's cycle time for its
    launch (``HOROVOD_CYCLE_TIME``; default Horovod's, 1 ms in 0.28), so that Horovod's
    settings can be compared in one invocation too.

    ``local_sgd`` and ``post_local_sgd`` are local SGD (``hvd:local_sgd,period=4``,
    ``ddp:post_local_sgd,period=4,switch_step=2``; parameters those of
    :func:`grace_dl.local_sgd` but ``compression``). ``onebit_adam`` needs ``freeze_step``:
    its dense warm-up runs untimed. Every method takes ``optimizer=sgd|adam`` (default
    ``sgd``: SGD without momentum, lr 0.01; ``adam``: torch's Adam, lr 0.01), so that
    ``hvd:none,optimizer=adam`` is dense Adam.
    """

    launcher: str
    name: str
    params: tuple[tuple[str, Any], ...] = ()
    grace: bool = False

    @property
    def label(self) -> str:
        """The spec as written (canonical form)."""
        name = f"grace.{self.name}" if self.grace and self.name in _builtins(self.launcher) else self.name
        return ",".join([f"{self.launcher}:{name}"] + [f"{k}={v}" for k, v in self.params])

    def as_dict(self) -> dict[str, Any]:
        """Plain form for JSON and for the worker."""
        return {"launcher": self.launcher, "name": self.name, "params": dict(self.params), "grace": self.grace,
                "label": self.label}


def _builtins(launcher: str) -> tuple[str, ...]:
    return HOROVOD_BUILTINS if launcher == "hvd" else DDP_BUILTINS


def parse_method(text: str) -> MethodSpec:
    """Parse ``LAUNCHER:NAME[,KEY=VALUE...]`` (see :class:`MethodSpec`); bad specs raise
    :class:`~grace_dl.registry.ConfigError` naming what is wrong."""
    launcher, sep, rest = text.strip().partition(":")
    if not sep or launcher not in LAUNCHERS:
        raise ConfigError(f"method {text!r}: expected LAUNCHER:NAME[,KEY=VALUE...] with LAUNCHER one of "
                          f"{', '.join(LAUNCHERS)}, e.g. hvd:topk,ratio=0.01")
    name, *items = [part.strip() for part in rest.split(",")]
    params = []
    for item in items:
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise ConfigError(f"method {text!r}: expected KEY=VALUE after the name, got {item!r}")
        params.append((key.strip(), yaml.safe_load(value)))
    cycle = [(k, v) for k, v in params if k == "cycle_ms"]
    if not cycle:
        return _parse(text, launcher, name, params)
    value = cycle[-1][1]
    if launcher != "hvd":
        raise ConfigError(f"method {text!r}: cycle_ms is Horovod's cycle time (HOROVOD_CYCLE_TIME), for hvd "
                          f"methods only")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ConfigError(f"method {text!r}: cycle_ms is Horovod's cycle time in milliseconds, a number > 0, "
                          f"got {value!r}")
    spec = _parse(text, launcher, name, [(k, v) for k, v in params if k != "cycle_ms"])
    return dataclasses.replace(spec, params=spec.params + (("cycle_ms", value),))


def _parse(text: str, launcher: str, name: str, params: list[tuple[str, Any]]) -> MethodSpec:
    """:func:`parse_method` after the parameters every launch of a launcher takes."""
    grace = name.startswith("grace.")
    if grace:
        name = name[len("grace."):]
    _check_optimizer(text, name, dict(params).get("optimizer", "sgd"))
    if name in LOCAL_SGD_NAMES:
        return _parse_local_sgd(text, launcher, name, params)
    builtins = _builtins(launcher)
    if not grace and name in builtins:
        allowed = POWERSGD_HOOK_PARAMS if name == "powersgd_hook" else ()
        bad = [k for k, _ in params if k not in allowed and k != "optimizer"]
        if bad:
            raise ConfigError(f"method {text!r}: {launcher}:{name} takes "
                              f"{'parameters ' + ', '.join(allowed) if allowed else 'no parameters'} (and optimizer=), "
                          f"got {bad[0]!r}")
        return MethodSpec(launcher, name, tuple(params), grace=False)
    compressors = entries("compressor")
    if name not in compressors:
        raise ConfigError(f"method {text!r}: unknown method {name!r}; {launcher}: takes "
                          f"{', '.join(builtins + LOCAL_SGD_NAMES)} or a grace-dl method "
                          f"({', '.join(sorted(compressors))})")
    known = compressors[name].params
    extra = (("fusion", "optimizer", "tree", "background", "placeholders", "round_batch") if launcher == "hvd"
             else ("fusion", "optimizer", "tree"))
    bad = [k for k, _ in params if k not in known and k not in extra]
    if bad:
        raise ConfigError(f"method {text!r}: {name} has no parameter {bad[0]!r} "
                          f"(it takes {', '.join(known) or 'none'}); every grace-dl method also takes fusion=BYTES "
                          f"and optimizer={'|'.join(OPTIMIZERS)}"
                          + (", and under hvd background=0|1, placeholders=0|1 and round_batch=BYTES" if launcher == "hvd"
                             else ""))
    tree = dict(params).get("tree")
    if tree is not None and not os.path.isfile(os.path.join(str(tree), "grace_dl", "trainbench", "worker.py")):
        raise ConfigError(f"method {text!r}: tree is a directory holding another copy of grace_dl (with "
                          f"grace_dl/trainbench/worker.py), got {tree!r}")
    for key, what in (("fusion", "the bucket size"), ("round_batch", "the round batch size")):
        value = dict(params).get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise ConfigError(f"method {text!r}: {key} is {what} in bytes, an int >= 0, got {value!r}")
    for flag in ("background", "placeholders"):
        value = dict(params).get(flag)
        if value is not None and value not in (0, 1):  # True/False are 1/0 too
            raise ConfigError(f"method {text!r}: {flag} is 0 or 1, got {value!r}")
    if getattr(compressors[name].cls, "returns_update", False):
        _check_update_method(text, name, dict(params))
    return MethodSpec(launcher, name, tuple(params), grace=True)


def _check_optimizer(text: str, name: str, optimizer: Any) -> None:
    if optimizer not in OPTIMIZERS:
        raise ConfigError(f"method {text!r}: optimizer must be one of {', '.join(OPTIMIZERS)}, got {optimizer!r}")


def _check_update_method(text: str, name: str, params: dict[str, Any]) -> None:
    """A method that hands back the optimizer's update (1-bit Adam) runs with plain SGD,
    unfused, and its dense warm-up is not what the benchmark times."""
    if params.get("optimizer", "sgd") != "sgd":
        raise ConfigError(f"method {text!r}: {name} hands back Adam's update direction, so it runs with "
                          f"optimizer=sgd (the default; it takes Adam's betas and eps itself)")
    if "fusion" in params:
        raise ConfigError(f"method {text!r}: {name} takes no fusion (a method that hands back an optimizer "
                          f"update takes no policies)")
    if "freeze_step" not in params:
        raise ConfigError(f"method {text!r}: {name} needs freeze_step=N, its dense warm-up steps (run untimed, "
                          f"so that the timed steps are the compressed stage), e.g. {text.strip()},freeze_step=2")


def _parse_local_sgd(text: str, launcher: str, name: str, params: list[tuple[str, Any]]) -> MethodSpec:
    """``local_sgd`` / ``post_local_sgd``: the parameters of :func:`grace_dl.local_sgd`
    (but ``compression``: the differences are averaged uncompressed) and ``optimizer``;
    the values are checked by building the method."""
    from ..localsgd import LocalSGD
    from ..registry import algorithms

    known = [k for k in algorithms()["local_sgd"].params if k != "compression"]
    values = {k: v for k, v in params if k != "optimizer"}
    bad = [k for k in values if k not in known]
    if bad:
        raise ConfigError(f"method {text!r}: {name} has no parameter {bad[0]!r} "
                          f"(it takes {', '.join(known)} and optimizer={'|'.join(OPTIMIZERS)})")
    if name == "post_local_sgd" and not values.get("switch_step"):
        raise ConfigError(f"method {text!r}: post_local_sgd needs switch_step=N >= 1, the synchronous steps "
                          f"before the local ones (without them it is local_sgd), e.g. "
                          f"{launcher}:post_local_sgd,period=4,switch_step=2")
    try:
        LocalSGD(**values)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"method {text!r}: {name}: {err}") from None
    return MethodSpec(launcher, name, tuple(params), grace=True)


def timed_schedule(spec: dict[str, Any] | None, warmup: int, steps: int) -> tuple[int, int]:
    """The untimed warm-up steps and the steps per timed repeat that a method runs with,
    from the preset's ``warmup`` and ``steps`` (``spec``: :meth:`MethodSpec.as_dict`).

    * torch's PowerSGD hook allreduces uncompressed before its ``start_iter``, 1-bit Adam
      is dense Adam for ``freeze_step`` steps: those steps stay untimed.
    * Local SGD averages every ``period`` steps (after ``switch_step`` synchronous ones,
      which stay untimed): the warm-up ends on an averaging step and a repeat is a
      multiple of ``period`` steps, so that every repeat holds the same number of
      averaging steps and the bytes per step are the exact average. With ``adaptive`` the
      period can shrink during the run; ``period`` is its largest value.
    """
    if spec is None:
        return warmup, steps
    params = spec.get("params", {})
    name = spec["name"]
    if name == "powersgd_hook" and not spec.get("grace"):
        return max(warmup, int(params.get("start_iter", 2))), steps
    if name == "onebit_adam":
        return max(warmup, int(params["freeze_step"])), steps
    if name in LOCAL_SGD_NAMES:
        period, switch = int(params.get("period", 4)), int(params.get("switch_step", 0))
        local = max(warmup - switch, 0)
        return switch + -(-local // period) * period, -(-steps // period) * period
    return warmup, steps


_RATE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([kmg]?)bit\s*$", re.IGNORECASE)
_UNITS = {"": 1, "k": 1e3, "m": 1e6, "g": 1e9}


def parse_rate(text: str) -> float | None:
    """Bits per second of a link written as ``tc`` does (``100mbit``, ``1gbit``, ``500kbit``);
    ``unshaped`` gives None."""
    if text.strip().lower() == "unshaped":
        return None
    match = _RATE.match(text)
    if not match or float(match.group(1)) <= 0:
        raise ConfigError(f"link {text!r}: expected 'unshaped' or a positive rate such as 100mbit or 1gbit")
    return float(match.group(1)) * _UNITS[match.group(2).lower()]


def rate_label(rate_bps: float | None) -> str:
    """``unshaped``, ``100 Mbit/s``, ``1 Gbit/s``..."""
    if rate_bps is None:
        return "unshaped"
    for unit, scale in (("Gbit/s", 1e9), ("Mbit/s", 1e6), ("kbit/s", 1e3)):
        if rate_bps >= scale:
            return f"{rate_bps / scale:g} {unit}"
    return f"{rate_bps:g} bit/s"


@dataclass
class Preset:
    """The model, data, timing and the methods and links of one benchmark setting.

    Timing follows Horovod's synthetic benchmark: ``warmup`` untimed steps, then
    ``repeats`` timed runs of ``steps`` steps each; a step is forward, backward and the
    optimizer's step on one fixed synthetic batch per rank.
    """

    width: int
    num_classes: int
    batch_size: int
    image_size: int
    warmup: int
    steps: int
    repeats: int
    methods: list[str] = field(default_factory=list)
    links: list[str] = field(default_factory=list)
    timeout: float = 600.0  # seconds, per launch


#: the fusion bucket size the presets give grace-dl's methods (fastest in docs/bench.md's sweep)
PRESET_FUSION = 1 << 20
_F = f"fusion={PRESET_FUSION}"

FULL_METHODS = ["hvd:none", "hvd:fp16", f"hvd:topk,ratio=0.01,{_F}", f"hvd:dgc,ratio=0.001,{_F}",
                f"hvd:powersgd,rank=4,{_F}", f"hvd:efsignsgd,{_F}", f"hvd:qsgd,{_F}", f"hvd:randomk,ratio=0.01,{_F}",
                "ddp:allreduce", "ddp:fp16_hook", "ddp:powersgd_hook,rank=4", f"ddp:powersgd,rank=4,{_F}"]

PRESETS: dict[str, Preset] = {
    # a few minutes on a 2-core CPU: 62 tensors as in ResNet-18, 1/16 of its weights
    "small": Preset(width=16, num_classes=100, batch_size=8, image_size=64, warmup=2, steps=5, repeats=3,
                    methods=["hvd:none", "hvd:fp16", f"hvd:topk,ratio=0.01,{_F}", f"hvd:powersgd,rank=4,{_F}",
                             "ddp:allreduce", "ddp:fp16_hook", "ddp:powersgd_hook,rank=4", f"ddp:powersgd,rank=4,{_F}"],
                    links=["unshaped", "100mbit"], timeout=180.0),
    # the setting of issue 11: ResNet-18 size, batch 16 per rank at 128x128
    "full": Preset(width=64, num_classes=1000, batch_size=16, image_size=128, warmup=3, steps=5, repeats=3,
                   methods=list(FULL_METHODS), links=["unshaped", "1gbit", "100mbit"], timeout=900.0),
}
