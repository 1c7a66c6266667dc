#!/usr/bin/env python
"""Small LayerNorm (RMSNorm, add + norm and LN-RNN) cases that reach every kernel regime, for
compute-sanitizer.

Each case runs the forward and backward ops once and compares y, mean, rstd, dx, dweight and
dbias with a float64 reference. Inputs and references are made on the CPU and copied over,
so that under the sanitizer nearly all device kernels are ln_ext's: fast to instrument, and
every report is about our code. Exit status 0 when every output matched, 1 otherwise (the
sanitizer's own findings set its exit status through --error-exitcode).

    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck python3 scripts/sanitizer_cases.py
    python scripts/sanitizer_cases.py --device cpu      # the same cases through the CPU kernels
"""
from __future__ import annotations

import argparse
import copy
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import common  # noqa: E402  (also puts the repository root on sys.path)
import torch  # noqa: E402
from common import DTYPES, TOLERANCE  # noqa: E402

EPS = 1e-5


@dataclass
class Case:
    label: str
    batch: tuple        # leading dims of x
    normalized: tuple   # normalized_shape
    dtype: str          # key of common.DTYPES
    affine: str = "wb"  # "wb": weight and bias, "w": weight only, "none"
    strided: bool = False  # x a non-contiguous view (every other column of a wider tensor)


CASES = [
    Case("N=1", (3,), (1,), "fp32"),
    Case("N=3", (5,), (3,), "fp16"),
    Case("N=33, rows per warp", (37,), (33,), "bf16"),
    Case("N=64, many short rows", (1000,), (64,), "bf16"),
    Case("N=127, 3-D input", (2, 9), (127,), "fp32"),
    Case("N=256 mixed", (300,), (256,), "mixed"),
    Case("N=1000", (3,), (1000,), "bf16"),
    Case("N=1023", (7,), (1023,), "fp32"),
    Case("N=1024 weight only", (4,), (1024,), "fp16", affine="w"),
    Case("N=777 no affine", (5,), (777,), "fp32", affine="none"),
    Case("N=4096, M=1", (1,), (4096,), "bf16"),
    Case("N=4097 odd", (3,), (4097,), "bf16"),
    Case("N=5127 odd", (3,), (5127,), "fp16"),
    Case("N=8192, M=65", (65,), (8192,), "fp32"),
    Case("N=12289 odd mixed", (2,), (12289,), "mixed"),
    # M > SMs / 2: one block per row (the long kernels); fewer rows spread over clusters.
    Case("N=16384, M=67: long bwd, dweight/dbias sums and row cache in smem", (67,), (16384,), "bf16"),
    Case("N=20000, M=67: long bwd, dweight/dbias sums in smem, no row cache", (67,), (20000,), "fp32"),
    Case("N=16385, M=3: cluster of 8 per row (few rows), odd N", (3,), (16385,), "bf16"),
    Case("N=65536, M=3: cluster of 8, dweight/dbias sums per block", (3,), (65536,), "bf16"),
    Case("N=100000, M=1: cluster, fp32 no bias", (1,), (100000,), "fp32", affine="w"),
    Case("N=262144, M=2: cluster fwd 8 / bwd 16 blocks (non-portable) with sums", (2,), (262144,), "bf16"),
    Case("N=262147, M=67: fwd cluster of 4, bwd 16 or 8 + param_cols, odd N mixed", (67,), (262147,), "mixed"),
    Case("N=128, M=4097: dweight/dbias partials", (4097,), (128,), "fp32"),
    Case("fp64", (17,), (1000,), "fp64"),
    Case("normalized_shape (4, 96)", (5,), (4, 96), "fp32"),
    Case("non-contiguous x", (9,), (512,), "fp16", strided=True),
    Case("M=0", (0,), (1024,), "bf16"),
]


