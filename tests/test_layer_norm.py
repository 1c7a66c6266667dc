"""LayerNorm forward and backward against a float64 reference, on every sample input."""
import dataclasses
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import ln_ext
from samples import (CUDA_ONLY, DEVICES, STATS_TOL_DEFAULT, STATS_TOLERANCES, TOLERANCES, Sample, Tol, assert_close_scaled,
                     make_sample, reference, run_with_cpu_isa_cap, sample_inputs)


def _grads(s, y):
    """(dx, dweight, dbias) of y w.r.t. the leaves of s, through ln_ext's autograd."""
    leaves = [t for t in (s.x, s.weight, s.bias) if t is not None]
    grads = list(torch.autograd.grad(y, leaves, s.dy))
    dx = grads.pop(0)
    dw = grads.pop(0) if s.weight is not None else None
    db = grads.pop(0) if s.bias is not None else None
    return dx, dw, db


def check_against_reference(s):
    """Forward y, mean, rstd and all three gradients of sample `s` vs float64."""
    fwd_tol, bwd_tol = TOLERANCES[s.x.dtype]
    stats_tol = STATS_TOLERANCES.get(s.x.dtype, STATS_TOL_DEFAULT)
    want = reference(s)
    s = s.with_grad()

    y, mean, rstd = torch.ops.ln_ext.layer_norm_fwd(*s.op_args())
    assert y.dtype == s.x.dtype and y.shape == s.x.shape
    stats_dtype = torch.float64 if s.x.dtype == torch.float64 else torch.float32
    assert mean.dtype == rstd.dtype == stats_dtype
    assert_close_scaled(y, want.y, fwd_tol, what="y")
    x_scale = float(s.x.detach().abs().max()) if s.x.numel() else 1.0
    assert_close_scaled(mean, want.mean, stats_tol, scale=x_scale, what="mean")
    assert_close_scaled(rstd, want.rstd, stats_tol, what="rstd")

    dx, dw, db = _grads(s, ln_ext.layer_norm(*s.args()))
    assert dx.dtype == s.x.dtype
    # dx = rstd * (g - mean(g) - xhat * mean(g * xhat)) can cancel to ~0 (always for N <= 2):
    # its error is relative to the terms, rstd * |dy * weight|.
    assert_close_scaled(dx, want.dx, bwd_tol, scale=want.dx_term, what="dx")
    # Summed over M rows: error grows like sqrt(M) times one term.
    sqrt_m = math.sqrt(max(s.rows, 1))
    if s.weight is not None:
        assert dw.dtype == s.weight.dtype
        assert_close_scaled(dw, want.dweight, bwd_tol, scale=sqrt_m * want.dweight_term, what="dweight")
    if s.bias is not None:
        assert db.dtype == s.bias.dtype
        assert_close_scaled(db, want.dbias, bwd_tol, scale=sqrt_m * want.dbias_term, what="dbias")


@pytest.mark.parametrize("device", DEVICES)
def test_matches_float64_reference(device):
    """Every sample input: y, mean, rstd, dx, dweight, dbias within the dtype's tolerance."""
    failures = []
    count = 0
    for s in sample_inputs(device):
        count += 1
        try:
            check_against_reference(s)
        except Exception as e:  # collect them all: one report names every failing sample
            failures.append(f"{s.name}: {type(e).__name__}: {e}")
    assert count > 100
    assert not failures, f"{len(failures)} of {count} samples failed:\n" + "\n\n".join(failures)


