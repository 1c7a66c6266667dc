"""The one generator of LayerNorm test inputs, and the tolerance table.

Correctness, gradient, opcheck, compile and reproducibility tests all draw their
inputs from `sample_inputs`, so a shape that breaks a kernel is added here once and
every test sees it. Inputs are fresh random values (never zeros or ones) with a
scale and an offset that vary per sample, so the row mean is not ~0 and rows of
very small and very large spread are both exercised.
"""
from __future__ import annotations

import dataclasses
import math
import os
import subprocess
import sys
from typing import Iterator, Optional, Sequence

import pytest
import torch

import ln_ext

HAS_CUDA = torch.cuda.is_available() and ln_ext.has_cuda_kernels()
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU and ln_ext built with its CUDA kernels")
# Parametrize a test body over these so that the same body checks the CPU and CUDA kernels.
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, requires_cuda])]
CUDA_ONLY = [pytest.param("cuda", marks=[pytest.mark.cuda, requires_cuda])]

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
REDUCED = (torch.float16, torch.bfloat16)


@dataclasses.dataclass
class Tol:
    atol: float  # times a scale: the largest |reference| element or term (see assert_close_scaled)
    rtol: float


# Per input dtype: (forward y, backward dx/dweight/dbias). Every kernel accumulates in
# float32 (float64 for double) and rounds once at the end, so an error is the final
# rounding (rtol: just above half an ulp, which is at most 2^-11 of the value for
# float16 and 2^-8 for bfloat16, so a kernel that truncates instead fails) plus the
# accumulation error, which is relative to the size of the values the kernel works
# on (atol, times that size). Backward is looser: dx = rstd * (g - mean(g) - xhat *
# mean(g * xhat)) subtracts nearly equal terms after two row reductions, and
# dweight/dbias sum M rows, which is why their atol scale also grows with sqrt(M).
TOLERANCES = {
    torch.float64: (Tol(atol=1e-13, rtol=1e-13), Tol(atol=1e-12, rtol=1e-12)),
    torch.float32: (Tol(atol=1e-5, rtol=1e-5), Tol(atol=5e-5, rtol=5e-5)),
    torch.float16: (Tol(atol=2e-5, rtol=6e-4), Tol(atol=1e-4, rtol=1e-3)),
    torch.bfloat16: (Tol(atol=2e-5, rtol=4.5e-3), Tol(atol=1e-4, rtol=8e-3)),
}
# mean/rstd are float32 (float64) whatever the input: only accumulation error.
STATS_TOLERANCES = {torch.float64: Tol(atol=1e-12, rtol=1e-12)}
STATS_TOL_DEFAULT = Tol(atol=1e-5, rtol=1e-5)


@dataclasses.dataclass
class Sample:
    """One call of layer_norm plus the upstream gradient dy for its backward."""

    name: str
    x: torch.Tensor
    normalized_shape: tuple[int, ...]
    weight: Optional[torch.Tensor]
    bias: Optional[torch.Tensor]
    eps: float
    dy: torch.Tensor

    @property
    def rows(self) -> int:
        return math.prod(self.x.shape[: self.x.dim() - len(self.normalized_shape)])

    def args(self):
        """Positional arguments of ln_ext.layer_norm / F.layer_norm."""
        return (self.x, self.normalized_shape, self.weight, self.bias, self.eps)

    def op_args(self):
        """Positional arguments of torch.ops.ln_ext.layer_norm_fwd."""
        return (self.x, list(self.normalized_shape), self.weight, self.bias, self.eps)

    def with_grad(self) -> "Sample":
        """A copy whose x/weight/bias are leaves that require grad."""

        def leaf(t):
            return None if t is None else t.detach().clone().requires_grad_(True)

        return dataclasses.replace(self, x=leaf(self.x), weight=leaf(self.weight), bias=leaf(self.bias))

    def __repr__(self) -> str:  # shows up as the test id
        return self.name


def randn(shape, dtype, device, scale=1.0, offset=0.0) -> torch.Tensor:
    """Normal values * scale + offset, drawn in float32/64 then rounded to dtype."""
    draw = torch.float64 if dtype == torch.float64 else torch.float32
    return (torch.randn(shape, dtype=draw, device=device) * scale + offset).to(dtype)


# (scale, offset) of x, cycled through the samples: tiny, unit and large spreads, each
# with a mean well away from 0 but within a few std (a larger offset/std ratio makes
# the problem ill-conditioned for every float32 implementation, nn.LayerNorm included).
_X_SCALES = [(1.0, 0.5), (0.02, -0.05), (40.0, 70.0), (3.0, -2.0)]


