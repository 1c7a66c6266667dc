#!/usr/bin/env python
"""RMSNorm and fused add + norm speed: ln_ext against the peers that do the same work, as a
fraction of the card's copy bandwidth.

Ops and peers (each measured only where it is installed; the missing are named):
  rms_norm         ln_ext.rms_norm | nn.RMSNorm | torch.compile(F.rms_norm) | Liger-Kernel | apex
  add_layer_norm   ln_ext.add_layer_norm | x + residual, then nn.LayerNorm | both compiled
  add_rms_norm     ln_ext.add_rms_norm | x + residual, then nn.RMSNorm | both compiled
Forward, backward and both, over N at M*N ~ 2^26 on a GPU (2^21 on the CPU). Every provider's
outputs and gradients are checked once against float64 before it is timed (✗ marks a miss).
Bytes counted are what the op must move: rms_norm forward reads x and writes y, backward reads
x and dy and writes dx; add + norm forward reads x and residual and writes h and y, backward
reads dy, the gradient of h and h and writes one gradient for x and residual (two when their
dtypes differ); plus the parameters. The unfused peers move more: their extra traffic is
what the fused op saves.

Writes <out>/norm_family.json, norm_family.md, norm_family.png.

    python benchmarks/bench_norm_family.py                      # every op and peer this machine has
    python benchmarks/bench_norm_family.py --ops rms_norm --dtypes bf16 --n 4096,5127
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import common  # first: puts the repository root on sys.path
import torch
import torch.nn.functional as F
from common import DTYPES, TOLERANCE
from torch import nn

EPS = 1e-5
OPS = ("rms_norm", "add_layer_norm", "add_rms_norm")
MODES = ("fwd", "bwd", "fwd_bwd")
MODE_TITLES = {"fwd": "forward", "bwd": "backward", "fwd_bwd": "forward + backward"}
GPU_DEFAULTS = dict(dtypes=["bf16", "mixed"], n=[1024, 2048, 4096, 5127, 8192, 16384, 65536], elements=2**26)
CPU_DEFAULTS = dict(dtypes=["fp32", "bf16"], n=[1024, 4096, 5127], elements=2**21)


class Unsupported(Exception):
    pass


# A provider's setup(op, weight, bias) returns (fn(x, residual) -> list of outputs, params);
# every provider computes the same function from copies of `weight` and `bias`.
def _params(weight, bias, op):
    w = weight.detach().clone().requires_grad_()
    b = bias.detach().clone().requires_grad_() if op == "add_layer_norm" else None
    return w, b


def setup_ln_ext(op, weight, bias):
    import ln_ext

    if weight.is_cuda and not ln_ext.has_cuda_kernels():
        raise Unsupported("this ln_ext build has no CUDA kernels")
    w, b = _params(weight, bias, op)
    n = weight.numel()
    fns = {
        "rms_norm": lambda x, r: [ln_ext.rms_norm(x, n, w, EPS)],
        "add_layer_norm": lambda x, r: list(ln_ext.add_layer_norm(x, r, n, w, b, EPS)),
        "add_rms_norm": lambda x, r: list(ln_ext.add_rms_norm(x, r, n, w, EPS)),
    }
    return fns[op], [p for p in (w, b) if p is not None]


def _eager_reference_fn(op, w, b):
    n = w.numel()

    def fn(x, r):
        if op == "rms_norm":
            return [F.rms_norm(x, (n,), w, EPS)]
        h = x.to(r.dtype) + r  # the residual stream's dtype, as add + norm keeps it
        y = F.layer_norm(h, (n,), w, b, EPS) if op == "add_layer_norm" else F.rms_norm(h, (n,), w, EPS)
        return [y.to(x.dtype), h]

    return fn


def setup_torch(op, weight, bias):
    w, b = _params(weight, bias, op)
    return _eager_reference_fn(op, w, b), [p for p in (w, b) if p is not None]


_compiled = {}


def setup_compile(op, weight, bias):
    w, b = _params(weight, bias, op)
    if op not in _compiled:
        config = torch._dynamo.config
        for name, value in (("cache_size_limit", 4096), ("accumulated_cache_size_limit", 4096)):
            if hasattr(config, name):
                setattr(config, name, value)
        torch._functorch.config.donated_buffer = False  # the backward replays one graph
        _compiled[op] = torch.compile(lambda x, r, w, b: _eager_reference_fn(op, w, b)(x, r), dynamic=False)
    fn = _compiled[op]
    return (lambda x, r: fn(x, r, w, b)), [p for p in (w, b) if p is not None]


def setup_liger(op, weight, bias):
    if op != "rms_norm":
        raise Unsupported("Liger-Kernel has no fused add + norm of this form")
    from liger_kernel.ops.rms_norm import LigerRMSNormFunction

    w, _ = _params(weight, bias, op)
    return (lambda x, r: [LigerRMSNormFunction.apply(x, w, EPS)]), [w]


def setup_apex(op, weight, bias):
    if op != "rms_norm":
        raise Unsupported("apex has no fused add + norm of this form")
    from apex.normalization import FusedRMSNorm

    m = FusedRMSNorm(weight.numel(), eps=EPS).to(device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        m.weight.copy_(weight)
    return (lambda x, r: [m(x)]), [m.weight]


@dataclass
class Provider:
    name: str
    label: str
    setup: Callable
    module: Optional[str]
    gpu_only: bool = False


PROVIDERS = [
    Provider("ln_ext", "ln_ext", setup_ln_ext, "ln_ext"),
    Provider("torch", "torch (eager)", setup_torch, None),
    Provider("compile", "torch.compile", setup_compile, None),
    Provider("liger", "Liger-Kernel", setup_liger, "liger_kernel.ops.rms_norm", gpu_only=True),
    Provider("apex", "apex", setup_apex, "apex.normalization", gpu_only=True),
]
BY_NAME = {p.name: p for p in PROVIDERS}


def why_missing(provider: Provider, device) -> Optional[str]:
    if provider.gpu_only and device.type != "cuda":
        return "needs a CUDA GPU"
    if provider.module:
        try:
            __import__(provider.module)
        except Exception as exc:  # noqa: BLE001
            return f"{type(exc).__name__}: {exc}".splitlines()[0]
    return None


@dataclass
class Case:
    op: str
    dtype: str
    m: int
    n: int

    @property
    def x_dtype(self):
        return DTYPES[self.dtype][0]

    @property
    def p_dtype(self):
        return DTYPES[self.dtype][1]

    @property
    def r_dtype(self):
        """The residual stream: float32 beside a 16-bit x in the mixed case, else x's."""
        return torch.float32 if self.dtype == "mixed" else self.x_dtype

    def bytes_moved(self, mode: str) -> int:
        mn, xs, rs, ps = self.m * self.n, self.x_dtype.itemsize, self.r_dtype.itemsize, self.p_dtype.itemsize
        n_params = 2 if self.op == "add_layer_norm" else 1
        if self.op == "rms_norm":
            fwd, bwd = 2 * mn * xs, 3 * mn * xs
        else:  # read x, residual; write h, y | read dy, dh, h; write dx (and dresidual if its dtype differs)
            fwd = mn * (2 * xs + 2 * rs)
            bwd = mn * (xs + 2 * rs + xs + (rs if rs != xs else 0))
        fwd += n_params * self.n * ps
        bwd += 2 * n_params * self.n * ps
        return {"fwd": fwd, "bwd": bwd, "fwd_bwd": fwd + bwd}[mode]