@pytest.mark.parametrize("device", DEVICES)
def test_matches_nn_layer_norm(device):
    """Same values as F.layer_norm (not only the reference) on a few shapes per dtype."""
    for s in sample_inputs(device, small=True):
        fwd_tol, _ = TOLERANCES[s.x.dtype]
        want = F.layer_norm(*s.args())
        got = ln_ext.layer_norm(*s.args())
        assert got.dtype == want.dtype
        # F.layer_norm has its own error (4 fp16 ulps seen at N=1 on the CPU), so the
        # two results are compared with 8x the reference tolerance.
        assert_close_scaled(got, want.double(), Tol(8 * fwd_tol.atol, 8 * fwd_tol.rtol), what=s.name)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_non_finite_row_stays_in_its_row(device, dtype):
    """NaN or Inf in one row gives NaN in that row only, as nn.LayerNorm does, and
    leaves the other rows' outputs and input gradients finite and unchanged."""
    s = make_sample("nonfinite", (6, 37), dtype=dtype, device=device).with_grad()
    x = s.x.detach().clone()
    x[1, 5] = float("nan")
    x[3, 0] = float("inf")
    x[4, 36] = float("-inf")
    x.requires_grad_(True)
    y = ln_ext.layer_norm(x, s.normalized_shape, s.weight, s.bias)
    want = F.layer_norm(x, s.normalized_shape, s.weight, s.bias)
    bad = torch.tensor([1, 3, 4], device=device)
    good = torch.tensor([0, 2, 5], device=device)
    assert torch.isnan(y[bad]).all() and torch.isnan(want[bad]).all()
    (dx,) = torch.autograd.grad(y, x, s.dy)
    assert torch.isnan(dx[bad]).all()
    # The finite rows: as if the others were not there.
    fwd_tol, bwd_tol = TOLERANCES[dtype]
    clean = dataclasses.replace(s, x=x.detach()[good], dy=s.dy[good])
    ref = reference(clean)
    assert_close_scaled(y[good], ref.y, fwd_tol, what="y of finite rows")
    assert_close_scaled(dx[good], ref.dx, bwd_tol, scale=ref.dx_term, what="dx of finite rows")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape, normalized_shape", [((0, 5), (5,)), ((2, 0, 4), (4,)), ((3, 0), (0,)), ((2, 3, 0), (3, 0))])
def test_empty(device, dtype, shape, normalized_shape):
    """Empty batches (M=0) and empty rows (N=0) behave like F.layer_norm, forward and backward."""
    x = torch.randn(shape, dtype=dtype, device=device, requires_grad=True)
    w = torch.randn(normalized_shape, dtype=dtype, device=device, requires_grad=True)
    b = torch.randn(normalized_shape, dtype=dtype, device=device, requires_grad=True)
    y = ln_ext.layer_norm(x, normalized_shape, w, b)
    want = F.layer_norm(x, normalized_shape, w, b)
    assert y.shape == want.shape and y.dtype == want.dtype
    _, mean, rstd = torch.ops.ln_ext.layer_norm_fwd(x, list(normalized_shape), w, b, 1e-5)
    assert mean.shape == x.shape[: x.dim() - len(normalized_shape)]
    dy = torch.randn_like(y)
    grads = torch.autograd.grad(y, (x, w, b), dy)
    want_grads = torch.autograd.grad(want, (x, w, b), dy)
    for g, wg, name in zip(grads, want_grads, ("dx", "dweight", "dbias")):
        assert g.shape == wg.shape and g.dtype == wg.dtype, name
        torch.testing.assert_close(g, wg, msg=name)  # zeros for the parameters when M=0


@pytest.mark.parametrize("device", DEVICES)
def test_output_mask_and_missing_params(device):
    """layer_norm_bwd returns empty [0] tensors for outputs not asked for or without a
    parameter, and the asked-for ones are unchanged by what else is asked."""
    s = make_sample("mask", (9, 33), device=device)
    _, mean, rstd = torch.ops.ln_ext.layer_norm_fwd(*s.op_args())
    bwd = torch.ops.ln_ext.layer_norm_bwd
    full = bwd(s.dy, s.x, mean, rstd, s.weight, s.bias, [True, True, True])
    for mask in ([True, False, False], [False, True, False], [False, False, True], [False, True, True]):
        got = bwd(s.dy, s.x, mean, rstd, s.weight, s.bias, mask)
        for asked, g, f in zip(mask, got, full):
            if asked:
                assert torch.equal(g, f)
            else:
                assert g.shape == (0,)
    dx, dw, db = bwd(s.dy, s.x, mean, rstd, None, None, [True, True, True])
    assert dw.shape == (0,) and db.shape == (0,) and dx.shape == s.x.shape