def make_case(case: Case, device: torch.device):
    """CPU float64 inputs rounded to the case's dtypes, and the same tensors on `device`."""
    x_dtype, p_dtype = DTYPES[case.dtype]
    g = torch.Generator().manual_seed(zlib.crc32(case.label.encode()))  # same data every run
    shape = case.batch + case.normalized
    wide = (torch.randn(*shape[:-1], 2 * shape[-1], generator=g) * 1.5 + 0.3).to(x_dtype)
    dy = torch.randn(shape, generator=g).to(x_dtype)
    weight = (1 + 0.5 * torch.randn(case.normalized, generator=g)).to(p_dtype) if case.affine in ("wb", "w") else None
    bias = (0.1 * torch.randn(case.normalized, generator=g)).to(p_dtype) if case.affine == "wb" else None
    wide_dev = wide.to(device)
    # A strided x is a view on the device (slicing launches no kernel).
    x_dev = wide_dev[..., ::2] if case.strided else wide_dev[..., : shape[-1]].contiguous()
    x = wide[..., ::2] if case.strided else wide[..., : shape[-1]]
    to_dev = lambda t: None if t is None else t.to(device)  # noqa: E731
    return (x, dy, weight, bias), (x_dev, to_dev(dy), to_dev(weight), to_dev(bias))


def reference(x, dy, weight, bias, normalized):
    from ln_ext import reference as ref

    d = lambda t: None if t is None else t.double()  # noqa: E731
    x64, dy64 = x.double(), dy.double()
    dims = tuple(range(x.dim() - len(normalized), x.dim()))
    mean = x64.mean(dim=dims)
    var = (x64 - mean.reshape(mean.shape + (1,) * len(dims))).square().mean(dim=dims)
    rstd = torch.rsqrt(var + EPS)
    y = ref.layer_norm(x64, normalized, d(weight), d(bias), EPS)
    dx, dw, db = ref.layer_norm_grads(dy64, x64, len(normalized), d(weight), EPS)
    return {"y": y, "mean": mean, "rstd": rstd, "dx": dx, "dweight": dw, "dbias": db}


def run_layer_norm_case(case: Case, device: torch.device) -> dict[str, float]:
    """Error ratios (<= 1 passes) of every output of the forward and backward ops."""
    (x, dy, weight, bias), (xd, dyd, wd, bd) = make_case(case, device)
    ref = reference(x, dy, weight, bias, case.normalized)
    ns = list(case.normalized)
    y, mean, rstd = torch.ops.ln_ext.layer_norm_fwd(xd, ns, wd, bd, EPS)
    mask = [True, wd is not None, bd is not None]
    dx, dw, db = torch.ops.ln_ext.layer_norm_bwd(dyd, xd, mean, rstd, wd, bd, mask)
    if device.type == "cuda":
        torch.cuda.synchronize()  # a kernel fault surfaces here, attributed to this case
    fwd_tol, bwd_tol = TOLERANCE[x.dtype]
    stats_tol = TOLERANCE[mean.dtype][0]
    ratios = {
        "y": common.error_ratio(y.cpu(), ref["y"], fwd_tol),
        "mean": common.error_ratio(mean.cpu(), ref["mean"], stats_tol),
        "rstd": common.error_ratio(rstd.cpu(), ref["rstd"], stats_tol),
        "dx": common.error_ratio(dx.cpu(), ref["dx"], bwd_tol),
    }
    if wd is not None:
        ratios["dweight"] = common.error_ratio(dw.cpu(), ref["dweight"], bwd_tol)
    if bd is not None:
        ratios["dbias"] = common.error_ratio(db.cpu(), ref["dbias"], bwd_tol)
    if y.dtype != x.dtype:
        ratios["y dtype"] = float("inf")
    return ratios


def run_public_path(device: torch.device) -> dict[str, float]:
    """ln_ext.LayerNorm forward + autograd backward once (the path users call)."""
    import ln_ext

    case = Case("module", (6,), (4097,), "bf16")
    (x, dy, weight, bias), (xd, dyd, wd, bd) = make_case(case, device)
    module = ln_ext.LayerNorm(4097, device=device, dtype=wd.dtype)
    with torch.no_grad():
        module.weight.copy_(wd)
        module.bias.copy_(bd)
    xd = xd.detach().requires_grad_()
    y = module(xd)
    dx, dw, db = torch.autograd.grad(y, [xd, module.weight, module.bias], dyd)
    ref = reference(x, dy, weight, bias, case.normalized)
    fwd_tol, bwd_tol = TOLERANCE[x.dtype]
    return {"y": common.error_ratio(y.cpu(), ref["y"], fwd_tol), "dx": common.error_ratio(dx.cpu(), ref["dx"], bwd_tol),
            "dweight": common.error_ratio(dw.cpu(), ref["dweight"], bwd_tol),
            "dbias": common.error_ratio(db.cpu(), ref["dbias"], bwd_tol)}