def make_sample(
    name: str,
    x_shape: Sequence[int],
    normalized_ndim: int = 1,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    *,
    weight: bool = True,
    bias: bool = True,
    param_dtype: Optional[torch.dtype] = None,
    layout: str = "contiguous",
    eps: float = 1e-5,
    variant: int = 0,
) -> Sample:
    """A Sample with x of `x_shape` normalized over its last `normalized_ndim` dims.

    layout: "contiguous"; "transposed" (x is the .t() of a [N, M] tensor, 2-D only);
    "sliced" (x is a column window of a wider tensor); "strided_rows" (every other
    row of a taller tensor); "misaligned" (contiguous but starting one element into
    its storage, so the data pointer is not 16-byte aligned; weight/bias likewise).
    dy has the same layout as x.
    """
    scale, offset = _X_SCALES[variant % len(_X_SCALES)]
    shape = tuple(x_shape)
    x = _laid_out(shape, dtype, device, scale, offset, layout)
    assert x.shape == shape
    norm_shape = shape[len(shape) - normalized_ndim :]
    pdt = param_dtype or dtype

    def param(mean, spread):
        if layout == "misaligned":
            return randn((math.prod(norm_shape) + 1,), pdt, device, spread, mean)[1:].view(norm_shape)
        return randn(norm_shape, pdt, device, spread, mean)

    w = param(1.0, 0.5) if weight else None
    b = param(0.2, 0.5) if bias else None
    dy = _laid_out(shape, dtype, device, 1.0 / (1 + variant % 3), 0.1, layout)  # the same layout as x
    return Sample(name, x, norm_shape, w, b, eps, dy)


def _laid_out(shape, dtype, device, scale, offset, layout) -> torch.Tensor:
    """randn(shape) * scale + offset with the memory layout make_sample describes."""
    if layout == "contiguous":
        return randn(shape, dtype, device, scale, offset)
    if layout == "transposed":
        assert len(shape) == 2
        return randn(shape[::-1], dtype, device, scale, offset).t()
    if layout == "sliced":
        return randn(shape[:-1] + (shape[-1] + 7,), dtype, device, scale, offset)[..., 3 : 3 + shape[-1]]
    if layout == "strided_rows":
        return randn((2 * shape[0],) + shape[1:], dtype, device, scale, offset)[::2]
    if layout == "misaligned":
        return randn((math.prod(shape) + 1,), dtype, device, scale, offset)[1:].view(shape)
    raise ValueError(layout)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# N from DESIGN §6: tiny, around a warp, odd neighbours of powers of two, and long rows.
CORE_SHAPES = [(1, 1), (3, 2), (37, 3), (7, 7), (3, 31), (37, 33), (3, 127), (7, 1000),
               (3, 1023), (5, 1025), (3, 4097), (2, 5127), (2, 65536)]
# Many short rows, and rows longer than any one-block tile: float32 and bfloat16 only.
BIG_SHAPES = [(65537, 3), (65537, 1), (1, 262144 + 5), (3, 131072)]
# CUDA kernel regime boundaries (warp/block/cluster tiles) and their odd neighbours.
CUDA_REGIME_N = [32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072, 262144]


