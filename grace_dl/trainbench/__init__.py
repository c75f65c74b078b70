"""The end-to-end training benchmark (``grace-dl bench-train``): step time of a
ResNet-18-shaped model trained by N ranks over real collectives, per method and per link
(shaped with a network namespace and ``tc``), against the compute-only ceiling and the
ideal bound ``compute + bytes / bandwidth``. See docs/bench.md, "End-to-end training".

Modules: :mod:`.spec` (methods, links, presets), :mod:`.runner` (launches),
:mod:`.netns` (shaped links), :mod:`.report` (figures, table, JSON, plot) are
framework-free; :mod:`.model` and :mod:`.worker` (one rank) need torch.
"""