# The rest of the norm family on shapes that reach each kernel regime: RMSNorm (not
# centered) and add + norm (h in x's dtype, and a float32 stream beside bf16 x), with a
# gradient of h added in the backward. (op, x dtype, residual dtype or None, N, M)
FAMILY_CASES = [
    ("rms_norm", "bf16", None, 33, 37), ("rms_norm", "fp32", None, 4097, 3), ("rms_norm", "bf16", None, 16385, 3),
    ("rms_norm", "bf16", None, 262144, 2),
    ("add_layer_norm", "bf16", "fp32", 1000, 5), ("add_layer_norm", "fp16", None, 12289, 2),
    ("add_layer_norm", "bf16", "fp32", 65536, 3),
    ("add_rms_norm", "bf16", "fp32", 4097, 7), ("add_rms_norm", "fp32", None, 131072, 2),
]


def run_family_case(op: str, dtype: str, residual_dtype: Optional[str], n: int, m: int, device) -> dict[str, float]:
    """The public function's outputs and gradients (x, residual, weight, bias) on `device`
    against the same function in float64 on the CPU."""
    import ln_ext

    x_dtype = DTYPES[dtype][0]
    r_dtype = DTYPES[residual_dtype][0] if residual_dtype else x_dtype
    g = torch.Generator().manual_seed(zlib.crc32(f"{op}{dtype}{n}".encode()))
    x = (torch.randn(m, n, generator=g) * 1.5 + 0.3).to(x_dtype)
    r = torch.randn(m, n, generator=g).to(r_dtype)
    w = (1 + 0.5 * torch.randn(n, generator=g)).to(x_dtype)
    b = (0.1 * torch.randn(n, generator=g)).to(x_dtype)
    dy, dh = torch.randn(m, n, generator=g).to(x_dtype), torch.randn(m, n, generator=g).to(r_dtype)

    def run(xx, rr, ww, bb, to):
        leaves = [t.to(to).detach().requires_grad_() for t in (xx, rr, ww, bb)]
        lx, lr, lw, lb = leaves
        if op == "rms_norm":
            outs, grads_in, used = [ln_ext.rms_norm(lx, n, lw, EPS)], [dy], [lx, lw]
        elif op == "add_layer_norm":
            outs, grads_in, used = list(ln_ext.add_layer_norm(lx, lr, n, lw, lb, EPS)), [dy, dh], leaves
        else:
            outs, grads_in, used = list(ln_ext.add_rms_norm(lx, lr, n, lw, EPS)), [dy, dh], [lx, lr, lw]
        grads = torch.autograd.grad(outs, used, [t.to(device=o.device, dtype=o.dtype) for t, o in zip(grads_in, outs)])
        return [t.detach().cpu() for t in outs + list(grads)]

    got = run(x, r, w, b, device)
    want = run(x.double(), r.double(), w.double(), b.double(), "cpu")
    if device.type == "cuda":
        torch.cuda.synchronize()
    fwd_tol, bwd_tol = TOLERANCE[x_dtype]
    n_out = 1 if op == "rms_norm" else 2
    return {f"{'out' if i < n_out else 'grad'}{i}": common.error_ratio(a, e, fwd_tol if i < n_out else bwd_tol)
            for i, (a, e) in enumerate(zip(got, want))}


