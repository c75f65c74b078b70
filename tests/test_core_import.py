"""The core imports no framework: ``import grace_dl`` works with only NumPy."""

from __future__ import annotations

import subprocess
import sys
import textwrap


def test_core_works_with_only_numpy_and_the_standard_library():
    # An import hook refuses every module that is neither the standard library, NumPy nor
    # grace_dl itself, as in an environment where only NumPy is installed.
    script = textwrap.dedent("""
        import sys
        allowed = set(sys.stdlib_module_names) | {"numpy", "grace_dl"}

        class OnlyNumpy:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] not in allowed:
                    raise ImportError(f"blocked: {name}")
                return None

        sys.meta_path.insert(0, OnlyNumpy())
        import numpy as np
        import grace_dl
        sim = grace_dl.LocalSimulator(grace_dl.topk(ratio=0.5), 2)
        out = sim.step([{"w": np.ones(4, np.float32)}, {"w": np.ones(4, np.float32)}])
        assert out[0]["w"].shape == (4,)
        for name in grace_dl.list_methods():
            grace_dl.make(name)
        bad = [m for m in ("torch", "tensorflow", "horovod", "mpi4py", "yaml") if m in sys.modules]
        assert not bad, bad
        print("ok")
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
