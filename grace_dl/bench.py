"""Micro-benchmark: compress + decompress time per element against a memory copy of the
same tensor measured in the same run, wire bits per element against the formula, the
time of one call (at 1e3 elements: the per-call overhead), the peak extra memory of one
round trip, and the figures of a stored reference run next to the new ones.

Timings on a shared machine are noisy, so the figure to compare is the ratio to the copy
measured alongside, not the absolute time.

:func:`compare_with_grace` times GRACE's own torch compressors (sands-lab/grace, loaded at
run time from a checkout the user names, see :func:`load_grace`) against grace-dl's,
interleaved in one process.
"""

from __future__ import annotations

import datetime
import functools
import gc
import importlib.util
import json
import math
import os
import platform
import subprocess
import sys
import time
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .core import Compressor, TensorContext, derive_key, run_alone
from .ops import DTYPE_ITEMSIZE, get_ops
from .registry import ConfigError, make

#: The reference figures shipped with the package (the previous release's, measured on
#: the machine named in the file); ``grace-dl bench --write-reference`` writes a new one.
REFERENCE_PATH = Path(__file__).with_name("bench_reference.json")
BACKENDS = ("numpy", "torch", "torch-cuda")
#: Below this many elements (4 MB of float32) the torch-CPU peak memory is not measured:
#: it is read from the process's resident set, whose page granularity and lazily loaded
#: code would swamp a smaller tensor.
RSS_MIN_NUMEL = 10**6
#: Each timing runs the call enough times in a row to last at least this long, so that
#: small tensors are not timed at the clock's resolution.
MIN_TIMING_SECONDS = 2e-3


@dataclass
class BenchResult:
    """One benchmark row.

    ``peak_memory_multiple`` is the most memory one compress + decompress holds at once
    beyond the input tensor and the decompressed result, as a multiple of the input's
    size (None where not measured).
    """

    method: str
    numel: int
    backend: str
    ns_per_element: float
    copy_ns_per_element: float
    bits_per_element: float
    formula_bits_per_element: float | None
    peak_memory_multiple: float | None = None

    @property
    def copy_multiple(self) -> float:
        """Compress+decompress time as a multiple of a memory copy."""
        return self.ns_per_element / self.copy_ns_per_element

    @property
    def us_per_call(self) -> float:
        """Microseconds per compress + decompress call."""
        return self.ns_per_element * self.numel / 1e3


# -- one case: a method on a tensor of a backend ---------------------------------------------

@dataclass
class _Case:
    comp: Any
    ops: Any
    x: Any
    ctx: TensorContext
    shape: tuple[int, ...]
    sync: Callable[[], None]
    copy: Callable[[], Any]

    def compress(self) -> tuple[Any, int]:
        """The payload, and the bytes of the collectives made while compressing."""
        # compress_rounds, so that the bytes of collectives made while compressing
        # (PowerSGD's P, chunk norms) count, as the pipeline counts them
        if type(self.comp).compress_rounds is Compressor.compress_rounds:
            # no collectives: the pipeline calls compress directly too (no generator to run)
            return self.comp.compress(self.ops, self.x, self.ctx), 0
        sent: list[int] = []
        rounds = self.comp.compress_rounds(self.ops, self.x, self.ctx)
        payload = run_alone(rounds, lambda c: sent.append(self.ops.numel(c.buf) * DTYPE_ITEMSIZE[self.ops.dtype(c.buf)]))
        return payload, sum(sent)

    def round_trip(self) -> tuple[int, Any]:
        payload, sent = self.compress()
        out = self.comp.decompress(self.ops, payload.buffer, self.ctx)
        self.sync()  # GPU kernels are asynchronous: time them to completion
        return payload.nbytes + sent, out

    def copy_synced(self) -> None:
        self.copy()
        self.sync()


def _shape_for(numel: int) -> tuple[int, ...]:
    # a square matrix where numel is a square (1e4, 1e6, 2.5e7), so low-rank methods
    # see a layer's weight matrix rather than a vector they would send dense
    side = math.isqrt(numel)
    return (side, side) if side * side == numel else (numel,)


#: the reference copy of a tensor of at least this many bytes goes into a buffer made
#: beforehand (see _make_case)
_PREALLOCATED_COPY_MIN_BYTES = 32 << 20