def make_inputs(case: Case, device):
    g = torch.Generator(device=device).manual_seed(0)
    x = (torch.randn(case.m, case.n, generator=g, device=device) * 1.5 + 0.3).to(case.x_dtype).requires_grad_()
    r = torch.randn(case.m, case.n, generator=g, device=device).to(case.r_dtype).requires_grad_()
    weight = (1 + 0.5 * torch.randn(case.n, generator=g, device=device)).to(case.p_dtype)
    bias = (0.1 * torch.randn(case.n, generator=g, device=device)).to(case.p_dtype)
    grads = [torch.randn(case.m, case.n, generator=g, device=device).to(case.x_dtype)]
    if case.op != "rms_norm":
        grads.append(torch.randn(case.m, case.n, generator=g, device=device).to(case.r_dtype))
    return x, r, weight, bias, grads


def check(case, fn, params, x, r, grads, weight, bias) -> dict:
    """Outputs and gradients against the float64 composite on the same inputs."""
    fwd_tol, bwd_tol = TOLERANCE[case.x_dtype]
    leaves = [x] + ([r] if case.op != "rms_norm" else []) + params
    outs = fn(x, r)
    got = torch.autograd.grad(outs, leaves, grads[: len(outs)])
    w64, b64 = weight.double().requires_grad_(), bias.double().requires_grad_()
    x64, r64 = x.detach().double().requires_grad_(), r.detach().double().requires_grad_()
    ref_fn = _eager_reference_fn(case.op, w64, b64 if case.op == "add_layer_norm" else None)
    ref_outs = ref_fn(x64, r64)
    ref_leaves = [x64] + ([r64] if case.op != "rms_norm" else []) + ([w64, b64] if case.op == "add_layer_norm" else [w64])
    ref_grads = torch.autograd.grad(ref_outs, ref_leaves, [g.double() for g in grads[: len(ref_outs)]])
    ratios = {f"out{i}": common.error_ratio(o, ro, fwd_tol) for i, (o, ro) in enumerate(zip(outs, ref_outs))}
    ratios.update({f"grad{i}": common.error_ratio(gr, rg, bwd_tol) for i, (gr, rg) in enumerate(zip(got, ref_grads))})
    return {"ok": all(v <= 1 for v in ratios.values()), "error_ratio": ratios}


