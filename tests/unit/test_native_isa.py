"""The native kernels built for narrower instruction sets than this CPU's (``VLMKIT_NATIVE_MARCH``):
the AVX2 kernels and the portable C ones pass the same kernel, fused-step and quantization tests,
so a CI machine with AVX-512 also checks the code an AVX2-only machine runs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from vlmkit import native

ROOT = Path(__file__).resolve().parents[2]
HAS_AVX2 = all(f in native._cpu_flags().split() for f in ("avx2", "fma", "f16c"))
ISAS = [
    pytest.param("haswell", "avx2", marks=pytest.mark.skipif(not HAS_AVX2, reason="this CPU cannot run AVX2 code")),
    pytest.param("x86-64", "generic"),
]
SUITES = ["tests/unit/test_native.py", "tests/unit/test_llama_fused.py", "tests/unit/test_quant_schemes.py"]


def _env(tmp_path: Path, march: str) -> dict[str, str]:
    return {**os.environ, "VLMKIT_NATIVE_MARCH": march, "VLMKIT_CACHE": str(tmp_path / "cache")}


@pytest.mark.skipif(not native.available() or os.uname().machine != "x86_64", reason="x86-64 with a working C compiler")
@pytest.mark.parametrize(("march", "isa"), ISAS)
def test_kernels_built_for_a_narrower_isa_pass_the_kernel_tests(tmp_path, march, isa):
    env = _env(tmp_path, march)
    status = subprocess.run([sys.executable, "-c", "from vlmkit import native; print(native.status())"],
                            env=env, capture_output=True, text=True, timeout=300, check=True).stdout  # fmt: skip
    assert f"({isa}; " in status and f"-march={march}" in status, status
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *SUITES], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600, check=False)  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    assert " passed" in run.stdout and " failed" not in run.stdout


def test_a_bad_march_name_leaves_the_kernels_off_and_says_why(tmp_path, monkeypatch):
    monkeypatch.setenv("VLMKIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("VLMKIT_NATIVE_MARCH", "native; rm -rf /")
    try:
        assert native.reload() is False
        assert "is not a -march name" in native.status() and "'native; rm -rf /'" in native.status()
        if native._compiler() is not None:
            monkeypatch.setenv("VLMKIT_NATIVE_MARCH", "no-such-cpu")  # a name the compiler refuses: no fallback build
            assert native.reload() is False and "-march=no-such-cpu" in native.status()
    finally:
        monkeypatch.undo()
        native.reload()
