"""The benchmark tooling: per-call time, peak extra memory, reference figures, the
side-by-side run against GRACE's torch compressors, and the CLI's errors for bad input.

The GRACE comparison itself runs only when a checkout of sands-lab/grace is named by the
GRACE_CHECKOUT environment variable; the loader's renaming is checked on a stand-in."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from grace_dl import bench as b
from grace_dl.registry import ConfigError

ROOT = Path(__file__).resolve().parent.parent


def cli(*args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT), TF_CPP_MIN_LOG_LEVEL="2", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "grace_dl.cli", "bench", *args], capture_output=True,
                          text=True, timeout=timeout, env=env, cwd=ROOT)


# -- columns -----------------------------------------------------------------------------------

def test_per_call_time_and_copy_multiple_are_consistent():
    r = b.bench("signsgd", 1000, repeats=2, memory=False)
    assert r.us_per_call == pytest.approx(r.ns_per_element * 1000 / 1e3)
    assert r.copy_multiple == pytest.approx(r.ns_per_element / r.copy_ns_per_element)
    assert r.us_per_call > 0 and r.peak_memory_multiple is None
    assert r.bits_per_element == pytest.approx(r.formula_bits_per_element)


def test_fp16_peak_memory_is_its_half_size_payload():
    # 16 of 32 bits per element must be held between compress and decompress
    r = b.bench("fp16", 100_000, repeats=1)
    assert 0.45 <= r.peak_memory_multiple <= 1.0


class _FullSizeTemporary:
    """Compress holds a float64 copy (2x the float32 input) while it builds a payload of
    every 4th element (0.25x); decompress rebuilds a full-size result."""

    def compress_rounds(self, ops, x, ctx):
        widened = x.astype(np.float64)
        payload = SimpleNamespace(buffer=widened[::4].astype(np.float32), nbytes=x.nbytes // 4)
        del widened
        return payload
        yield  # a generator that asks for no collective

    def decompress(self, ops, buffer, ctx):
        return np.repeat(buffer, 4)


def test_peak_memory_counts_temporaries_and_payload_but_not_the_result():
    case = b._make_case("none", 400_000, "numpy", None)
    case.comp = _FullSizeTemporary()
    extra = b._numpy_peak(case)
    assert extra / case.x.nbytes == pytest.approx(2.25, abs=0.05)


def test_a_result_that_views_the_payload_is_not_subtracted():
    # none's decompress may hand back the payload's own memory: the figure never goes negative
    assert 0 <= b.peak_memory_multiple("none", 100_000) < 0.1


def test_torch_cpu_peak_memory_from_a_fresh_process():
    pytest.importorskip("torch")
    if not os.access("/proc/self/clear_refs", os.W_OK):
        pytest.skip("needs Linux's /proc/self/clear_refs")
    assert b.peak_memory_multiple("fp16", 1000, backend="torch") is None  # below RSS_MIN_NUMEL
    assert 0.3 <= b.peak_memory_multiple("fp16", b.RSS_MIN_NUMEL, backend="torch") <= 1.0


# -- reference figures -------------------------------------------------------------------------

def _row(method: str, numel: int, multiple: float, peak: float | None = 0.5) -> b.BenchResult:
    return b.BenchResult(method, numel, "numpy", ns_per_element=multiple, copy_ns_per_element=1.0,
                         bits_per_element=16.0, formula_bits_per_element=16.0, peak_memory_multiple=peak)


def _table_cells(table: str, method: str) -> dict[str, str]:
    header = [c.strip() for c in table.splitlines()[0].strip("|").split("|")]
    line = next(l for l in table.splitlines() if l.startswith(f"| {method} |"))
    return dict(zip(header, (c.strip() for c in line.strip("|").split("|"))))


def test_written_reference_is_read_back_and_compared(tmp_path):
    path = tmp_path / "ref.json"
    b.write_reference([_row("fp16", 1000, 4.0), _row("topk", 1000, 10.0, None)], path, repeats=3)
    b.write_reference([_row("qsgd", 1000, 8.0)], path, repeats=3)  # merged, not replaced
    ref = b.load_reference(path)
    numpy_ref = ref["backends"]["numpy"]
    assert numpy_ref["machine"]["numpy"] == np.__version__ and numpy_ref["date"] and numpy_ref["repeats"] == 3
    assert sorted(numpy_ref["figures"]) == ["fp16", "qsgd", "topk"]
    assert numpy_ref["figures"]["fp16"]["1000"] == {"x_memcpy": 4.0, "us_per_call": 4.0, "ns_per_element": 4.0,
                                                    "peak_memory_x": 0.5}
    cells = _table_cells(b.format_table([_row("fp16", 1000, 6.0), _row("sbc", 1000, 6.0)], ref), "fp16")
    assert cells["ref x memcpy"] == "4.0" and cells["vs ref"] == "1.50" and cells["peak mem x"] == "0.50"
    assert cells["us/call"] == "6.0"
    cells = _table_cells(b.format_table([_row("sbc", 1000, 6.0)], ref), "sbc")
    assert cells["ref x memcpy"] == "-" and cells["vs ref"] == "-"


def test_shipped_reference_has_the_overhead_and_large_tensor_figures():
    ref = b.load_reference()
    for backend, sizes in (("numpy", ("1000", "10000", "1000000", "25000000")), ("torch", ("1000", "10000", "1000000"))):
        entry = ref["backends"][backend]
        assert entry["machine"]["cpu"] and entry["date"]
        for size in sizes:
            fig = entry["figures"]["topk"][size]
            assert fig["x_memcpy"] > 0 and fig["us_per_call"] > 0
    measured = b.bench("fp16", 1000, repeats=1, memory=False)
    stored = b.reference_figures(ref, "numpy", "fp16", 1000)["x_memcpy"]
    cells = _table_cells(b.format_table([measured], ref), "fp16")
    assert cells["ref x memcpy"] == f"{stored:.1f}"
    assert cells["vs ref"] == f"{measured.copy_multiple / stored:.2f}"


def test_bad_reference_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="no such file|No such file"):
        b.load_reference(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{", encoding="utf-8")
    with pytest.raises(ConfigError, match="not JSON"):
        b.load_reference(tmp_path / "bad.json")


# -- GRACE -------------------------------------------------------------------------------------

def test_grace_loader_rejects_a_directory_that_is_not_a_checkout(tmp_path):
    with pytest.raises(ConfigError, match="is not a GRACE checkout"):
        b.load_grace(tmp_path)
    with pytest.raises(ConfigError, match="is not a GRACE checkout"):
        b.load_grace(tmp_path / "nowhere")


def _stand_in_checkout(root: Path) -> Path:
    """A directory laid out like GRACE's, whose modules import the way GRACE's do."""
    comp = root / "grace_dl" / "torch" / "compressor"
    comp.mkdir(parents=True)
    (root / "grace_dl" / "__init__.py").write_text("MARK = 'stand-in'\n", encoding="utf-8")
    (root / "grace_dl" / "torch" / "__init__.py").write_text("class Compressor:\n    pass\n", encoding="utf-8")
    (comp / "fp16.py").write_text(textwrap.dedent("""\
        from grace_dl.torch import Compressor
        from horovod.torch import allreduce_
        class FP16Compressor(Compressor):
            reduce = staticmethod(allreduce_)
        """), encoding="utf-8")
    (comp / "natural.py").write_text("import a_module_that_is_not_installed\n", encoding="utf-8")
    return root


def test_grace_loader_renames_the_package_and_restores_ours(tmp_path):
    pytest.importorskip("torch")
    import grace_dl

    before = {name: sys.modules.get(name) for name in ("grace_dl", "grace_dl.torch", "horovod", "horovod.torch")}
    loaded = b.load_grace(_stand_in_checkout(tmp_path), ["fp16", "natural"])
    cls = loaded["fp16"]
    assert cls.__module__ == "_grace_checkout.torch.compressor.fp16"
    assert cls.__mro__[1].__module__ == "_grace_checkout.torch"
    marker = object()
    assert cls.reduce(marker) is marker  # one worker's allreduce returns its tensor
    assert "a_module_that_is_not_installed" in loaded["natural"]
    assert sys.modules["grace_dl"] is grace_dl
    assert {name: sys.modules.get(name) for name in before} == before
    with pytest.raises(ConfigError, match="no GRACE counterpart for sketch"):
        b.load_grace(tmp_path, ["sketch"])
    for name in [n for n in sys.modules if n.startswith("_grace_checkout")]:
        del sys.modules[name]  # a real checkout loaded later must not find the stand-in


@pytest.mark.skipif(not os.environ.get("GRACE_CHECKOUT"), reason="set GRACE_CHECKOUT to a sands-lab/grace checkout")
def test_side_by_side_with_a_grace_checkout():
    pytest.importorskip("torch")
    rows = b.compare_with_grace(os.environ["GRACE_CHECKOUT"], [10_000], methods=["fp16", "topk", "powersgd"],
                                repeats=2)
    by = {r.method: r for r in rows}
    assert by["fp16"].grace_bits_per_element == by["fp16"].bits_per_element == 16
    # GRACE sends k float32 values and k int64 indices, grace-dl int32 indices
    assert by["topk"].grace_bits_per_element == pytest.approx(0.01 * 96)
    assert by["topk"].bits_per_element == pytest.approx(0.01 * 64)
    assert by["powersgd"].grace_bits_per_element == pytest.approx(by["powersgd"].bits_per_element)
    for r in rows:
        assert 0 < r.speedup < float("inf")
        assert r.speedup == pytest.approx(r.grace_us_per_call / r.us_per_call)
    assert "| topk 0.01 | 1e+04 | torch |" in b.format_comparison(rows)


# -- CLI errors --------------------------------------------------------------------------------

@pytest.mark.parametrize("args, named", [
    (["--size", "abc"], "'abc'"), (["--size", "nan"], "'nan'"), (["--size", "inf"], "'inf'"),
    (["--size", "0"], "'0'"), (["--size", "-5"], "'-5'"), (["--size", "1.5"], "'1.5'"),
    (["--repeats", "0"], "--repeats must be a whole number >= 1, got '0'"),
    (["--repeats", "x"], "--repeats must be a whole number >= 1, got 'x'"),
    (["--method", "topk", "--param", "ratoi=0.1"], "--param ratoi: not a parameter of fp16, topk; valid: ratio"),
    (["--method", "nope"], "--method nope: unknown method"),
    (["--backend", "jax"], "--backend jax: unknown"),
    (["--reference", "/nonexistent/ref.json"], "/nonexistent/ref.json"),
])
def test_bad_bench_input_is_one_line_and_exit_code_2(args, named):
    result = cli("--method", "fp16", *args)
    assert result.returncode == 2 and result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("grace-dl: error: ") and named in lines[0], result.stderr


def test_torch_cuda_without_cuda_is_one_line():
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    result = cli("--backend", "torch-cuda")
    assert result.returncode == 2 and result.stderr.strip() == (
        "grace-dl: error: --backend torch-cuda: CUDA is not available here (torch.cuda.is_available() is False)")


def test_against_grace_on_a_directory_that_is_not_a_checkout(tmp_path):
    pytest.importorskip("torch")
    result = cli("--backend", "torch", "--against-grace", str(tmp_path))
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [
        f"grace-dl: error: --against-grace: {tmp_path} is not a GRACE checkout (no grace_dl/torch/compressor/ "
        "in it; clone https://github.com/sands-lab/grace)"]


def test_cli_prints_the_new_columns_and_writes_a_reference(tmp_path):
    path = tmp_path / "ref.json"
    result = cli("--method", "fp16", "--size", "1e3", "--repeats", "1", "--write-reference", str(path))
    assert result.returncode == 0, result.stderr
    cells = _table_cells(result.stdout, "fp16")
    assert float(cells["us/call"]) > 0 and float(cells["peak mem x"]) >= 0.45
    assert json.loads(path.read_text())["backends"]["numpy"]["figures"]["fp16"]["1000"]["x_memcpy"] > 0