def run_case(case: Case, providers, device, args, bar) -> list[dict]:
    x, r, weight, bias, grads = make_inputs(case, device)
    records = []
    for provider in providers:
        base = dict(op=case.op, dtype=case.dtype, M=case.m, N=case.n, provider=provider.name)
        bar.set_postfix_str(f"{case.op} {case.dtype} N={case.n} {provider.name}")
        try:
            fn, params = provider.setup(case.op, weight, bias)
            verdict = check(case, fn, params, x, r, grads, weight, bias)
        except Exception as exc:  # noqa: BLE001
            records.append(dict(base, mode="all", error=f"{type(exc).__name__}: {exc}".splitlines()[0][:300]))
            bar.update(len(MODES))
            continue
        leaves = [x] + ([r] if case.op != "rms_norm" else []) + params
        outs = fn(x, r)
        timed = {
            "fwd": lambda: fn(x, r),
            "bwd": lambda: torch.autograd.grad(outs, leaves, grads[: len(outs)], retain_graph=True),
            "fwd_bwd": lambda: torch.autograd.grad(fn(x, r), leaves, grads[: len(outs)]),
        }
        for mode, call in timed.items():
            ms = common.time_ms(call, device, rep_ms=args.rep_ms, warmup_ms=args.warmup_ms)
            nbytes = case.bytes_moved(mode)
            records.append(dict(base, mode=mode, ms=ms, bytes=nbytes, gbps=common.gbps(nbytes, ms),
                                correct=verdict["ok"], check=verdict))
            bar.update()
        del outs
    return records


def per_call_records(ops: list[str], dtypes: list[str], providers, device) -> list[dict]:
    """Host time per call at common.PER_CALL_SHAPES: forward without grad, forward + backward."""
    records = []
    for op in ops:
        for dtype in dtypes:
            for m, n in common.PER_CALL_SHAPES:
                x, r, weight, bias, grads = make_inputs(Case(op, dtype, m, n), device)
                calls = []
                for provider in providers:
                    base = dict(kind="per_call", op=op, dtype=dtype, M=m, N=n, provider=provider.name)
                    try:
                        fn, params = provider.setup(op, weight, bias)
                        verdict = check(Case(op, dtype, m, n), fn, params, x, r, grads, weight, bias)
                        outs = fn(x, r)
                    except Exception as exc:  # noqa: BLE001
                        records.append(dict(base, mode="all", error=f"{type(exc).__name__}: {exc}".splitlines()[0][:300]))
                        continue
                    base.update(correct=verdict["ok"], check=verdict)
                    leaves = [x] + ([r] if op != "rms_norm" else []) + params
                    g = grads[: len(outs)]
                    calls.append((dict(base, mode="no_grad"), common.no_grad_call(fn, x, r)))
                    calls.append((dict(base, mode="fwd_bwd"),
                                  lambda fn=fn, leaves=leaves, g=g: torch.autograd.grad(fn(x, r), leaves, g)))
                records += common.timed_per_call(calls, device)
    return records