def _make_case(method: str, numel: int, backend: str, params: dict[str, Any] | None) -> _Case:
    comp = make(method, **(params or {})).compressor
    data = np.random.default_rng(0).standard_normal(numel).astype(np.float32)
    sync: Callable[[], None] = lambda: None  # noqa: E731
    # above glibc's largest mmap threshold (32 MiB) every fresh buffer is new pages, whose
    # faults cost 1-7x the copy itself depending on the page size and on what the
    # allocator last freed (a 1e8-byte copy took 5-10 ms into NumPy's memory and ~40 ms
    # into torch's, from row to row): there the reference copies into one buffer made
    # and touched beforehand, the memory's own speed; below it, into a new one
    preallocated = numel * 4 >= _PREALLOCATED_COPY_MIN_BYTES
    if backend in ("torch", "torch-cuda"):
        import torch

        x = torch.from_numpy(data)
        if backend == "torch-cuda":
            x = x.cuda()
            sync = torch.cuda.synchronize
        if preallocated:
            copy = functools.partial(torch.Tensor.copy_, torch.empty_like(x).copy_(x), x)
        else:
            copy = x.clone
    elif backend == "numpy":
        x = data
        copy = functools.partial(np.copyto, np.array(x), x) if preallocated else x.copy
    else:
        raise ConfigError(f"unknown backend {backend!r}; valid: {', '.join(BACKENDS)}")
    del data
    shape = _shape_for(numel)
    # a method with a dense warm-up (1-bit Adam) is timed in its compression stage
    step = comp.freeze_step if hasattr(comp, "payload_nbytes_at") and hasattr(comp, "freeze_step") else 0
    ctx = TensorContext(name="bench", shape=shape, numel=numel, dtype="float32", in_dtype="float32", step=step,
                        shared_key=derive_key(0, "bench"), worker_key=derive_key(0, "bench", 0), rank=0,
                        world_size=1)
    return _Case(comp, get_ops(x), x, ctx, shape, sync, copy)


def _calls_per_timing(fn: Callable[[], Any]) -> int:
    start = time.perf_counter()
    fn()
    once = time.perf_counter() - start
    return max(1, min(10_000, math.ceil(MIN_TIMING_SECONDS / max(once, 1e-9))))


def _time_calls(fn: Callable[[], Any], number: int) -> float:
    start = time.perf_counter()
    for _ in range(number):
        fn()
    return (time.perf_counter() - start) / number


def _best_time(fn: Callable[[], Any], repeats: int) -> float:
    """Best seconds per call over ``repeats`` timings."""
    number = _calls_per_timing(fn)
    return min(_time_calls(fn, number) for _ in range(repeats))


def _copy_time(times: list[float]) -> float:
    """The reference copy's seconds: the median of its timings, not the best, which
    picks the outliers: a copy into a new buffer above glibc's mmap threshold (32 MiB)
    now and then lands on pages an earlier free left mapped (5 ms instead of ~40 ms for
    a 1e8-byte torch clone), and the best of ten copies picked that case in about one
    row in ten (issue 12's quiet-machine table had terngrad at 14x in one run and 2x
    in the next from this alone); see also :func:`_make_case`."""
    return float(np.median(times))


