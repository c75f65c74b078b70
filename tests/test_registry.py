"""Factories, from_config, grace_from_params and their errors."""

from __future__ import annotations

import inspect

import pytest

import grace_dl
from grace_dl import ConfigError


def test_every_method_has_a_factory_documented_and_citing_its_source():
    for name in grace_dl.list_methods():
        factory = getattr(grace_dl, name)
        grace = factory()
        assert type(grace.compressor).registry_name == name
        assert "Args:" in (factory.__doc__ or "") or not grace_dl.entries("compressor")[name].params
        assert "seed" in inspect.signature(factory).parameters
        if name != "none":
            assert grace_dl.entries("compressor")[name].paper, f"{name} cites no paper"


def test_factory_defaults_and_overrides():
    g = grace_dl.topk()
    assert g.compressor.ratio == 0.01
    assert type(g.memory).registry_name == "residual" and type(g.communicator).registry_name == "allgather"
    g = grace_dl.topk(ratio=0.2, memory="none", communicator="broadcast", seed=5, aggregate="sum")
    assert (g.compressor.ratio, g.seed, g.communicator.aggregate) == (0.2, 5, "sum")
    assert type(g.memory).registry_name == "none"
    g = grace_dl.randomk(beta=0.5)
    assert g.memory.beta == 0.5


@pytest.mark.parametrize("call, message", [
    (lambda: grace_dl.topk(ration=0.1), "no parameter 'ration'; valid: .*ratio"),
    (lambda: grace_dl.topk(ratio=0.0), "ratio must be in \\(0, 1\\]"),
    (lambda: grace_dl.topk(ratio="0.1"), "ratio must be float, got '0.1'"),
    (lambda: grace_dl.qsgd(levels=2.5), "levels must be int"),
    (lambda: grace_dl.qsgd(levels=True), "levels must be int"),
    (lambda: grace_dl.topk(memory="residul"), "unknown memory 'residul'; valid: .*residual"),
    (lambda: grace_dl.topk(communicator="gossip"), "unknown communicator 'gossip'; valid: allgather"),
    (lambda: grace_dl.topk(aggregate="median"), "aggregate must be one of"),
    (lambda: grace_dl.topk(seed=1.5), "seed must be int"),
    (lambda: grace_dl.make("topkk"), "unknown compressor 'topkk'; valid: .*topk"),
])
def test_bad_input_names_what_is_wrong(call, message):
    with pytest.raises(ConfigError, match=message):
        call()


def test_from_config_dict_and_yaml(tmp_path):
    g = grace_dl.from_config({"compressor": "qsgd", "levels": 15, "bucket_size": 128, "seed": 2})
    assert (g.compressor.levels, g.compressor.bucket_size, g.seed) == (15, 128, 2)
    path = tmp_path / "m.yaml"
    path.write_text("compressor: topk\nratio: 0.05\nmemory: residual\nbeta: 0.9\n")
    g = grace_dl.from_config(path)
    assert g.compressor.ratio == 0.05 and g.memory.beta == 0.9


@pytest.mark.parametrize("text, message", [
    ("compressor: topk\nratio: [0.1\n", "malformed YAML"),
    ("- topk\n", "must be a mapping"),
    ("ratio: 0.1\n", "lacks the required key 'compressor'"),
    ("compressor: topk\nratoi: 0.1\n", "no parameter 'ratoi'"),
])
def test_from_config_errors(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        grace_dl.from_config(str(path))


def test_from_config_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="no such config file"):
        grace_dl.from_config(tmp_path / "nope.yaml")


def test_grace_from_params_takes_grace_keys():
    g = grace_dl.grace_from_params({"compressor": "topk", "memory": "residual", "communicator": "allgather",
                                    "compress_ratio": 0.3, "world_size": 4})
    assert g.compressor.ratio == 0.3
    g = grace_dl.grace_from_params({"compressor": "qsgd", "memory": "none", "communicator": "allgather",
                                    "quantum_num": 64})
    assert g.compressor.levels == 64
    with pytest.raises(ConfigError, match="no parameter 'compress_ration'"):
        grace_dl.grace_from_params({"compressor": "topk", "communicator": "allgather", "compress_ration": 0.3})


def test_duplicate_registration_is_refused():
    from grace_dl.registry import register

    with pytest.raises(ValueError, match="registered twice"):
        @register("compressor", "topk")
        class Again(grace_dl.Compressor):  # pragma: no cover - never instantiated
            pass


def test_docs_methods_md_is_generated_from_the_registry():
    from pathlib import Path

    from grace_dl.docs import methods_markdown

    committed = (Path(__file__).parent.parent / "docs" / "methods.md").read_text()
    assert committed.strip() == methods_markdown().strip(), \
        "docs/methods.md is stale: run python -m grace_dl.docs > docs/methods.md"


def test_a_method_registered_after_import_gets_factories_everywhere():
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent("""
        import grace_dl
        from grace_dl import register
        from grace_dl.compressors.none import NoCompression

        @register("compressor", "late_method", summary="registered by a user after import")
        class Late(NoCompression):
            '''A user's method.'''

        import grace_dl.torch as grace_torch
        assert type(grace_dl.late_method().compressor).__name__ == "Late"
        assert type(grace_torch.late_method().grace.compressor).__name__ == "Late"
        print("LATE-OK")
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert "LATE-OK" in result.stdout, result.stderr[-3000:]