def summary(payload: dict, records: list[dict]) -> list[str]:
    """ln_ext's speed over torch eager's (add, then norm) per op and N, per dtype and pass."""
    def find(op, dtype, n, provider, mode):
        return next((r for r in records if r["op"] == op and r["dtype"] == dtype and r["N"] == n
                     and r["provider"] == provider and r["mode"] == mode and "ms" in r), None)

    columns = [(d, mode) for d in payload["config"]["dtypes"] for mode in MODES]
    rows = []
    for op in payload["config"]["ops"]:
        for n in sorted({r["N"] for r in records if r["op"] == op}):
            row = [op, n]
            for dtype, mode in columns:
                ours, peer = find(op, dtype, n, "ln_ext", mode), find(op, dtype, n, "torch", mode)
                row.append(common.fmt_ratio(peer["ms"] / ours["ms"]) if ours and peer else "—")
            rows.append(row)
    if not rows:
        return []
    return common.summary_block(
        "Summary: ln_ext's speed over torch eager's", "Time of torch eager (F.rms_norm; the add, then the norm) "
        "over ln_ext's on the same shape in this run (above 1: ln_ext is faster).",
        ["op", "N"] + [f"{d} {common.MODE_SHORT[mode]}" for d, mode in columns], rows)


def markdown_report(payload: dict) -> str:
    env, ceilings, records = payload["env"], payload["ceilings"], payload["results"]
    names = [p for p in payload["providers"] if payload["providers"][p]["available"]]
    labels = {p: payload["providers"][p]["label"] for p in payload["providers"]}
    out = [f"## RMSNorm and add + norm: {common.card_name(env)}", "", common.header_line(env), "",
           f"Copy ceiling measured in this run: **{ceilings['copy_gbps']:.0f} GB/s**. Timing: {payload['timing']}. "
           "Cells: GB/s of the bytes the fused op must move (% of copy); an unfused peer moves more in the same "
           "time. mixed: x bf16, weight/bias float32, a float32 residual stream."]
    if payload["missing"]:
        out.append("Not measured: " + "; ".join(f"{labels[p]} ({why})" for p, why in payload["missing"].items()) + ".")
    notes = common.mismatch_notes(records, lambda r: f"{labels[r['provider']]} {r['op']} {r['dtype']} N={r['N']}")
    if notes:
        out += ["", f"**Notes** ({common.MISMATCH}: outputs missed the float64 reference):", ""] + notes
    out.append("")
    out += common.per_call_markdown(records, list(payload["providers"]), labels, group=("op", "dtype"))
    records = [r for r in records if r.get("kind") != "per_call"]
    out += summary(payload, records)
    for op in payload["config"]["ops"]:
        for dtype in payload["config"]["dtypes"]:
            for mode in MODES:
                shapes = sorted({(r["N"], r["M"]) for r in records if r["op"] == op and r["dtype"] == dtype})
                if not shapes:
                    continue
                present = [p for p in names if any(r["op"] == op and r["provider"] == p and "ms" in r for r in records)]
                peers = [p for p in present if p != "ln_ext"]
                headers = ["N", "M"] + [labels[p] for p in present] + [f"ln_ext vs {labels[p]}" for p in peers]
                rows = []
                for n, m in shapes:
                    cell = {p: next((r for r in records if r["op"] == op and r["dtype"] == dtype and r["N"] == n
                                     and r["provider"] == p and r["mode"] == mode), None) for p in present}
                    row = [n, m]
                    for p in present:
                        c = cell[p]
                        row.append("—" if c is None else
                                   f"{c['gbps']:.0f} ({100 * c['gbps'] / ceilings['copy_gbps']:.0f}%)"
                                   + ("" if c["correct"] else " " + common.MISMATCH))
                    ours = cell.get("ln_ext")
                    for p in peers:
                        c = cell[p]
                        row.append(common.fmt_ratio(c["ms"] / ours["ms"]) if ours and c else "—")
                    rows.append(row)
                out += [f"### {op}, {dtype}, {MODE_TITLES[mode]}", "", common.markdown_table(headers, rows), ""]
    return "\n".join(out)