def bench(method: str, numel: int, *, backend: str = "numpy", repeats: int = 5,
          params: dict[str, Any] | None = None, memory: bool = True) -> BenchResult:
    """Time one method on a float32 normal tensor of ``numel`` elements.

    Args:
        method: registered method name.
        numel: tensor size.
        backend: ``"numpy"`` (default), ``"torch"`` (CPU) or ``"torch-cuda"``.
        repeats: best of this many timings (default 5).
        params: the method's parameters (default: its defaults).
        memory: also measure the peak extra memory of one round trip (default True; see
            :func:`peak_memory_multiple`).
    """
    if repeats < 1:
        raise ConfigError(f"repeats must be >= 1, got {repeats}")
    case = _make_case(method, numel, backend, params)
    payload_nbytes, out = case.round_trip()  # warm-up, and the payload whose size is reported
    t = _best_time(case.round_trip, repeats)
    number_copy = _calls_per_timing(case.copy_synced)
    # at least nine copies (cheap next to a round trip), so that their median is steady
    t_copy = _copy_time([_time_calls(case.copy_synced, number_copy) for _ in range(max(repeats, 9))])
    comp, ops, shape = case.comp, case.ops, case.shape
    formula = comp.payload_nbytes(numel, "float32", "float32")
    if hasattr(comp, "payload_nbytes_at"):  # the size depends on the step (1-bit Adam's warm-up)
        formula = comp.payload_nbytes_at(numel, case.ctx.step, "float32", "float32")
    if hasattr(comp, "payload_nbytes_for_shape"):  # low rank: the size depends on the matrix shape
        formula = comp.payload_nbytes_for_shape(shape, "float32", 0)
    elif formula is None and hasattr(comp, "payload_nbytes_for"):
        # data-dependent sizes (threshold methods) are stated for the count sent
        formula = comp.payload_nbytes_for(int(np.count_nonzero(ops.to_numpy(out))), numel, "float32")
    if formula is not None and hasattr(comp, "rounds_nbytes"):  # collectives made while compressing
        formula += comp.rounds_nbytes(numel, "float32")
    del out, case
    peak = peak_memory_multiple(method, numel, backend=backend, params=params) if memory else None
    return BenchResult(method, numel, backend, 1e9 * t / numel, 1e9 * t_copy / numel,
                       8 * payload_nbytes / numel, None if formula is None else 8 * formula / numel, peak)


# -- peak memory ------------------------------------------------------------------------------

def _extra_bytes(case: _Case, counter: Callable[[], tuple[int, int]], reset_peak: Callable[[], None]) -> int:
    """Most bytes held at once by one round trip beyond the input and the result.

    ``counter()`` gives (bytes held now, peak since the last ``reset_peak()``). Compress
    and decompress are measured apart so that the result (full size; in a pipeline it
    replaces the gradient) is left out of the decompress peak only, and only as far as it
    was newly allocated (a result that is a view of the payload costs nothing).
    """
    base = counter()[0]
    reset_peak()
    payload, _ = case.compress()
    peak_compress = counter()[1] - base
    before_decompress = counter()[0]
    reset_peak()
    out = case.comp.decompress(case.ops, payload.buffer, case.ctx)
    case.sync()
    now, peak = counter()
    out_nbytes = case.ops.numel(out) * DTYPE_ITEMSIZE[case.ops.dtype(out)]
    result_nbytes = min(out_nbytes, max(0, now - before_decompress))
    del payload, out
    return max(peak_compress, peak - base - result_nbytes, 0)


def _numpy_peak(case: _Case) -> int:
    # NumPy reports its array buffers to tracemalloc, so the traced peak covers the
    # temporaries of the kernels as well as Python's own objects
    import tracemalloc

    tracemalloc.start()
    try:
        return _extra_bytes(case, tracemalloc.get_traced_memory, tracemalloc.reset_peak)
    finally:
        tracemalloc.stop()


def _cuda_peak(case: _Case) -> int:
    import torch

    torch.cuda.synchronize()
    return _extra_bytes(case, lambda: (torch.cuda.memory_allocated(), torch.cuda.max_memory_allocated()),
                        torch.cuda.reset_peak_memory_stats)


def _proc_status_kb(field: str) -> int:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(f"no {field} in /proc/self/status")


def _reset_rss_high_water() -> None:
    # Linux: writing 5 to clear_refs resets the process's peak resident set (VmHWM)
    with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
        f.write("5")


def _rss_counter() -> tuple[int, int]:
    return 1024 * _proc_status_kb("VmRSS"), 1024 * _proc_status_kb("VmHWM")


def _peak_memory_child(spec_json: str) -> int:
    """Entry point of the subprocess that measures one torch-CPU round trip (prints JSON)."""
    spec = json.loads(spec_json)
    import torch

    torch.set_num_threads(spec["threads"])
    # warm up on a small tensor first: code and buffers loaded lazily on the first call
    # must not count as the method's memory
    small = _make_case(spec["method"], 1024, "torch", spec["params"])
    small.round_trip()
    del small
    case = _make_case(spec["method"], spec["numel"], "torch", spec["params"])
    gc.collect()
    extra = _extra_bytes(case, _rss_counter, _reset_rss_high_water)
    print(json.dumps({"extra_bytes": extra}))
    return 0