def rnn_cases(device: torch.device):
    """(label, thunk) for the LN-RNN layers this ln_ext has: the layer on `device` against a
    float64 CPU copy of itself (output, final state, input gradient)."""
    import ln_ext

    layouts = [dict(input_size=7, hidden_size=33), dict(input_size=16, hidden_size=64, num_layers=2,
                                                         bidirectional=True, batch_first=True)]
    for name in ("LayerNormLSTM", "LayerNormGRU", "LayerNormRNN"):
        cls = getattr(ln_ext, name, None)
        if cls is None:
            continue
        for dtype in ("fp32", "bf16"):
            for kwargs in layouts:
                label = f"{name} {dtype} " + ",".join(f"{k}={v}" for k, v in kwargs.items())
                yield label, (lambda cls=cls, dtype=dtype, kwargs=kwargs: run_rnn_case(cls, dtype, kwargs, device))


def run_rnn_case(cls, dtype: str, kwargs: dict, device: torch.device) -> dict[str, float]:
    torch.manual_seed(0)
    x_dtype = DTYPES[dtype][0]
    layer = cls(**kwargs, device=device, dtype=x_dtype)
    ref_layer = copy.deepcopy(layer).to(device="cpu", dtype=torch.float64)
    t, b = 5, 3
    shape = (b, t, kwargs["input_size"]) if kwargs.get("batch_first") else (t, b, kwargs["input_size"])
    x = torch.randn(shape).to(x_dtype)

    def run(module, inp):
        inp = inp.detach().requires_grad_()
        out, state = module(inp)
        state = state if isinstance(state, tuple) else (state,)
        (dx,) = torch.autograd.grad(out.float().sum() + sum(s.float().sum() for s in state), [inp])
        return out, state, dx

    out, state, dx = run(layer, x.to(device))
    ref_out, ref_state, ref_dx = run(ref_layer, x.double())
    # Steps, layers and both directions compound the rounding of every reduced-precision
    # intermediate (bf16 dx of the 2-layer bidirectional LSTM reached 0.9x of 2x on the CPU).
    tol = 4 * TOLERANCE[x_dtype][1]
    ratios = {"output": common.error_ratio(out.cpu(), ref_out, tol), "dx": common.error_ratio(dx.cpu(), ref_dx, tol)}
    for i, (s, r) in enumerate(zip(state, ref_state)):
        ratios[f"state{i}"] = common.error_ratio(s.cpu(), r, tol)
    return ratios


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    p.add_argument("--only", help="run only the cases whose label contains this text")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    import ln_ext

    if device.type == "cuda" and not ln_ext.has_cuda_kernels():
        print("sanitizer_cases: this ln_ext build has no CUDA kernels", file=sys.stderr)
        return 2

    jobs = [(f"{c.label} [{c.dtype}, x {list(c.batch + c.normalized)}]", (lambda c=c: run_layer_norm_case(c, device)))
            for c in CASES]
    jobs.append(("ln_ext.LayerNorm forward + autograd backward [bf16, x [6, 4097]]", lambda: run_public_path(device)))
    jobs += [(f"{op} [{dt}{' + ' + rd + ' stream' if rd else ''}, x [{m}, {n}]]",
              (lambda op=op, dt=dt, rd=rd, n=n, m=m: run_family_case(op, dt, rd, n, m, device)))
             for op, dt, rd, n, m in FAMILY_CASES]
    jobs += list(rnn_cases(device))
    failed = 0
    for label, job in jobs:
        if args.only and args.only not in label:
            continue
        try:
            ratios = job()
        except Exception as exc:  # noqa: BLE001  (report every case, then fail)
            failed += 1
            print(f"FAIL  {label}: {type(exc).__name__}: {exc}".splitlines()[0], flush=True)
            continue
        worst = max(ratios, key=ratios.get)
        ok = ratios[worst] <= 1
        failed += not ok
        detail = "" if ok else "  " + ", ".join(f"{k} {v:.3g}" for k, v in ratios.items())
        print(f"{'ok  ' if ok else 'FAIL'}  {label}: worst {worst} at {ratios[worst]:.3g}× tolerance{detail}", flush=True)
    ran = sum(1 for label, _ in jobs if not args.only or args.only in label)
    print(f"sanitizer_cases on {device.type}: {ran - failed} of {ran} cases match the float64 reference", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