def plot(payload: dict, path: Path) -> Optional[Path]:
    plt = common.pyplot()
    records = [r for r in payload["results"] if "gbps" in r]
    if plt is None or not records:
        return None
    ops, dtypes = payload["config"]["ops"], payload["config"]["dtypes"]
    fig, axes = plt.subplots(len(ops), len(dtypes), figsize=(5 * len(dtypes), 3.6 * len(ops)), squeeze=False)
    for i, op in enumerate(ops):
        for j, dtype in enumerate(dtypes):
            ax = axes[i][j]
            ax.axhline(payload["ceilings"]["copy_gbps"], color="black", lw=1.2, label="copy")
            for k, p in enumerate(BY_NAME):
                pts = sorted((r["N"], r["gbps"]) for r in records
                             if r["op"] == op and r["dtype"] == dtype and r["provider"] == p and r["mode"] == "fwd_bwd")
                if pts:
                    ax.plot(*zip(*pts), marker="o", ms=3.5, lw=2.2 if p == "ln_ext" else 1.2, color=f"C{k}",
                            label=payload["providers"][p]["label"])
            ax.set_xscale("log", base=2)
            ax.set_ylim(bottom=0)
            ax.set_title(f"{op}, {dtype}, forward + backward", fontsize=9)
            ax.grid(True, which="both", alpha=0.3)
            ax.set_ylabel("GB/s")
    fig.suptitle(f"{common.card_name(payload['env'])} ({payload['env']['date_utc']})", fontsize=10)
    common.figure_legend(fig, axes)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ops", type=common.csv_list(), default=list(OPS))
    p.add_argument("--dtypes", type=common.csv_list())
    p.add_argument("--n", type=common.csv_list(int))
    p.add_argument("--elements", type=int)
    p.add_argument("--providers", type=common.csv_list())
    p.add_argument("--no-per-call", dest="per_call", action="store_false",
                   help="skip the per-call table (tiny shapes, host time per call)")
    p.add_argument("--device")
    p.add_argument("--rep-ms", type=float, default=50)
    p.add_argument("--warmup-ms", type=float, default=10)
    p.add_argument("--threads", type=int)
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    args.providers_named = args.providers is not None
    args.providers = args.providers or [q.name for q in PROVIDERS]
    for op in args.ops:
        if op not in OPS:
            p.error(f"--ops: unknown op {op!r}; choose from {list(OPS)}")
    device = common.pick_device(args.device)
    if device.type != "cuda" and argv is None:
        common.rerun_with_steady_malloc()
    defaults = GPU_DEFAULTS if device.type == "cuda" else CPU_DEFAULTS
    dtypes, ns = args.dtypes or defaults["dtypes"], args.n or defaults["n"]
    elements = args.elements or defaults["elements"]
    if args.threads:
        torch.set_num_threads(args.threads)
    env = common.environment(device)
    info, missing, providers = {}, {}, []
    for q in PROVIDERS:
        reason = why_missing(q, device)
        info[q.name] = {"label": q.label, "available": reason is None and q.name in args.providers}
        if q.name in args.providers:
            (missing.__setitem__(q.name, reason) if reason else providers.append(q))
    cases = [Case(op, d, max(1, round(elements / n)), n) for op in args.ops for d in dtypes for n in ns]
    print(common.header_line(env), file=sys.stderr)
    ceilings = common.measure_ceilings(device)
    bar = common.progress(len(cases) * len(providers) * len(MODES), "norm_family")
    records, done = [], 0
    try:
        with common.sigterm_as_interrupt():
            for case in cases:
                records += run_case(case, providers, device, args, bar)
                done += 1
    except KeyboardInterrupt:
        print(f"\ninterrupted after {done} of {len(cases)} shapes", file=sys.stderr)
    bar.close()
    if args.per_call:
        # torch.compile too where it can run, unless providers were named.
        extra = [] if args.providers_named else [q for q in PROVIDERS if q.name == "compile" and q not in providers
                                                 and why_missing(q, device) is None]
        records += per_call_records(args.ops, dtypes, providers + extra, device)
    payload = {
        "schema": "ln_ext.bench.norm_family/1", "env": env, "timing": common.timing_method(device),
        "config": {"ops": args.ops, "dtypes": dtypes, "n": ns, "elements": elements, "eps": EPS, "rep_ms": args.rep_ms},
        "ceilings": ceilings, "providers": info, "missing": missing,
        "completed": {"shapes": done, "of": len(cases)}, "results": records,
    }
    return common.write_results(payload, "norm_family", args.out, markdown_report, plot, "the float64 reference",
                                len(cases))


if __name__ == "__main__":
    sys.exit(main())
