"""The ``grace-dl`` command line: ``run`` (a YAML experiment), ``compare`` (tables and
plots of finished runs), ``list`` (registered methods) and ``bench`` (speed and wire size)."""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

import yaml

from .registry import ConfigError, entries, list_methods


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
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    """Benchmark methods and print a Markdown table."""
    from .bench import bench, format_table

    params = {}
    for item in args.param or []:
        if "=" not in item:
            raise ConfigError(f"--param expects KEY=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        params[key] = _parse_value(value)
    methods = args.method or list_methods()
    rows = []
    for size in args.size:
        numel = int(float(size))
        if numel < 1:
            raise ConfigError(f"--size must be >= 1, got {size}")
        for method in methods:
            own = {k: v for k, v in params.items() if k in entries("compressor")[method].params} \
                if method in entries("compressor") else params
            rows.append(bench(method, numel, backend=args.backend, repeats=args.repeats, params=own))
            print(f"  {method} @ {numel:.2g}: {rows[-1].copy_multiple:.1f}x memcpy", file=sys.stderr, flush=True)
    print(format_table(rows))
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
    p = sub.add_parser("bench", help="time per element vs a memory copy, and wire bits per element")
    p.add_argument("--method", action="append", help="method to time (repeatable; default: all)")
    p.add_argument("--size", nargs="+", default=["1e4", "1e6"], help="element counts (default 1e4 1e6)")
    p.add_argument("--backend", default="numpy", choices=["numpy", "torch", "torch-cuda"])
    p.add_argument("--repeats", type=int, default=5, help="best of this many timings (default 5)")
    p.add_argument("--param", action="append", help="method parameter KEY=VALUE (repeatable)")
    p.set_defaults(func=cmd_bench)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as err:
        print(f"grace-dl: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
