"""Policies any method can use: which tensors, and which steps, are compressed how.

* ``min_numel``: tensors with fewer elements go dense (biases and norms cost more in
  per-message overhead and accuracy than they save in bytes);
* ``warmup_steps``: every tensor goes dense for its first steps, then the method runs
  (compressing a randomly initialised model's first gradients hurts most);
* ``overrides``: per-tensor method changes by name pattern (``fnmatch`` syntax, first
  match wins), either a few parameters of the base method (``{"ratio": 0.1}``) or a whole
  other method (``{"compressor": "fp16"}``);
* ``fusion_bytes``: the bucket size of tensor fusion (:mod:`grace_dl.fusion`): small
  tensors are merged into buckets of up to this many bytes and exchanged as one (0: every
  tensor on its own).

"Dense" means: the input sent uncompressed with an allreduce and averaged, no memory.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import Any

from .core import Communicator, Compressor, Memory
from .fusion import DEFAULT_FUSION_BYTES

POLICY_KEYS = ("min_numel", "warmup_steps", "overrides", "fusion_bytes")


@dataclass
class Route:
    """The components that process one tensor."""

    compressor: Compressor
    memory: Memory
    communicator: Communicator
    label: str


@dataclass
class Policies:
    """Per-tensor and per-step choices of how to compress.

    Args:
        min_numel: tensors with fewer elements are sent dense (default 0: none).
        warmup_steps: each tensor is sent dense for its first this many steps (default 0).
        overrides: ``[(pattern, Route)]``, first matching pattern wins (default none).
        fusion_bytes: largest fusion bucket in bytes, where the simulator and the
            adapters exchange whole models (default
            :data:`~grace_dl.fusion.DEFAULT_FUSION_BYTES`, 0: per tensor).
    """

    min_numel: int = 0
    warmup_steps: int = 0
    overrides: list[tuple[str, Route]] = field(default_factory=list)
    fusion_bytes: int = DEFAULT_FUSION_BYTES

    def __post_init__(self) -> None:
        for key in ("min_numel", "warmup_steps", "fusion_bytes"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"policies.{key} must be an int >= 0, got {value!r}")

    @property
    def active(self) -> bool:
        """Whether any policy changes the route of a tensor (fusion does not)."""
        return bool(self.min_numel or self.warmup_steps or self.overrides)

    def override_for(self, name: str) -> Route | None:
        """The override route of tensor ``name``, if a pattern matches it."""
        for pattern, route in self.overrides:
            if fnmatch.fnmatchcase(name, pattern):
                return route
        return None

    def is_dense(self, numel: int, step: int) -> bool:
        """Whether a tensor of ``numel`` elements at ``step`` goes dense."""
        return numel < self.min_numel or step < self.warmup_steps


def dense_route() -> Route:
    """Uncompressed allreduce with mean aggregation and no memory."""
    from .communicators import Allreduce
    from .compressors.none import NoCompression
    from .memories import NoMemory

    return Route(NoCompression(), NoMemory(), Allreduce("mean"), "dense")


def parse_policies(config: Any, base: dict[str, Any], build_method: Any) -> Policies:
    """:class:`Policies` from a config mapping.

    Args:
        config: ``{"min_numel": int, "warmup_steps": int, "overrides": {pattern: mapping},
            "fusion_bytes": int}``
            (all optional); ``None`` gives no policies.
        base: the base method's config (``compressor`` and its parameters), onto which
            partial overrides are merged.
        build_method: builds a Grace from a config mapping (``registry.from_config``).
    """
    from .registry import ConfigError

    if config is None:
        return Policies()
    if not isinstance(config, dict):
        raise ConfigError(f"policies must be a mapping, got {type(config).__name__}")
    unknown = sorted(set(config) - set(POLICY_KEYS))
    if unknown:
        raise ConfigError(f"policies has no key {unknown[0]!r}; valid: {', '.join(POLICY_KEYS)}")
    overrides_config = config.get("overrides") or {}
    if not isinstance(overrides_config, dict):
        raise ConfigError(f"policies.overrides must map name patterns to method settings, "
                          f"got {type(overrides_config).__name__}")
    overrides = []
    for pattern, settings in overrides_config.items():
        if not isinstance(pattern, str) or not isinstance(settings, dict):
            raise ConfigError(f"policies.overrides[{pattern!r}] must be a mapping of method settings, "
                              f"got {settings!r}")
        if "policies" in settings:
            raise ConfigError(f"policies.overrides[{pattern!r}] cannot nest policies")
        merged = dict(settings) if "compressor" in settings else {**base, **settings}
        try:
            method = build_method(merged)
        except ConfigError as err:
            raise ConfigError(f"policies.overrides[{pattern!r}]: {err}") from None
        overrides.append((pattern, Route(method.compressor, method.memory, method.communicator, pattern)))
    try:
        return Policies(config.get("min_numel", 0), config.get("warmup_steps", 0), overrides,
                        config.get("fusion_bytes", DEFAULT_FUSION_BYTES))
    except ValueError as err:
        raise ConfigError(str(err)) from None
