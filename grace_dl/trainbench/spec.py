"""What a training benchmark runs: methods, links and presets (framework-free)."""

from __future__ import annotations

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
    (:class:`grace_dl.torch.HorovodCompression`'s ``background``; default the adapter's).
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
    grace = name.startswith("grace.")
    if grace:
        name = name[len("grace."):]
    builtins = _builtins(launcher)
    if not grace and name in builtins:
        allowed = POWERSGD_HOOK_PARAMS if name == "powersgd_hook" else ()
        bad = [k for k, _ in params if k not in allowed]
        if bad:
            raise ConfigError(f"method {text!r}: {launcher}:{name} takes "
                              f"{'parameters ' + ', '.join(allowed) if allowed else 'no parameters'}, got {bad[0]!r}")
        return MethodSpec(launcher, name, tuple(params), grace=False)
    compressors = entries("compressor")
    if name not in compressors:
        raise ConfigError(f"method {text!r}: unknown method {name!r}; {launcher}: takes "
                          f"{', '.join(builtins)} or a grace-dl method ({', '.join(sorted(compressors))})")
    known = compressors[name].params
    extra = ("fusion", "background") if launcher == "hvd" else ("fusion",)
    bad = [k for k, _ in params if k not in known and k not in extra]
    if bad:
        raise ConfigError(f"method {text!r}: {name} has no parameter {bad[0]!r} "
                          f"(it takes {', '.join(known) or 'none'}); every grace-dl method also takes fusion=BYTES"
                          + (", and under hvd background=0|1" if launcher == "hvd" else ""))
    fusion = dict(params).get("fusion")
    if fusion is not None and (isinstance(fusion, bool) or not isinstance(fusion, int) or fusion < 0):
        raise ConfigError(f"method {text!r}: fusion is the bucket size in bytes, an int >= 0, got {fusion!r}")
    background = dict(params).get("background")
    if background is not None and background not in (0, 1):  # True/False are 1/0 too
        raise ConfigError(f"method {text!r}: background is 0 or 1, got {background!r}")
    return MethodSpec(launcher, name, tuple(params), grace=True)


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