def _torch_cpu_peak(method: str, numel: int, params: dict[str, Any] | None) -> int | None:
    # torch's CPU allocator keeps no statistics, and the profiler's memory events see only
    # what torch allocates. The resident set of a fresh process sees everything (NumPy
    # temporaries included); a fresh process because memory freed earlier and kept by the
    # C allocator would be reused unseen. glibc serves blocks above 32 MB with mmap and
    # returns them on free, so at the sizes where this is measured the high-water mark
    # (reset between compress and decompress) is the round trip's own.
    if not sys.platform.startswith("linux") or not os.access("/proc/self/clear_refs", os.W_OK):
        return None
    import torch

    spec = json.dumps({"method": method, "numel": numel, "params": params or {},
                       "threads": torch.get_num_threads()})
    package_parent = str(Path(__file__).resolve().parent.parent)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [package_parent, os.environ.get("PYTHONPATH")])))
    code = "import sys; from grace_dl.bench import _peak_memory_child; sys.exit(_peak_memory_child(sys.argv[1]))"
    result = subprocess.run([sys.executable, "-c", code, spec], capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise RuntimeError(f"peak memory of {method} at {numel} elements: the measuring process failed:\n"
                           + result.stderr[-2000:])
    return int(json.loads(result.stdout.strip().splitlines()[-1])["extra_bytes"])


def peak_memory_multiple(method: str, numel: int, *, backend: str = "numpy",
                         params: dict[str, Any] | None = None) -> float | None:
    """Peak extra memory of one compress + decompress, as a multiple of the tensor's size.

    The most bytes held at once beyond the input tensor and the decompressed result
    (the payload, temporaries, Python objects), measured with ``tracemalloc`` on NumPy,
    the resident set of a fresh process on torch CPU (Linux only, tensors of at least
    :data:`RSS_MIN_NUMEL` elements) and ``torch.cuda.max_memory_allocated`` on CUDA.

    Args:
        method: registered method name.
        numel: tensor size.
        backend: ``"numpy"`` (default), ``"torch"`` or ``"torch-cuda"``.
        params: the method's parameters (default: its defaults).

    Returns:
        The multiple, or None where it cannot be measured (torch CPU below
        :data:`RSS_MIN_NUMEL` elements or off Linux).
    """
    nbytes = 4 * numel
    if backend == "torch":
        if numel < RSS_MIN_NUMEL:
            return None
        extra = _torch_cpu_peak(method, numel, params)
        return None if extra is None else extra / nbytes
    case = _make_case(method, numel, backend, params)
    case.round_trip()  # warm-up: lazily created state is not the round trip's
    gc.collect()
    extra = _cuda_peak(case) if backend == "torch-cuda" else _numpy_peak(case)
    return extra / nbytes


# -- reference figures ----------------------------------------------------------------------

def machine_info(backend: str) -> dict[str, Any]:
    """The machine and library versions a benchmark ran on."""
    info: dict[str, Any] = {"platform": platform.platform(), "python": platform.python_version(),
                            "cpus": os.cpu_count(), "numpy": np.__version__}
    from .ops import jit

    info["jit"] = jit.describe()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        if names:
            info["cpu"] = names[0]
    except OSError:
        info["cpu"] = platform.processor()
    if backend in ("torch", "torch-cuda"):
        import torch

        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
        if backend == "torch-cuda":
            info["gpu"] = torch.cuda.get_device_name()
    return info


def load_reference(path: str | os.PathLike | None = None) -> dict[str, Any]:
    """Read a reference file (default: :data:`REFERENCE_PATH`).

    Raises:
        ConfigError: the file is missing or not a reference file.
    """
    path = Path(path) if path is not None else REFERENCE_PATH
    try:
        ref = json.loads(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise ConfigError(f"reference file {path}: {err.strerror or err}") from None
    except json.JSONDecodeError as err:
        raise ConfigError(f"reference file {path}: not JSON ({err})") from None
    if not isinstance(ref, dict) or not isinstance(ref.get("backends"), dict):
        raise ConfigError(f"reference file {path}: no 'backends' table (write one with --write-reference)")
    return ref


def reference_figures(ref: dict[str, Any] | None, backend: str, method: str, numel: int) -> dict[str, float] | None:
    """The stored figures of one row (``x_memcpy``, ``us_per_call``, ``ns_per_element``,
    ``peak_memory_x``), or None."""
    if not ref:
        return None
    return ref.get("backends", {}).get(backend, {}).get("figures", {}).get(method, {}).get(str(numel))


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
                             cwd=Path(__file__).resolve().parent)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def write_reference(rows: list[BenchResult], path: str | os.PathLike, *, repeats: int) -> None:
    """Store the figures of ``rows`` as a reference file, merged into the file at ``path``
    when there is one (so that NumPy and torch runs can fill one file).

    Args:
        rows: benchmark rows (all of one backend or several).
        path: the JSON file to write.
        repeats: the ``repeats`` the rows were measured with (recorded).
    """
    from . import __version__

    path = Path(path)
    ref: dict[str, Any] = {}
    if path.exists():
        ref = load_reference(path)
    ref["about"] = ("grace-dl bench figures, compared against by `grace-dl bench` (columns 'ref x memcpy' "
                    "and 'vs ref'); keyed by backend, method and element count")
    ref["release"] = __version__
    commit = _git_commit()
    if commit:
        ref["commit"] = commit
    backends = ref.setdefault("backends", {})
    for backend in sorted({r.backend for r in rows}):
        entry = backends.setdefault(backend, {})
        entry["date"] = datetime.date.today().isoformat()
        entry["machine"] = machine_info(backend)
        entry["repeats"] = repeats
        figures = entry.setdefault("figures", {})
        for r in (r for r in rows if r.backend == backend):
            figures.setdefault(r.method, {})[str(r.numel)] = {
                "x_memcpy": round(r.copy_multiple, 3), "us_per_call": round(r.us_per_call, 2),
                "ns_per_element": round(r.ns_per_element, 4),
                "peak_memory_x": None if r.peak_memory_multiple is None else round(r.peak_memory_multiple, 3)}
    try:
        path.write_text(json.dumps(ref, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    except OSError as err:
        raise ConfigError(f"cannot write reference file {path}: {err.strerror or err}") from None


def format_table(rows: list[BenchResult], reference: dict[str, Any] | None = None) -> str:
    """A Markdown table of benchmark rows, with the reference's figures where it has them.

    Args:
        rows: benchmark rows.
        reference: a reference file's contents (:func:`load_reference`), or None for none.
    """
    lines = ["| method | elements | backend | us/call | ns/element | x memcpy | ref x memcpy | vs ref "
             "| peak mem x | bits/element | formula |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        formula = "data-dependent" if r.formula_bits_per_element is None else f"{r.formula_bits_per_element:.3f}"
        peak = "-" if r.peak_memory_multiple is None else f"{r.peak_memory_multiple:.2f}"
        ref = reference_figures(reference, r.backend, r.method, r.numel)
        ref_multiple = ref.get("x_memcpy") if ref else None
        ref_text = "-" if ref_multiple is None else f"{ref_multiple:.1f}"
        ratio = "-" if not ref_multiple else f"{r.copy_multiple / ref_multiple:.2f}"
        lines.append(f"| {r.method} | {r.numel:.2g} | {r.backend} | {r.us_per_call:.1f} | {r.ns_per_element:.2f} | "
                     f"{r.copy_multiple:.1f} | {ref_text} | {ratio} | {peak} | {r.bits_per_element:.3f} | {formula} |")
    return "\n".join(lines)


def describe_reference(reference: dict[str, Any], backends: set[str]) -> str:
    """One line per backend naming the reference's release, date and machine."""
    out = []
    for backend in sorted(backends):
        entry = reference.get("backends", {}).get(backend)
        if entry is None:
            out.append(f"reference: no {backend} figures in the reference file")
            continue
        machine = entry.get("machine", {})
        where = ", ".join(str(machine[k]) for k in ("cpu", "gpu", "torch") if k in machine)
        out.append(f"reference ({backend}): grace-dl {reference.get('release', '?')}, {entry.get('date', '?')}, "
                   f"{where}, best of {entry.get('repeats', '?')}")
    return "\n".join(out)


# -- GRACE (sands-lab/grace) side by side -----------------------------------------------------

@dataclass(frozen=True)
class GraceMethod:
    """How one method is set up on both sides of the comparison."""

    module: str             # GRACE's module under grace_dl/torch/compressor/
    cls: str                # GRACE's class
    grace_args: dict        # GRACE's constructor arguments
    params: dict            # grace-dl's parameters
    label: str              # the parameters, as printed


#: grace-dl method -> GRACE compressor, with matching parameters (GRACE's default helper
#: values where the method has no ratio to match: signum momentum 0.9, efsignsgd lr 0.1
#: (only used by its aggregate), qsgd 127 levels).
GRACE_METHODS: dict[str, GraceMethod] = {
    "fp16": GraceMethod("fp16", "FP16Compressor", {}, {}, ""),
    "qsgd": GraceMethod("qsgd", "QSGDCompressor", {"quantum_num": 127}, {"levels": 127}, "127 levels"),
    "terngrad": GraceMethod("terngrad", "TernGradCompressor", {}, {}, ""),
    "signsgd": GraceMethod("signsgd", "SignSGDCompressor", {}, {}, ""),
    "signum": GraceMethod("signum", "SignumCompressor", {"momentum": 0.9}, {}, "momentum 0.9"),
    "efsignsgd": GraceMethod("efsignsgd", "EFSignSGDCompressor", {"lr": 0.1}, {}, ""),
    "onebit": GraceMethod("onebit", "OneBitCompressor", {}, {}, ""),
    "topk": GraceMethod("topk", "TopKCompressor", {"compress_ratio": 0.01}, {"ratio": 0.01}, "0.01"),
    "randomk": GraceMethod("randomk", "RandomKCompressor", {"compress_ratio": 0.01}, {"ratio": 0.01}, "0.01"),
    "threshold": GraceMethod("threshold", "ThresholdCompressor", {"threshold": 0.01}, {"threshold": 0.01}, "0.01"),
    "dgc": GraceMethod("dgc", "DgcCompressor", {"compress_ratio": 0.01}, {"ratio": 0.01}, "0.01"),
    "powersgd": GraceMethod("powersgd", "PowerSGDCompressor", {}, {"rank": 2}, "rank 2"),
    "natural": GraceMethod("natural", "NaturalCompressor", {}, {}, ""),
}
_GRACE_PACKAGE = "_grace_checkout"  # GRACE's grace_dl, under a name that does not clash with ours


def _single_worker_horovod() -> dict[str, types.ModuleType]:
    # GRACE's PowerSGD allreduces P and Q with Horovod. The comparison runs one worker,
    # whose allreduce returns its own tensor, so this stand-in does that: the timing needs
    # neither an initialised Horovod nor Horovod installed.
    hvd = types.ModuleType("horovod")
    hvd_torch = types.ModuleType("horovod.torch")
    hvd_torch.allreduce_ = lambda tensor, *args, **kwargs: tensor  # type: ignore[attr-defined]
    hvd_torch.allreduce = hvd_torch.allreduce_  # type: ignore[attr-defined]
    hvd.torch = hvd_torch  # type: ignore[attr-defined]
    return {"horovod": hvd, "horovod.torch": hvd_torch}


def _load_module(name: str, path: Path, package: bool = False) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location(
        name, path, submodule_search_locations=[str(path.parent)] if package else None)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    return module


def load_grace(path: str | os.PathLike, methods: list[str] | None = None) -> dict[str, Any]:
    """Load GRACE's torch compressor classes from a checkout of sands-lab/grace.

    GRACE's package is also named ``grace_dl``: it is loaded as ``_grace_checkout``, and
    while its compressor modules run their ``from grace_dl.torch import Compressor`` the
    names ``grace_dl`` and ``grace_dl.torch`` (and ``horovod``, ``horovod.torch``, see
    below) point at GRACE's modules; they are restored afterwards. PowerSGD's
    ``horovod.torch.allreduce_`` is a one-worker stand-in (it returns its tensor).

    Args:
        path: the checkout's root (the directory holding ``grace_dl/torch/compressor/``).
        methods: the grace-dl names of the methods to load (default: all of
            :data:`GRACE_METHODS`).

    Returns:
        method -> GRACE's compressor class, or a string saying why it could not be
        loaded (e.g. natural needs CuPy).

    Raises:
        ConfigError: ``path`` is not a GRACE checkout, or a method has no GRACE
            counterpart.
    """
    root = Path(path).expanduser()
    package = root / "grace_dl"
    compressors = package / "torch" / "compressor"
    if not (package / "__init__.py").is_file() or not (package / "torch" / "__init__.py").is_file() \
            or not compressors.is_dir():
        raise ConfigError(f"--against-grace: {path} is not a GRACE checkout (no grace_dl/torch/compressor/ in it; "
                          "clone https://github.com/sands-lab/grace)")
    methods = list(GRACE_METHODS) if methods is None else methods
    unknown = [m for m in methods if m not in GRACE_METHODS]
    if unknown:
        raise ConfigError(f"no GRACE counterpart for {', '.join(unknown)}; compared: {', '.join(GRACE_METHODS)}")
    import torch  # noqa: F401  (GRACE's modules import it; load it under its own name first)

    swapped = ("grace_dl", "grace_dl.torch", "horovod", "horovod.torch")
    saved = {name: sys.modules[name] for name in swapped if name in sys.modules}
    loaded: dict[str, Any] = {}
    try:
        top = sys.modules.get(_GRACE_PACKAGE) or _load_module(_GRACE_PACKAGE, package / "__init__.py", package=True)
        grace_torch = sys.modules.get(f"{_GRACE_PACKAGE}.torch") or _load_module(
            f"{_GRACE_PACKAGE}.torch", package / "torch" / "__init__.py", package=True)
        sys.modules.update({"grace_dl": top, "grace_dl.torch": grace_torch, **_single_worker_horovod()})
        for method in methods:
            entry = GRACE_METHODS[method]
            file = compressors / f"{entry.module}.py"
            name = f"{_GRACE_PACKAGE}.torch.compressor.{entry.module}"
            if not file.is_file():
                loaded[method] = f"no {file.relative_to(root)} in the checkout"
                continue
            try:
                module = sys.modules.get(name) or _load_module(name, file)
            except ImportError as err:  # natural needs CuPy
                loaded[method] = f"GRACE's {entry.module} needs {err.name or err}"
                continue
            loaded[method] = getattr(module, entry.cls)
    finally:
        for name in swapped:
            if name in saved:
                sys.modules[name] = saved[name]
            else:
                sys.modules.pop(name, None)
    return loaded


@dataclass
class GraceComparison:
    """One method at one size, GRACE's torch compressor against grace-dl's."""

    method: str
    label: str
    numel: int
    backend: str
    grace_copy_multiple: float | None     # None: GRACE's version could not run (see note)
    copy_multiple: float
    grace_bits_per_element: float | None
    bits_per_element: float
    grace_us_per_call: float | None
    us_per_call: float
    note: str = ""

    @property
    def speedup(self) -> float | None:
        """GRACE's time over grace-dl's (above 1: grace-dl is faster)."""
        return None if self.grace_copy_multiple is None else self.grace_copy_multiple / self.copy_multiple


def _tensors_nbytes(obj: Any) -> int:
    import torch

    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, (list, tuple)):
        return sum(_tensors_nbytes(o) for o in obj)
    return 0


def _grace_round_trip(method: str, grace_cls: Any, x: Any, shape: tuple[int, ...], sync: Callable[[], None]):
    import torch

    entry = GRACE_METHODS[method]
    comp = grace_cls(**entry.grace_args)
    tensor = x.view(shape)
    name = "bench"
    rank = min(shape[0], math.prod(shape[1:]), entry.params.get("rank", 1)) if len(shape) > 1 else 0

    def round_trip() -> int:
        if method == "powersgd" and rank:
            # GRACE's PowerSGD memory draws a fresh Q every step before compressing
            comp.q_memory[name] = torch.empty(math.prod(shape[1:]), rank, dtype=x.dtype, device=x.device).normal_()
        compressed, ctx = comp.compress(tensor, name)
        comp.decompress(compressed, ctx)
        sync()
        # what GRACE sends: the compressed tensors; PowerSGD's P and Q travel by allreduce
        return _tensors_nbytes(ctx[:2]) if method == "powersgd" and ctx is not None else _tensors_nbytes(compressed)

    return round_trip


def compare_with_grace(grace_path: str | os.PathLike, sizes: list[int], *, methods: list[str] | None = None,
                       backend: str = "torch", repeats: int = 5, threads: int | None = 1,
                       progress: Callable[[GraceComparison], None] | None = None) -> list[GraceComparison]:
    """Time GRACE's torch compressors and grace-dl's side by side.

    For each method and size, in one process: a copy of the tensor, GRACE's compress +
    decompress, a copy, grace-dl's, repeated (the order of the two alternating). Each
    side's best time is reported as a multiple of the median copy of those interleaved
    timings (not the best ratio: on a busy machine one slow copy would otherwise make a
    round trip look cheap; the median, because the best copy of a large tensor can be one
    that reused mapped pages, see :func:`_copy_time`); the speedup is GRACE's best time
    over grace-dl's.

    Args:
        grace_path: a checkout of sands-lab/grace (see :func:`load_grace`).
        sizes: element counts.
        methods: grace-dl method names (default: every method of :data:`GRACE_METHODS`).
        backend: ``"torch"`` (CPU, default) or ``"torch-cuda"``.
        repeats: best of this many timings (default 5).
        threads: torch's intra-op threads (default 1; None leaves torch's setting).
        progress: called with each row as it is measured (default none).
    """
    if backend not in ("torch", "torch-cuda"):
        raise ConfigError(f"--against-grace compares torch compressors: use --backend torch or torch-cuda, not {backend}")
    if repeats < 1:
        raise ConfigError(f"repeats must be >= 1, got {repeats}")
    loaded = load_grace(grace_path, methods)
    import torch

    if threads is not None:
        torch.set_num_threads(threads)
    rows = []
    for numel in sizes:
        for method, grace_cls in loaded.items():
            entry = GRACE_METHODS[method]
            case = _make_case(method, numel, backend, entry.params)
            ours_nbytes, _ = case.round_trip()
            grace = None
            note = grace_cls if isinstance(grace_cls, str) else ""
            if not note:
                grace = _grace_round_trip(method, grace_cls, case.x, case.shape, case.sync)
                try:
                    grace_nbytes = grace()
                except Exception as err:  # e.g. a GPU-only kernel on the CPU
                    grace, note = None, f"GRACE's {entry.module} failed: {type(err).__name__}: {err}"
            number_ours = _calls_per_timing(case.round_trip)
            number_copy = _calls_per_timing(case.copy_synced)
            number_grace = _calls_per_timing(grace) if grace is not None else 0
            copies: list[float] = []
            best_ours = best_grace = math.inf
            for i in range(repeats):
                order = [(False, case.round_trip, number_ours), (True, grace, number_grace)]
                for is_grace, fn, number in (order if i % 2 else order[::-1]):
                    if fn is None:
                        continue
                    copies.append(_time_calls(case.copy_synced, number_copy))
                    t = _time_calls(fn, number)
                    if is_grace:
                        best_grace = min(best_grace, t)
                    else:
                        best_ours = min(best_ours, t)
            best_copy = _copy_time(copies)
            row = GraceComparison(
                method, entry.label, numel, backend,
                best_grace / best_copy if grace is not None else None, best_ours / best_copy,
                8 * grace_nbytes / numel if grace is not None else None, 8 * ours_nbytes / numel,
                1e6 * best_grace if grace is not None else None, 1e6 * best_ours, note)
            rows.append(row)
            if progress is not None:
                progress(row)
            del case, grace
    return rows


def format_comparison(rows: list[GraceComparison]) -> str:
    """A Markdown table of :func:`compare_with_grace` rows."""
    def num(v: float | None, fmt: str) -> str:
        return "n/a" if v is None else format(v, fmt)

    lines = ["| method | elements | backend | speedup | GRACE x memcpy | grace-dl x memcpy | GRACE us/call "
             "| grace-dl us/call | GRACE bits/element | grace-dl bits/element |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    notes = []
    for r in rows:
        name = f"{r.method} {r.label}".strip()
        lines.append(f"| {name} | {r.numel:.2g} | {r.backend} | {num(r.speedup, '.2f')} | "
                     f"{num(r.grace_copy_multiple, '.1f')} | {r.copy_multiple:.1f} | {num(r.grace_us_per_call, '.1f')} | "
                     f"{r.us_per_call:.1f} | {num(r.grace_bits_per_element, '.3f')} | {r.bits_per_element:.3f} |")
        if r.note and r.note not in notes:
            notes.append(r.note)
    text = "\n".join(lines)
    if notes:
        text += "\n\n" + "\n".join(f"n/a: {n}" for n in notes)
    return text
