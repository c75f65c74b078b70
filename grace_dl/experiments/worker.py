"""What ``horovodrun`` starts on each rank: ``python -m grace_dl.experiments.worker CONFIG``.

``CONFIG`` is the resolved configuration that ``grace-dl run`` wrote into the output
directory; rank 0 writes ``metrics.jsonl`` and ``summary.json`` next to it.
"""

from __future__ import annotations

import sys

from ..registry import ConfigError
from . import train
from .config import load


def main(argv: list[str] | None = None) -> int:
    """Run the experiment in ``argv[0]`` as one Horovod worker."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m grace_dl.experiments.worker CONFIG.yaml", file=sys.stderr)
        return 2
    try:
        config = load(args[0])
        if config.sweep is not None:
            raise ConfigError("sweep: a worker runs one experiment; start sweeps with grace-dl run")
    except ConfigError as err:
        print(f"grace-dl: error: {err}", file=sys.stderr)
        return 2
    train.run(config)
    return 0


if __name__ == "__main__":
    sys.exit(main())
