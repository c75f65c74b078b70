"""The ``grace-dl`` command line: ``run`` (a YAML experiment), ``compare`` (tables and
plots of finished runs), ``list`` (registered methods), ``bench`` (speed and wire size) and ``bench-train`` (end-to-end
training step time on shaped links)."""

from __future__ import annotations

import argparse
import math
import sys
from typing import Sequence

import yaml

from .registry import ConfigError, algorithms, entries, list_methods


def _parse_value(text: str):
    return yaml.safe_load(text)


def cmd_list(args: argparse.Namespace) -> int:
    """Print the registered methods with their parameters and defaults."""
    for kind in ("compressor", "memory", "communicator"):
        print(f"{kind}s:")
        for name, entry in sorted(entries(kind).items()):
            params = ", ".join(f"{p.name}={p.default!r}" for p in entry.params.values())
            extra = ""
            if kind == "compressor":
                extra = f"  [memory={entry.cls.memory}, communicator={entry.cls.communicator}]"
            print(f"  {name}({params}){extra}")
            print(f"      {entry.summary}")
    print("algorithms (around the optimizer; any compressor inside):")
    for name, algo in sorted(algorithms().items()):
        params = ", ".join(f"{p.name}={p.default!r}" for p in algo.params.values())
        print(f"  {name}({params})")
        print(f"      {algo.summary}")
        print(f"      papers: {algo.paper}")
    return 0


def _bench_sizes(texts: list[str]) -> list[int]:
    sizes = []
    for text in texts:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not math.isfinite(value) or value < 1 or value != int(value):
            raise ConfigError(f"--size must be a whole number of elements >= 1 (e.g. 1e6), got {text!r}")
        sizes.append(int(value))
    return sizes


def _positive_int(option: str, text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise ConfigError(f"{option} must be a whole number >= 1, got {text!r}")
    return value


def _bench_backend(backend: str, threads: int | None) -> None:
    """Check that the backend can run here, and set torch's threads."""
    if backend == "numpy":
        if threads is not None:
            raise ConfigError("--threads sets torch's threads: use it with --backend torch or torch-cuda")
        return
    try:
        import torch
    except ImportError:
        raise ConfigError(f"--backend {backend} needs PyTorch, which is not installed (pip install torch)") from None
    if backend == "torch-cuda" and not torch.cuda.is_available():
        raise ConfigError("--backend torch-cuda: CUDA is not available here (torch.cuda.is_available() is False)")
    # one intra-op thread unless asked: figures then compare across machines with
    # different core counts (the reference file's included)
    torch.set_num_threads(1 if threads is None else threads)


def _bench_params(items: list[str] | None, methods: list[str]) -> dict:
    params = {}
    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"--param expects KEY=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        params[key.strip()] = _parse_value(value)
    valid = sorted({p for m in methods for p in entries("compressor")[m].params})
    for key in params:
        if key not in valid:
            owners = ", ".join(methods) if len(methods) <= 3 else f"any of the {len(methods)} methods benchmarked"
            raise ConfigError(f"--param {key}: not a parameter of {owners}; valid: {', '.join(valid) or '(none)'}")
    return params


def cmd_bench(args: argparse.Namespace) -> int:
    """Benchmark methods and print a Markdown table (or, with ``--against-grace``, the
    comparison with GRACE's torch compressors)."""
    from . import bench as b

    methods = args.method or list_methods()
    known = entries("compressor")
    unknown = [m for m in methods if m not in known]
    if unknown:
        raise ConfigError(f"--method {unknown[0]}: unknown method; valid: {', '.join(sorted(known))}")
    sizes = _bench_sizes(args.size)
    repeats = _positive_int("--repeats", args.repeats)
    threads = None if args.threads is None else _positive_int("--threads", args.threads)
    if args.backend not in b.BACKENDS:
        raise ConfigError(f"--backend {args.backend}: unknown; valid: {', '.join(b.BACKENDS)}")
    if args.against_grace is not None:
        if args.param:
            raise ConfigError("--param does not apply to --against-grace: both sides use the parameters "
                              "listed in docs/bench.md")
        if args.write_reference:
            raise ConfigError("--write-reference stores grace-dl's own figures: run it without --against-grace")
        _bench_backend(args.backend, threads)
        grace_methods = args.method or list(b.GRACE_METHODS)
        rows = b.compare_with_grace(
            args.against_grace, sizes, methods=grace_methods, backend=args.backend, repeats=repeats,
            threads=None,
            progress=lambda r: print(f"  {r.method} @ {r.numel:.2g}: speedup "
                                     f"{'n/a' if r.speedup is None else format(r.speedup, '.2f')}",
                                     file=sys.stderr, flush=True))
        print(b.format_comparison(rows))
        return 0
    params = _bench_params(args.param, methods)
    _bench_backend(args.backend, threads)
    if args.reference == "none" or (args.reference is None and not b.REFERENCE_PATH.exists()):
        reference = None
    else:
        reference = b.load_reference(args.reference)
    rows = []
    for numel in sizes:
        for method in methods:
            own = {k: v for k, v in params.items() if k in known[method].params}
            rows.append(b.bench(method, numel, backend=args.backend, repeats=repeats, params=own,
                                memory=args.memory))
            print(f"  {method} @ {numel:.2g}: {rows[-1].copy_multiple:.1f}x memcpy", file=sys.stderr, flush=True)
    print(b.format_table(rows, reference))
    from .ops import jit

    print()
    print(jit.describe())
    if reference is not None:
        print(b.describe_reference(reference, {r.backend for r in rows}))
    if args.write_reference:
        b.write_reference(rows, args.write_reference, repeats=repeats)
        print(f"\nwrote the reference figures to {args.write_reference}")
    return 0


def _overrides(items: list[str] | None) -> dict:
    from .registry import parse_yaml

    out = {}
    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"--set expects KEY=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        if not key.strip() or any(not part for part in key.strip().split(".")):
            raise ConfigError(f"--set {item}: the key must be a dotted path such as optimizer.lr")
        out[key.strip()] = parse_yaml(value, f"--set {item}")
    return out


def _check_output_dir(path: str) -> None:
    """Create the output directory, or say in one line why it cannot be used."""
    import os

    if os.path.exists(path) and not os.path.isdir(path):
        raise ConfigError(f"output_dir: {path} exists and is not a directory")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"output_dir: cannot create {path}: {err.strerror or err}") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise ConfigError(f"output_dir: {path} is not writable")


