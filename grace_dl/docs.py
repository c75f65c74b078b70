"""Generate ``docs/methods.md`` from the registry: ``python -m grace_dl.docs > docs/methods.md``."""

from __future__ import annotations

from .registry import algorithms, entries

_SAMPLE = 1_000_000


def _bits(cls_entry) -> str:
    comp = cls_entry.cls()
    nbytes = comp.payload_nbytes(_SAMPLE, "float32", "float32")
    if hasattr(comp, "payload_nbytes_for_shape"):  # low rank: a 1000 x 1000 matrix
        nbytes = comp.payload_nbytes_for_shape((1000, 1000), "float32", 0)
    if hasattr(comp, "payload_nbytes_after_warmup"):  # dense warm-up, then compressed (1-bit Adam)
        nbytes = comp.payload_nbytes_after_warmup(_SAMPLE, "float32")
    if nbytes is None:
        return "data-dependent"
    if hasattr(comp, "rounds_nbytes"):  # collectives made while compressing count too
        nbytes += comp.rounds_nbytes(_SAMPLE, "float32")
    return f"{8 * nbytes / _SAMPLE:.3g}"


def methods_markdown() -> str:
    """The Markdown text of docs/methods.md."""
    lines = [
        "# Methods",
        "",
        "Generated from the registry by `python -m grace_dl.docs > docs/methods.md`; a test",
        "fails when this file and the code disagree. Bits per element are for a float32",
        f"tensor of {_SAMPLE:,} elements (a 1000 x 1000 matrix for low-rank methods) with the",
        "default parameters, including the collectives a method makes while compressing.",
        "",
        "| method | paper | parameters (defaults) | bits/element | summable | bias | memory | communicator |",
        "|---|---|---|---:|---|---|---|---|",
    ]
    for name, e in sorted(entries("compressor").items()):
        params = ", ".join(f"`{p.name}={p.default!r}`" for p in e.params.values()) or "-"
        comp = e.cls()
        lines.append(f"| `{name}` | {e.paper or '-'} | {params} | {_bits(e)} | "
                     f"{'yes' if comp.summable else 'no'} | {comp.bias} | {e.cls.memory} | {e.cls.communicator} |")
    for kind in ("memory", "communicator"):
        lines += ["", f"## {kind.capitalize()} options", "", "| name | parameters (defaults) | what it does |",
                  "|---|---|---|"]
        for name, e in sorted(entries(kind).items()):
            params = ", ".join(f"`{p.name}={p.default!r}`" for p in e.params.values()) or "-"
            lines.append(f"| `{name}` | {params} | {e.summary} |")
    lines += ["", "## Policies (any method)", "",
              "`policies` is a mapping accepted by every factory, `make` and `from_config`:", "",
              "| key | default | effect |", "|---|---|---|",
              "| `min_numel` | 0 | tensors with fewer elements are sent dense (allreduce, no memory) |",
              "| `warmup_steps` | 0 | every tensor is sent dense for its first steps |",
              "| `overrides` | none | `{name pattern: settings}` (fnmatch, first match wins): a few parameters "
              "of the base method (`{ratio: 0.1}`) or a whole method (`{compressor: fp16}`) |",
              "| `fusion_bytes` | 0 | tensor fusion: where whole models are exchanged (the simulator, the "
              "Horovod torch adapter, the DDP hook with `named_parameters`, the Horovod TF adapters on the "
              "graph path), consecutive small tensors are "
              "merged into buckets of up to this many bytes, one pipeline each (`grace_dl.fusion`); 0: every "
              "tensor on its own. 1048576 (1 MiB) was fastest in `grace-dl bench-train` (docs/bench.md) |",
              "", "```yaml", "compressor: topk", "ratio: 0.01", "policies:", "  min_numel: 1024",
              "  warmup_steps: 100", "  overrides:", "    \"*.bias\": {compressor: none}",
              "    \"embedding.*\": {ratio: 0.001}", "```"]
    lines += ["", "## Training algorithms", "",
              "Schedules around the user's optimizer rather than gradient compressors; each runs any method",
              "above inside (see docs/local-sgd.md).", "",
              "| algorithm | paper | parameters (defaults) | what it does |", "|---|---|---|---|"]
    for name, algo in sorted(algorithms().items()):
        params = ", ".join(f"`{p.name}={p.default!r}`" for p in algo.params.values()) or "-"
        lines.append(f"| `{name}` | {algo.paper} | {params} | {algo.summary} |")
    lines += ["", "## Details", ""]
    for name, e in sorted(entries("compressor").items()):
        lines += [f"### `{name}`", "", (e.cls.__doc__ or "").strip().replace("\n    ", "\n"), ""]
    return "\n".join(lines)


if __name__ == "__main__":
    print(methods_markdown())