def check_many_rows_in_chunks(M, N, device, chunk):
    """bfloat16 [M, N] with float32 weight/bias, too big for a float64 copy: filled and
    checked chunk by chunk; y and dx on rows at the start, middle and end, dweight and
    dbias over all rows against float64 sums."""
    x = torch.empty(M, N, dtype=torch.bfloat16, device=device)
    dy = torch.empty_like(x)
    for start in range(0, M, chunk):  # a float32 temporary of the whole would not fit
        stop = min(M, start + chunk)
        x[start:stop] = (torch.randn(stop - start, N, device=device) * 2 + 1).to(torch.bfloat16)
        dy[start:stop] = torch.randn(stop - start, N, device=device).to(torch.bfloat16)
    w = torch.randn(N, device=device) * 0.5 + 1
    b = torch.randn(N, device=device)
    y, mean, rstd = torch.ops.ln_ext.layer_norm_fwd(x, [N], w, b, 1e-5, None)
    dx, dw, db = torch.ops.ln_ext.layer_norm_bwd(dy, x, mean, rstd, w, b, [True, True, True])
    fwd_tol, bwd_tol = TOLERANCES[torch.bfloat16]
    for rows in (slice(0, 4), slice(M // 2, M // 2 + 4), slice(M - 8, M)):
        s = Sample("rows", x[rows], (N,), w, b, 1e-5, dy[rows])
        want = reference(s)
        assert_close_scaled(y[rows], want.y, fwd_tol, what=f"y[{rows}]")
        assert_close_scaled(dx[rows], want.dx, bwd_tol, scale=want.dx_term, what=f"dx[{rows}]")
    want_dw = torch.zeros(N, dtype=torch.float64, device=device)
    want_db = torch.zeros(N, dtype=torch.float64, device=device)
    dw_term = db_term = 0.0
    for start in range(0, M, chunk):
        xc, dyc = x[start : start + chunk].double(), dy[start : start + chunk].double()
        xhat = (xc - xc.mean(-1, keepdim=True)) * torch.rsqrt(xc.var(-1, unbiased=False, keepdim=True) + 1e-5)
        want_dw += (dyc * xhat).sum(0)
        want_db += dyc.sum(0)
        dw_term = max(dw_term, float((dyc * xhat).abs().max()))
        db_term = max(db_term, float(dyc.abs().max()))
    assert_close_scaled(dw, want_dw, bwd_tol, scale=math.sqrt(M) * dw_term, what="dweight")
    assert_close_scaled(db, want_db, bwd_tol, scale=math.sqrt(M) * db_term, what="dbias")


def test_many_rows_in_chunks_cpu():
    """The chunked check of test_int64_offsets, at a size the CPU runs in a second."""
    check_many_rows_in_chunks(M=3001, N=1024, device="cpu", chunk=1000)


@pytest.mark.parametrize("device", CUDA_ONLY)
def test_int64_offsets(device):
    """M*N > 2^31 elements: rows past the 32-bit offset limit are normalized correctly,
    forward and backward (a 32-bit index would wrap around into the first rows)."""
    N = 1024
    M = (1 << 31) // N + 3
    need = 4 * M * N * 2 + (3 << 30)  # x, y, dy, dx in bfloat16 and float64 chunks
    torch.cuda.empty_cache()
    free, _ = torch.cuda.mem_get_info()
    if free < need:
        pytest.skip(f"needs {need / 2**30:.1f} GiB of free GPU memory, {free / 2**30:.1f} GiB free")
    check_many_rows_in_chunks(M, N, device, chunk=1 << 16)


@pytest.mark.parametrize("device", CUDA_ONLY)
def test_cuda_side_stream_and_second_device(device):
    """The ops run on the current stream (results right after that stream syncs) and
    on a tensor of cuda:1 when there is one (device guard)."""
    s = make_sample("stream", (333, 1025), dtype=torch.bfloat16, device=device)
    want = ln_ext.layer_norm(*s.args())
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):  # queue work so that a launch on the wrong stream would race
            got = ln_ext.layer_norm(*s.args())
    side.synchronize()
    assert torch.equal(got, want)
    if torch.cuda.device_count() < 2:
        return
    s1 = make_sample("dev1", (37, 4097), device="cuda:1")
    got1 = ln_ext.layer_norm(*s1.with_grad().args())
    assert got1.device == torch.device("cuda:1")
    check_against_reference(s1)

def _launches(shapes):
    """The kernel launches ln_ext logs (LN_EXT_LOG_LAUNCHES=1) for a fwd+bwd of each
    ((M, N), dtype name) in a fresh process."""
    cases = ", ".join(f"(({m}, {n}), torch.{dtype})" for (m, n), dtype in shapes)
    script = (
        "import torch, ln_ext\n"
        f"for shape, dtype in [{cases}]:\n"
        "    x, w, b = (torch.randn(s, device='cuda', dtype=dtype, requires_grad=True)\n"
        "               for s in (shape, shape[-1:], shape[-1:]))\n"
        "    ln_ext.layer_norm(x, shape[-1:], w, b).backward(torch.randn_like(x))\n"
        "torch.cuda.synchronize()\n"
    )
    env = {**os.environ, "LN_EXT_LOG_LAUNCHES": "1"}
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-c", script], cwd=repo, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return "\n".join(line for line in proc.stderr.splitlines() if line.startswith("ln_ext launch:"))


@pytest.mark.parametrize("device", CUDA_ONLY)
def test_cuda_kernel_by_shape(device):
    """Long rows take the kernels meant for them, so the reference tests above run them: many
    rows that fit one block's shared memory the long kernels (dweight/dbias fused); rows
    longer than that, or too few rows for the GPU, a thread-block cluster per row on sm_90
    (the long kernels elsewhere)."""
    log = _launches([((300, 12000), "float32"), ((2, 262144), "bfloat16")])
    assert "fwd long rows=300 N=12000" in log and "bwd long +dweight/dbias rows=300 N=12000" in log, log
    if torch.cuda.get_device_capability() >= (9, 0):
        assert "fwd cluster rows=2 N=262144" in log, log
        # 16-block clusters with dweight/dbias sums, or (not schedulable here) 8 without them.
        assert "bwd cluster +dweight/dbias rows=2 N=262144" in log or "bwd cluster rows=2 N=262144" in log, log
    else:
        assert "fwd long rows=2 N=262144" in log and "bwd long rows=2 N=262144" in log, log


def test_outputs_larger_than_a_cache_match_reference():
    """y and dx from 16 MiB on are stored around the caches (non-temporal stores in the AVX2
    and AVX-512 builds): the same values, for rows that start 64-byte aligned (N = 4096) and
    rows that start anywhere (N = 4099: some rows stream, some do not)."""
    torch.manual_seed(0)
    for n in (4096, 4099):
        m = (16 << 20) // (4 * n) + 3
        x = (torch.randn(m, n) * 2 + 0.5).requires_grad_()
        w, b = torch.randn(n) * 0.5 + 1, torch.randn(n)
        dy = torch.randn(m, n)
        y = ln_ext.layer_norm(x, (n,), w, b, 1e-5)
        (dx,) = torch.autograd.grad(y, x, dy)
        x64 = x.detach().double().requires_grad_()
        want = F.layer_norm(x64, (n,), w.double(), b.double(), 1e-5)
        (want_dx,) = torch.autograd.grad(want, x64, dy.double())
        torch.testing.assert_close(y.double(), want.detach(), atol=2e-5, rtol=2e-5)
        torch.testing.assert_close(dx.double(), want_dx, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_16bit_outputs_larger_than_a_cache_match_a_cached_call(dtype):
    """A 16-bit y from 16 MiB on goes around the caches too (narrowed, then streamed; a
    16-bit dx stays cached): every row of y and dx the same bits as a call small enough to
    store as usual, and close to float64,
    for aligned rows (N = 4096) and rows that start anywhere (N = 4099)."""
    torch.manual_seed(0)
    for n in (4096, 4099):
        m = (16 << 20) // (2 * n) + 3
        x = (torch.randn(m, n) * 2 + 0.5).to(dtype).requires_grad_()
        w, b = (torch.randn(n) * 0.5 + 1).to(dtype), torch.randn(n).to(dtype)
        dy = torch.randn(m, n).to(dtype)
        y = ln_ext.layer_norm(x, (n,), w, b, 1e-5)
        (dx,) = torch.autograd.grad(y, x, dy)
        few = 37  # rows of a cached call: 37 * n * 2 bytes, far below 16 MiB
        x_few = x.detach()[-few:].clone().requires_grad_()
        y_few = ln_ext.layer_norm(x_few, (n,), w, b, 1e-5)
        (dx_few,) = torch.autograd.grad(y_few, x_few, dy[-few:])
        assert torch.equal(y[-few:], y_few) and torch.equal(dx[-few:], dx_few)
        x64 = x.detach()[:few].double().requires_grad_()
        want = F.layer_norm(x64, (n,), w.double(), b.double(), 1e-5)
        (want_dx,) = torch.autograd.grad(want, x64, dy[:few].double())
        tol = 1e-2 if dtype == torch.bfloat16 else 2e-3
        torch.testing.assert_close(y[:few].double(), want.detach(), atol=tol, rtol=tol)
        torch.testing.assert_close(dx[:few].double(), want_dx, atol=tol * 4, rtol=tol)


@pytest.mark.parametrize("isa", ["generic", "avx2"])
def test_capped_cpu_build_matches_reference(isa):
    """The reference comparison again with the CPU row kernels capped at `isa`: the generic
    build, and on an AVX-512 CPU the AVX2 one (which the CPU would not pick)."""
    run_with_cpu_isa_cap(["test_layer_norm.py::test_matches_float64_reference",
                          "test_layer_norm.py::test_non_finite_row_stays_in_its_row",
                          "test_layer_norm.py::test_outputs_larger_than_a_cache_match_reference",
                          "test_layer_norm.py::test_16bit_outputs_larger_than_a_cache_match_a_cached_call",
                          "test_layer_norm_autograd.py::test_gradients_independent_of_thread_count"], isa=isa)