def cmd_run(args: argparse.Namespace) -> int:
    """Run a YAML experiment (or sweep): launch horovodrun or the simulator, print the summary."""
    import os

    from .experiments import launch
    from .experiments.config import load
    from .experiments.metrics import format_summary

    overrides = _overrides(args.set)
    if args.output:
        overrides["output_dir"] = args.output
    config = load(args.config, overrides)
    # workers may start elsewhere: give them an absolute path
    config.output_dir = os.path.abspath(config.output_dir)
    _check_output_dir(config.output_dir)
    try:
        summaries = launch.run_experiment(config, progress=args.progress)
    except launch.LaunchError as err:
        print(f"grace-dl: error: {err}", file=sys.stderr)
        return err.returncode or 1
    if not summaries:  # a Horovod rank > 0
        return 0
    print()
    for summary in summaries:
        print(format_summary(summary))
    if config.sweep is not None:
        print()
        print(table_for(config))
        print(f"\nresults in {config.output_dir}/ (one directory per method; comparison.md, loss.png, accuracy.png)")
    else:
        print(f"results in {config.output_dir}/ (metrics.jsonl, summary.json, config.yaml)")
    return 0


def table_for(config) -> str:
    """The comparison table of a finished sweep."""
    from .experiments.compare import find_runs, table

    return table(find_runs([c.output_dir for c in config.run_configs()]))


def cmd_compare(args: argparse.Namespace) -> int:
    """Print the comparison table of finished runs and write the plots."""
    from .experiments.compare import compare

    text, written = compare(args.runs, args.output)
    print(text)
    print("\nwrote " + ", ".join(written))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``grace-dl`` command."""
    parser = argparse.ArgumentParser(prog="grace-dl", description="Gradient compression for distributed training.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run", help="run a YAML experiment with horovodrun or the simulator")
    p.add_argument("config", help="experiment YAML file (see docs/user-guide.md)")
    p.add_argument("--output", help="output directory (default: the config's output_dir)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a config key, dotted for nested ones, e.g. --set optimizer.lr=0.05 (repeatable)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bar on rank 0 (default: when stderr is a terminal)")
    p.set_defaults(func=cmd_run)
    p = sub.add_parser("compare", help="table and plots of finished runs")
    p.add_argument("runs", nargs="+", help="run directories (or directories of runs, e.g. a sweep)")
    p.add_argument("--output", help="where the plots and comparison.md go (default: the first directory)")
    p.set_defaults(func=cmd_compare)
    p = sub.add_parser("list", help="registered methods, memories and communicators")
    p.set_defaults(func=cmd_list)
    p = sub.add_parser("bench", help="time per element vs a memory copy, per call, peak memory, wire bits; "
                                     "or side by side with GRACE's torch compressors (docs/bench.md)")
    p.add_argument("--method", action="append", help="method to time (repeatable; default: all)")
    p.add_argument("--size", nargs="+", default=["1e3", "1e4", "1e6"],
                   help="element counts (default 1e3 1e4 1e6; the 1e3 row's us/call is the per-call overhead)")
    p.add_argument("--backend", default="numpy", help="numpy (default), torch (CPU) or torch-cuda")
    p.add_argument("--repeats", default="5", help="best of this many timings (default 5)")
    p.add_argument("--threads", help="torch's intra-op threads (default 1)")
    p.add_argument("--param", action="append", help="method parameter KEY=VALUE (repeatable)")
    p.add_argument("--memory", action=argparse.BooleanOptionalAction, default=True,
                   help="measure the peak extra memory of one round trip (default: on)")
    p.add_argument("--reference", default=None, metavar="PATH",
                   help="reference figures to compare against (default: the packaged grace_dl/bench_reference.json; "
                        "'none' for no reference columns)")
    p.add_argument("--write-reference", metavar="PATH", help="store this run's figures as a reference file "
                   "(merged into PATH when it exists)")
    p.add_argument("--against-grace", metavar="GRACE_CHECKOUT",
                   help="compare with GRACE's torch compressors loaded from this checkout of sands-lab/grace")
    p.set_defaults(func=cmd_bench)
    from .trainbench import runner as trainbench

    p = sub.add_parser("bench-train", help="end-to-end training step time per method and link, vs the compute-only "
                                           "ceiling (docs/bench.md)")
    trainbench.add_arguments(p)
    p.set_defaults(func=trainbench.main)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as err:
        print(f"grace-dl: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