def sample_inputs(device: str = "cpu", dtypes: Sequence[torch.dtype] = DTYPES, small: bool = False) -> Iterator[Sample]:
    """Every input the LayerNorm tests run on.

    small=True: only shapes cheap enough for gradcheck/opcheck/compile (a few
    hundred elements), but still every layout, parameter and dtype combination.
    """
    v = 0

    def nxt():
        nonlocal v
        v += 1
        return v

    for dtype in dtypes:
        dn = _dtype_name(dtype)
        core = [(1, 1), (3, 2), (5, 7), (3, 33)] if small else CORE_SHAPES
        for M, N in core:
            yield make_sample(f"{dn}-[{M},{N}]", (M, N), dtype=dtype, device=device, variant=nxt())
        if not small:
            yield make_sample(f"{dn}-[0,37]", (0, 37), dtype=dtype, device=device)
        if not small and dtype in (torch.float32, torch.bfloat16):
            for M, N in BIG_SHAPES:
                yield make_sample(f"{dn}-[{M},{N}]", (M, N), dtype=dtype, device=device, variant=nxt())
        if not small and device == "cuda":
            for n0 in CUDA_REGIME_N:
                for N in (n0 - 1, n0, n0 + 1):
                    M = max(2, min(37, (1 << 21) // N))
                    yield make_sample(f"{dn}-[{M},{N}]", (M, N), dtype=dtype, device=device, variant=nxt())
        M, N = (3, 5) if small else (37, 1025)
        # weight and bias None, each alone and both.
        for w, b in ((False, True), (True, False), (False, False)):
            yield make_sample(f"{dn}-[{M},{N}]-weight={w}-bias={b}", (M, N), dtype=dtype, device=device,
                              weight=w, bias=b, variant=nxt())
        # Multi-dim normalized_shape, extra leading dims, and normalizing every dim.
        if small:
            multi = [((2, 3, 4), 2), ((2, 3, 5), 1), ((3, 4), 2)]
        else:
            multi = [((3, 5, 6, 7), 2), ((2, 3, 4, 33), 1), ((4, 9), 2), ((2, 3, 4, 5), 3)]
        for shape, k in multi:
            yield make_sample(f"{dn}-{list(shape)}-k={k}", shape, k, dtype=dtype, device=device, variant=nxt())
        # Non-contiguous and misaligned inputs (and parameters).
        layouts = ["transposed", "sliced", "strided_rows", "misaligned"]
        shapes = [(5, 4), (3, 7)] if small else [(37, 127), (7, 1023)]
        for layout in layouts:
            # Even N too: a misaligned start then misaligns every row the same way.
            for M, N in shapes + ([(6, 1024)] if layout == "misaligned" and not small else []):
                yield make_sample(f"{dn}-[{M},{N}]-{layout}", (M, N), dtype=dtype, device=device,
                                  layout=layout, variant=nxt())
        # Mixed precision: reduced-precision x with float32 weight/bias.
        if dtype in REDUCED:
            for M, N in ([(3, 5), (2, 9)] if small else [(37, 1000), (3, 4097), (7, 31)]):
                yield make_sample(f"{dn}-[{M},{N}]-params=float32", (M, N), dtype=dtype, device=device,
                                  param_dtype=torch.float32, variant=nxt())
            yield make_sample(f"{dn}-[3,7]-params=float32-bias=False", (3, 7), dtype=dtype, device=device,
                              param_dtype=torch.float32, bias=False, variant=nxt())
        yield make_sample(f"{dn}-[3,9]-eps=1e-2", (3, 9), dtype=dtype, device=device, eps=1e-2, variant=nxt())


def sample_ids(samples):
    return [s.name for s in samples]


# ---------------------------------------------------------------------------------------
# Reference and comparison


@dataclasses.dataclass
class Reference:
    y: torch.Tensor
    mean: torch.Tensor
    rstd: torch.Tensor
    dx: torch.Tensor
    dweight: Optional[torch.Tensor]
    dbias: Optional[torch.Tensor]
    # Scales the errors are measured against (see assert_close_scaled): the largest
    # term each result is a sum or difference of.
    dx_term: float
    dweight_term: float
    dbias_term: float


def reference(s: Sample) -> Reference:
    """Float64 forward, statistics and gradients of `s` via autograd of reference.layer_norm."""
    from ln_ext import reference as ref

    def leaf(t):
        return None if t is None else t.detach().to(torch.float64).requires_grad_(True)

    x, w, b = leaf(s.x), leaf(s.weight), leaf(s.bias)
    y = ref.layer_norm(x, s.normalized_shape, w, b, s.eps)
    dims = tuple(range(x.dim() - len(s.normalized_shape), x.dim()))
    mean = x.detach().mean(dim=dims)
    centered = x.detach() - mean.view(mean.shape + (1,) * len(dims))
    rstd = torch.rsqrt(centered.square().mean(dim=dims) + s.eps)
    dy = s.dy.to(torch.float64)
    leaves = [t for t in (x, w, b) if t is not None]
    grads = list(torch.autograd.grad(y, leaves, dy, allow_unused=True))
    dx = grads.pop(0)
    dw = grads.pop(0) if w is not None else None
    db = grads.pop(0) if b is not None else None
    if dx is None:  # empty input: autograd gives None for an unused leaf
        dx = torch.zeros_like(x)
    xhat = centered * rstd.view(rstd.shape + (1,) * len(dims))
    g = dy if w is None else dy * w.detach()
    dx_term = float((g.abs() * rstd.view(rstd.shape + (1,) * len(dims))).max()) if dy.numel() else 0.0
    dweight_term = float((dy * xhat).abs().max()) if dy.numel() else 0.0
    dbias_term = float(dy.abs().max()) if dy.numel() else 0.0
    return Reference(y.detach(), mean, rstd, dx, dw, db, dx_term, dweight_term, dbias_term)


def assert_close_scaled(got: torch.Tensor, want: torch.Tensor, tol: Tol, scale: Optional[float] = None, what: str = ""):
    """|got - want| <= tol.atol * scale + tol.rtol * |want| for every element.

    scale defaults to max|want|: rounding errors of a normalization are relative to the
    size of the values it works on, not absolute, and inputs here span 0.02 to 100.
    NaN passes only where want is NaN too.
    """
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    if want.numel() == 0:
        return
    want_finite = torch.isfinite(want)
    got64 = got.detach().to(torch.float64)
    assert torch.equal(torch.isnan(got64), torch.isnan(want)), f"{what}: NaN where the reference has none (or vice versa)"
    if scale is None:
        scale = float(want[want_finite].abs().max()) if want_finite.any() else 1.0
    scale = scale or 1.0
    torch.testing.assert_close(
        got64, want, atol=tol.atol * scale, rtol=tol.rtol, equal_nan=True,
        msg=lambda m: f"{what} (atol={tol.atol}*{scale:.3g}, rtol={tol.rtol}): {m}",
    )


def run_with_cpu_isa_cap(test_ids: Sequence[str], isa: str = "generic") -> None:
    """Run the given tests (paths relative to tests/) in a fresh process with the CPU
    kernels capped at `isa` (LN_EXT_CPU_ISA): "generic", as on a CPU without AVX2 or a
    non-x86 one, or "avx2", as on one without AVX-512. The kernels are built for each
    and the best one for the CPU is picked at run time, so the others run only so."""
    env = dict(os.environ, LN_EXT_CPU_ISA=isa)
    tests = os.path.dirname(os.path.abspath(__file__))
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
           *(f"{tests}/{t}" for t in test_ids)]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-5000:] + run.stderr[-2000:]
    assert " passed" in run.stdout

