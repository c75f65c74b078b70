"""Shaped links for the training benchmark: a Linux network namespace whose loopback is
capped with ``tc``'s token bucket filter, so that every rank started inside it (with
``ip netns exec``) talks over one link of the given rate, both directions sharing the cap.

Only the namespace's own loopback is used. The namespace is deleted when the ``with``
block ends, also on errors and Ctrl-C; namespaces left by a killed run (named
``gdl-bench-<pid>-<n>`` after a process that no longer exists) are deleted on the next
run.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from typing import Sequence

PREFIX = "gdl-bench-"
LOOPBACK_MTU = 65536  # tbf's bucket must hold at least one packet of the link's MTU


class ShapingUnavailable(RuntimeError):
    """Links cannot be shaped here (the message says why)."""


def _run(cmd: Sequence[str], timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout)


def why_cannot_shape() -> str | None:
    """None when this process can create and shape namespaces, else the reason in a few words."""
    if os.name != "posix" or not os.path.isdir("/proc/self/ns"):
        return "not Linux"
    if os.geteuid() != 0:
        return "not root (network namespaces and tc need root)"
    missing = [tool for tool in ("ip", "tc") if shutil.which(tool) is None]
    if missing:
        return f"{' and '.join(missing)} not found (install iproute2)"
    return None


def tbf_burst_bytes(rate_bps: float) -> int:
    """The token bucket's size: 10 ms at ``rate_bps``, and at least two loopback packets."""
    return max(int(rate_bps / 8 * 0.010), 2 * LOOPBACK_MTU)


def remove_stale() -> list[str]:
    """Delete the namespaces of benchmark runs whose process is gone; returns their names."""
    if why_cannot_shape() is not None:
        return []
    listed = _run(["ip", "netns", "list"])
    removed = []
    for line in listed.stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        if not name.startswith(PREFIX):
            continue
        pid = name[len(PREFIX):].split("-")[0]
        if pid.isdigit() and not os.path.exists(f"/proc/{pid}"):
            _run(["ip", "netns", "delete", name])
            removed.append(name)
    return removed


class ShapedLink:
    """``with ShapedLink(rate_bps) as link:`` a fresh namespace whose loopback runs at
    ``rate_bps``; ``link.wrap(cmd)`` is ``cmd`` run inside it.

    Args:
        rate_bps: the link's rate in bits per second.
        latency_ms: how long a packet may wait in the bucket's queue before it is
            dropped (tbf's ``latency``; default 50 ms).
    """

    _count = 0

    def __init__(self, rate_bps: float, latency_ms: float = 50.0):
        self.rate_bps = rate_bps
        self.latency_ms = latency_ms
        ShapedLink._count += 1
        self.name = f"{PREFIX}{os.getpid()}-{ShapedLink._count}"
        self.created = False

    def wrap(self, cmd: Sequence[str]) -> list[str]:
        """``cmd`` run inside the namespace."""
        return ["ip", "netns", "exec", self.name, *cmd]

    def __enter__(self) -> "ShapedLink":
        reason = why_cannot_shape()
        if reason is not None:
            raise ShapingUnavailable(reason)
        steps = [["ip", "netns", "add", self.name],
                 ["ip", "netns", "exec", self.name, "ip", "link", "set", "lo", "up"],
                 ["ip", "netns", "exec", self.name, "tc", "qdisc", "add", "dev", "lo", "root", "tbf",
                  "rate", f"{int(self.rate_bps)}bit", "burst", str(tbf_burst_bytes(self.rate_bps)),
                  "latency", f"{self.latency_ms:g}ms"]]
        try:
            for i, cmd in enumerate(steps):
                done = _run(cmd)
                if done.returncode != 0:
                    raise ShapingUnavailable(f"'{' '.join(cmd)}' failed: {done.stderr.strip() or done.returncode}")
                self.created = self.created or i == 0
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        """Delete the namespace (idempotent)."""
        if self.created:
            _run(["ip", "netns", "delete", self.name])
            self.created = False

    def __exit__(self, *exc) -> None:
        self.close()


def probe() -> str | None:
    """Create, shape and delete one namespace: None when that works, else why not."""
    reason = why_cannot_shape()
    if reason is not None:
        return reason
    try:
        with ShapedLink(1e9):
            return None
    except ShapingUnavailable as err:
        return str(err)
