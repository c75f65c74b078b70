"""YAML-configured experiments: ``grace-dl run config.yaml`` and ``grace-dl compare``.

* :mod:`~grace_dl.experiments.config`: the schema, validation and defaults;
* :mod:`~grace_dl.experiments.tasks`: digits, a character-level LM on the standard
  library's sources, and a synthetic problem with a known optimum (no downloads);
* :mod:`~grace_dl.experiments.torch_runner`, :mod:`~grace_dl.experiments.tf_runner`: the
  models and training step on each framework, under Horovod or the simulator;
* :mod:`~grace_dl.experiments.train`: the loop, metrics and summary;
* :mod:`~grace_dl.experiments.launch`: horovodrun (Gloo or MPI) or in-process;
* :mod:`~grace_dl.experiments.metrics`, :mod:`~grace_dl.experiments.compare`: JSON Lines,
  summaries, tables and plots.

This package imports neither framework until a run starts.
"""

from __future__ import annotations

from .config import ExperimentConfig, load, validate

__all__ = ["ExperimentConfig", "load", "validate"]
