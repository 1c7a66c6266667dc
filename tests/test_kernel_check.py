"""The CUDA device code, checked without a GPU (scripts/kernel_check/).

On a machine without a GPU (CI) these are the only tests that run the code in
csrc/kernels/*.cuh: the index model replays the launchers' kernel choice and the
kernels' index math in Python; the host emulation compiles the real kernels as C++
(one std::thread per CUDA thread, barriers, warp shuffles and thread-block clusters
emulated) and compares the LayerNorm kernels with a long double reference (ill-
conditioned rows included) and the LN-RNN cell kernels with their row functions in
double, under AddressSanitizer, and again under ThreadSanitizer for shared-memory races.
"""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

CHECK = Path(__file__).resolve().parents[1] / "scripts" / "kernel_check"
CUDA_HOME = Path(os.environ.get("CUDA_HOME", "/usr/local/cuda"))


def _run(cmd, timeout):
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    return proc.returncode, proc.stdout + proc.stderr


@pytest.mark.check
def test_index_model():
    rc, log = _run([sys.executable, str(CHECK / "index_model.py")], timeout=300)
    assert rc == 0 and "OK" in log, log


needs_emulation = pytest.mark.skipif(
    shutil.which("g++") is None or not (CUDA_HOME / "include" / "cuda_bf16.h").exists(),
    reason="the host emulation needs g++ and the CUDA headers (cuda_fp16.h, cuda_bf16.h)")


@needs_emulation
def test_host_emulation_smoke():
    """`make test`'s run of the device code: every kernel family once (rows, long, cluster;
    the LN-RNN cells), float and bf16, under AddressSanitizer."""
    rc, log = _run(["bash", str(CHECK / "run_host_emulation.sh"), "t"], timeout=1500)
    assert rc == 0 and "OK: 0 failures" in log, log[-4000:]


@pytest.mark.check
@needs_emulation
def test_host_emulation_quick():
    """Every LayerNorm kernel family (rows, long, cluster with both ways its blocks meet;
    fused and column dweight/dbias) on a few shapes in all six dtype combinations and on
    ill-conditioned rows, and every LN-RNN cell kernel, under AddressSanitizer."""
    rc, log = _run(["bash", str(CHECK / "run_host_emulation.sh"), "q"], timeout=1500)
    assert rc == 0 and "OK: 0 failures" in log, log[-4000:]


@pytest.mark.check
@needs_emulation
def test_host_emulation_finds_no_races():
    """Every kernel family once under ThreadSanitizer: a shared-memory access by one
    emulated thread that races with another's (no barrier between) fails the run."""
    rc, log = _run(["bash", str(CHECK / "run_host_emulation.sh"), "--tsan", "t"], timeout=1500)
    assert rc == 0 and "OK: 0 failures" in log and "ThreadSanitizer" not in log, log[-4000:]
