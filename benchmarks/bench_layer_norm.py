#!/usr/bin/env python
"""LayerNorm speed: ln_ext against every installed peer, as a fraction of the card's copy bandwidth.

On a GPU: measures the copy and read-2-write-1 ceilings, then forward, backward (dx, dweight,
dbias) and forward+backward for each provider over N at M*N ~ 2^26, plus a few-rows latency
set. On the CPU: ln_ext vs nn.LayerNorm on a few shapes. Every provider's output and gradients
are checked once against a float64 reference before it is timed; a mismatch is marked ✗ in
every table and listed under the header, and a mismatching ln_ext makes the exit status 1.

Writes <out>/layer_norm.json (raw numbers), layer_norm.md (tables) and layer_norm.png (plots).
See benchmarks/README.md for the columns and the JSON schema.

    python benchmarks/bench_layer_norm.py                 # everything this machine can run
    python benchmarks/bench_layer_norm.py --quick         # a subset (no torch.compile), about a minute
    python benchmarks/bench_layer_norm.py --dtypes bf16 --n 4096,5127 --providers ln_ext,torch
"""
from __future__ import annotations

import argparse
import math
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

N_POW = [256, 512, 768, 1024, 1536, 2048, 4096, 5120, 8192, 12288, 16384, 32768, 65536, 131072, 262144]
N_ODD = [1000, 4097, 5127, 12289]
LATENCY_N = 4096
GPU_DEFAULTS = dict(dtypes=["bf16", "fp16", "fp32", "mixed"], n=sorted(N_POW + N_ODD), elements=2**26,
                    latency_m=[1, 16, 128])
GPU_QUICK = dict(dtypes=["bf16"], n=[1024, 4096, 5127, 16384, 65536, 262144], elements=2**26, latency_m=[16])
# CPU: M*N = 2^23 puts an fp32 tensor (32 MiB) beyond most last-level caches (and at glibc's
# mmap threshold: see common.rerun_with_steady_malloc).
CPU_DEFAULTS = dict(dtypes=["fp32", "bf16"], n=[256, 1024, 4096, 5127, 16384], elements=2**23,
                    latency_m=[1, 16, 128])
CPU_QUICK = dict(dtypes=["fp32", "bf16"], n=[1024, 5127], elements=2**21, latency_m=[16])
MODES = ("fwd", "bwd", "fwd_bwd")
MODE_TITLES = {"fwd": "forward", "bwd": "backward (dx, dweight, dbias)", "fwd_bwd": "forward + backward"}


# ----------------------------------------------------------------------------- providers
#
# A provider's setup(weight, bias) builds its LayerNorm over the last dim holding copies of
# `weight` and `bias` (so every provider computes the same function) and returns
# (forward function x -> y, [weight, bias] leaves whose gradients the backward computes).
# It raises Unsupported for a dtype combination the provider cannot run.


class Unsupported(Exception):
    pass


Setup = Callable[[torch.Tensor, torch.Tensor], tuple[Callable[[torch.Tensor], torch.Tensor], list]]


def _module_with(module: nn.Module, weight: torch.Tensor, bias: torch.Tensor) -> nn.Module:
    with torch.no_grad():
        module.weight.copy_(weight)
        module.bias.copy_(bias)
    return module


def setup_ln_ext(weight, bias):
    import ln_ext

    if weight.is_cuda and not ln_ext.has_cuda_kernels():
        raise Unsupported("this ln_ext build has no CUDA kernels")
    m = _module_with(ln_ext.LayerNorm(weight.numel(), eps=EPS, device=weight.device, dtype=weight.dtype), weight, bias)
    return m, [m.weight, m.bias]


def setup_torch(weight, bias):
    m = _module_with(nn.LayerNorm(weight.numel(), eps=EPS, device=weight.device, dtype=weight.dtype), weight, bias)
    return m, [m.weight, m.bias]


def _layer_norm_for_compile(x, weight, bias):
    # A function of ours, not F.layer_norm itself: dynamo skips frames that start inside
    # torch/, which would silently benchmark eager mode.
    return F.layer_norm(x, weight.shape, weight, bias, EPS)


_compiled_layer_norm = None


def setup_compile(weight, bias):
    global _compiled_layer_norm
    if _compiled_layer_norm is None:
        config = torch._dynamo.config
        # One static graph per shape and dtype; fail loudly rather than fall back to eager.
        for name, value in (("cache_size_limit", 4096), ("accumulated_cache_size_limit", 4096),
                            ("fail_on_recompile_limit_hit", True)):
            if hasattr(config, name):
                setattr(config, name, value)
        # The backward benchmark replays one graph (retain_graph=True), which donated
        # buffers forbid; they only save memory.
        torch._functorch.config.donated_buffer = False
        _compiled_layer_norm = torch.compile(_layer_norm_for_compile, dynamic=False)
    w = weight.detach().clone().requires_grad_()
    b = bias.detach().clone().requires_grad_()
    fn = _compiled_layer_norm
    return (lambda x: fn(x, w, b)), [w, b]


def setup_apex(weight, bias):
    from apex.normalization import FusedLayerNorm, MixedFusedLayerNorm

    n, mixed = weight.numel(), weight.dtype == torch.float32
    # MixedFusedLayerNorm keeps float32 parameters for half inputs; FusedLayerNorm wants
    # parameters of the input's dtype.
    cls = MixedFusedLayerNorm if mixed else FusedLayerNorm
    m = _module_with(cls(n, eps=EPS).to(device=weight.device, dtype=weight.dtype), weight, bias)
    return m, [m.weight, m.bias]


def setup_liger(weight, bias):
    from liger_kernel.ops.layer_norm import LigerLayerNormFunction

    w = weight.detach().clone().requires_grad_()
    b = bias.detach().clone().requires_grad_()
    return (lambda x: LigerLayerNormFunction.apply(x, w, b, EPS)), [w, b]


def setup_te(weight, bias):
    import transformer_engine.pytorch as te

    m = te.LayerNorm(weight.numel(), eps=EPS, params_dtype=weight.dtype, device=weight.device)
    m = _module_with(m, weight, bias)
    return m, [m.weight, m.bias]


@dataclass
class Provider:
    name: str      # command-line and JSON key
    label: str     # table and plot label
    setup: Setup
    module: Optional[str]  # what must import for it to exist
    gpu_only: bool = False


PROVIDERS = [
    Provider("ln_ext", "ln_ext", setup_ln_ext, "ln_ext"),
    Provider("torch", "nn.LayerNorm", setup_torch, None),
    Provider("compile", "torch.compile", setup_compile, None),
    Provider("apex", "apex FusedLayerNorm", setup_apex, "apex.normalization", gpu_only=True),
    Provider("liger", "Liger-Kernel", setup_liger, "liger_kernel.ops.layer_norm", gpu_only=True),
    Provider("te", "TransformerEngine", setup_te, "transformer_engine.pytorch", gpu_only=True),
]
BY_NAME = {p.name: p for p in PROVIDERS}
CPU_DEFAULT_PROVIDERS = ["ln_ext", "torch"]
# --quick on a GPU leaves out torch.compile unless named: its compiles would be most of the run.
GPU_QUICK_PROVIDERS = [p.name for p in PROVIDERS if p.name != "compile"]


def why_missing(provider: Provider, device: torch.device) -> Optional[str]:
    """None when the provider can run here, else the reason it cannot."""
    if provider.gpu_only and device.type != "cuda":
        return "needs a CUDA GPU"
    if provider.module:
        try:
            __import__(provider.module)
        except Exception as exc:  # noqa: BLE001  (broken installs fail in many ways)
            return f"{type(exc).__name__}: {exc}".splitlines()[0]
    if provider.name == "ln_ext" and device.type == "cuda":
        import ln_ext

        if not ln_ext.has_cuda_kernels():
            return "this ln_ext build has no CUDA kernels (rebuild with CUDA_HOME set)"
    return None


# ----------------------------------------------------------------------------- one shape


@dataclass
class Case:
    dtype: str
    m: int
    n: int
    kind: str  # "throughput", "latency" or "per_call"

    @property
    def x_dtype(self):
        return DTYPES[self.dtype][0]

    @property
    def p_dtype(self):
        return DTYPES[self.dtype][1]

    def bytes_moved(self, mode: str) -> int:
        """Compulsory traffic: forward reads x, writes y (+ reads weight, bias); backward
        reads x, dy, writes dx (+ reads weight, writes dweight, dbias)."""
        xs, ps = self.x_dtype.itemsize, self.p_dtype.itemsize
        fwd = 2 * self.m * self.n * xs + 2 * self.n * ps
        bwd = 3 * self.m * self.n * xs + 3 * self.n * ps
        return {"fwd": fwd, "bwd": bwd, "fwd_bwd": fwd + bwd}[mode]


def make_inputs(case: Case, device: torch.device, seed: int = 0):
    """Random, never-constant data: x with a non-zero mean (tests the centering), weight
    around 1, bias around 0, dy ~ N(0, 1)."""
    g = torch.Generator(device=device).manual_seed(seed)
    x = (torch.randn(case.m, case.n, generator=g, device=device) * 1.5 + 0.3).to(case.x_dtype)
    dy = torch.randn(case.m, case.n, generator=g, device=device).to(case.x_dtype)
    weight = (1 + 0.5 * torch.randn(case.n, generator=g, device=device)).to(case.p_dtype)
    bias = (0.1 * torch.randn(case.n, generator=g, device=device)).to(case.p_dtype)
    return x.requires_grad_(), dy, weight, bias


def reference(x, dy, weight, bias) -> dict:
    """float64 y, dx, dweight, dbias of the paper's equations on exactly these inputs."""
    from ln_ext import reference as ref

    x64, dy64, w64, b64 = (t.detach().double() for t in (x, dy, weight, bias))
    y = ref.layer_norm(x64, (x.shape[-1],), w64, b64, EPS)
    dx, dw, db = ref.layer_norm_grads(dy64, x64, 1, w64, EPS)
    return {"y": y, "dx": dx, "dweight": dw, "dbias": db}


def check(fn, params, x, dy, ref: dict) -> dict:
    """Run forward + backward once and compare every output with the float64 reference."""
    fwd_tol, bwd_tol = TOLERANCE[x.dtype]
    y = fn(x)
    dx, dw, db = torch.autograd.grad(y, [x, *params], dy)
    ratios = {
        "y": common.error_ratio(y, ref["y"], fwd_tol),
        "dx": common.error_ratio(dx, ref["dx"], bwd_tol),
        "dweight": common.error_ratio(dw, ref["dweight"], bwd_tol),
        "dbias": common.error_ratio(db, ref["dbias"], bwd_tol),
    }
    dtype_ok = y.dtype == x.dtype
    return {"ok": dtype_ok and all(r <= 1 for r in ratios.values()), "error_ratio": ratios,
            "y_dtype": str(y.dtype).replace("torch.", "")}


def _reason(exc: Exception) -> str:
    text = f"{type(exc).__name__}: {exc}".strip()
    return (text.splitlines() or [text])[0][:300]


def run_case(case: Case, providers: list[Provider], device, args, bar) -> list[dict]:
    x, dy, weight, bias = make_inputs(case, device)
    ref = reference(x, dy, weight, bias)
    records = []
    for provider in providers:
        base = dict(kind=case.kind, dtype=case.dtype, x_dtype=str(case.x_dtype).replace("torch.", ""),
                    param_dtype=str(case.p_dtype).replace("torch.", ""), M=case.m, N=case.n, provider=provider.name)
        bar.set_postfix_str(f"{case.dtype} M={case.m} N={case.n} {provider.name}")
        try:
            fn, params = provider.setup(weight, bias)
            verdict = check(fn, params, x, dy, ref)
        except Exception as exc:  # noqa: BLE001  (a peer may reject a shape or dtype)
            records.append(dict(base, mode="all", error=_reason(exc)))
            bar.update(len(MODES) if case.kind == "throughput" else 1)
            continue
        if not verdict["ok"]:
            print(f"\nMISMATCH: {provider.name} {case.dtype} M={case.m} N={case.n}: {verdict}", file=sys.stderr)
        inputs = [x, *params]
        if case.kind == "throughput":
            y = fn(x)
            timed = {
                "fwd": lambda: fn(x),
                "bwd": lambda: torch.autograd.grad(y, inputs, dy, retain_graph=True),
                "fwd_bwd": lambda: torch.autograd.grad(fn(x), inputs, dy),
            }
            for mode, call in timed.items():
                try:
                    ms = common.time_ms(call, device, rep_ms=args.rep_ms, warmup_ms=args.warmup_ms)
                except Exception as exc:  # noqa: BLE001
                    records.append(dict(base, mode=mode, error=_reason(exc)))
                else:
                    nbytes = case.bytes_moved(mode)
                    records.append(dict(base, mode=mode, ms=ms, bytes=nbytes, gbps=common.gbps(nbytes, ms),
                                        correct=verdict["ok"], check=verdict))
                bar.update()
            del y
        else:
            call = lambda: torch.autograd.grad(fn(x), inputs, dy)  # noqa: E731
            try:
                ms = common.time_ms(call, device, rep_ms=args.rep_ms, warmup_ms=args.warmup_ms)
                wall_us = common.wall_us_per_call(call, device)
            except Exception as exc:  # noqa: BLE001
                records.append(dict(base, mode="fwd_bwd", error=_reason(exc)))
            else:
                records.append(dict(base, mode="fwd_bwd", ms=ms, wall_us=wall_us, correct=verdict["ok"],
                                    check=verdict))
            bar.update()
        del fn, params, inputs
    return records


def per_call_records(dtypes: list[str], providers: list[Provider], device) -> list[dict]:
    """Host time per call at common.PER_CALL_SHAPES: forward without grad, forward + backward."""
    records = []
    for dtype in dtypes:
        for m, n in common.PER_CALL_SHAPES:
            x, dy, weight, bias = make_inputs(Case(dtype, m, n, "per_call"), device)
            ref = reference(x, dy, weight, bias)
            calls = []
            for provider in providers:
                base = dict(kind="per_call", dtype=dtype, M=m, N=n, provider=provider.name)
                try:
                    fn, params = provider.setup(weight, bias)
                    verdict = check(fn, params, x, dy, ref)
                except Exception as exc:  # noqa: BLE001
                    records.append(dict(base, mode="all", error=_reason(exc)))
                    continue
                base.update(correct=verdict["ok"], check=verdict)
                inputs = [x, *params]
                calls.append((dict(base, mode="no_grad"), common.no_grad_call(fn, x)))
                calls.append((dict(base, mode="fwd_bwd"),
                              lambda fn=fn, inputs=inputs: torch.autograd.grad(fn(x), inputs, dy)))
            records += common.timed_per_call(calls, device)
    return records


def add_relative_numbers(records: list[dict], ceilings: dict) -> None:
    """% of copy for every timing, and speed-ups vs nn.LayerNorm (same shape, dtype, mode)."""
    key = lambda r: (r["kind"], r["dtype"], r["M"], r["N"], r["mode"])  # noqa: E731
    torch_ms = {key(r): r["ms"] for r in records if r["provider"] == "torch" and "ms" in r}
    for r in records:
        if "gbps" in r:
            r["pct_copy"] = 100 * r["gbps"] / ceilings["copy_gbps"]
        if "ms" in r and key(r) in torch_ms:
            r["speedup_vs_torch"] = torch_ms[key(r)] / r["ms"]


# ----------------------------------------------------------------------------- reports


def _cell(r: Optional[dict]) -> str:
    if r is None:
        return "—"
    if "error" in r:
        return "n/a"
    mark = "" if r["correct"] else " " + common.MISMATCH
    return f"{r['gbps']:.0f} ({r['pct_copy']:.0f}%){mark}"


def _lookup(records, kind, dtype, m, n, provider, mode):
    hit = [r for r in records if r["kind"] == kind and r["dtype"] == dtype and r["M"] == m and r["N"] == n
           and r["provider"] == provider and r["mode"] in (mode, "all")]
    return hit[0] if hit else None


def summary(payload: dict, throughput: list[dict]) -> list[str]:
    """ln_ext's speed over nn.LayerNorm's at every N, per dtype and pass (one table)."""
    columns = [(d, mode) for d in payload["config"]["dtypes"] for mode in MODES
               if any(r["dtype"] == d for r in throughput)]
    shapes = sorted({(r["N"], r["M"]) for r in throughput})
    if not columns or not any(r["provider"] == "torch" for r in throughput):
        return []
    rows = []
    for n, m in shapes:
        row = [n, m]
        for dtype, mode in columns:
            ours = _lookup(throughput, "throughput", dtype, m, n, "ln_ext", mode)
            peer = _lookup(throughput, "throughput", dtype, m, n, "torch", mode)
            ok = all(c is not None and "ms" in c for c in (ours, peer))
            row.append(common.fmt_ratio(peer["ms"] / ours["ms"]) if ok else "—")
        rows.append(row)
    return common.summary_block(
        "Summary: ln_ext's speed over nn.LayerNorm's", "Time of nn.LayerNorm over ln_ext's on the same shape "
        "in this run (above 1: ln_ext is faster); the tables below give GB/s and the other peers.",
        ["N", "M"] + [f"{d} {common.MODE_SHORT[mode]}" for d, mode in columns], rows)


def markdown_report(payload: dict) -> str:
    env, ceilings, records = payload["env"], payload["ceilings"], payload["results"]
    names = [p for p in payload["providers"] if payload["providers"][p]["available"]]
    labels = {p: payload["providers"][p]["label"] for p in payload["providers"]}
    peers = [p for p in names if p != "ln_ext"]
    out = [f"## LayerNorm: {common.card_name(env)}", "", common.header_line(env), ""]
    done = payload["completed"]
    if done["shapes"] < done["of"]:
        out += [f"**Interrupted: {done['shapes']} of {done['of']} shapes measured.**", ""]
    out.append(f"Ceilings measured in this run: copy **{ceilings['copy_gbps']:.0f} GB/s**, read-2-write-1 "
               f"(`torch.add(x, y, out=z)`) {ceilings['read2_write1_gbps']:.0f} GB/s. "
               f"Timing: {payload['timing']}. Cells: GB/s (% of copy); forward counts 2·M·N elements moved, "
               f"backward 3·M·N, plus the parameters.")
    missing = payload["missing"]
    if missing:
        out.append("Not measured: " + "; ".join(f"{labels[p]} ({why})" for p, why in missing.items()) + ".")
    notes = common.mismatch_notes(
        records, lambda r: f"{labels[r['provider']]} {r['dtype']} M={r['M']} N={r['N']}")
    notes += common.error_notes(records, lambda p: labels[p])
    if notes:
        out += ["", f"**Notes** ({common.MISMATCH}: outputs missed the float64 reference; n/a: the provider "
                "failed):", ""] + notes
    out.append("")
    throughput = [r for r in records if r["kind"] == "throughput"]
    out += summary(payload, throughput)
    for dtype in payload["config"]["dtypes"]:
        shapes = sorted({(r["N"], r["M"]) for r in throughput if r["dtype"] == dtype})
        if not shapes:
            continue
        x_dt, p_dt = DTYPES[dtype]
        for mode in MODES:
            headers = ["N", "M"] + [labels[p] for p in names]
            if "ln_ext" in names and peers:
                headers += ["ln_ext vs " + labels[p] for p in peers]
            rows = []
            for n, m in shapes:
                cells = {p: _lookup(throughput, "throughput", dtype, m, n, p, mode) for p in names}
                row = [n, m] + [_cell(cells[p]) for p in names]
                if "ln_ext" in names and peers:
                    ours = cells["ln_ext"]
                    for p in peers:
                        peer = cells[p]
                        if not all(c is not None and "ms" in c for c in (ours, peer)):
                            row.append("—")
                            continue
                        mark = "" if ours["correct"] and peer["correct"] else " " + common.MISMATCH
                        row.append(common.fmt_ratio(peer["ms"] / ours["ms"]) + mark)
                rows.append(row)
            dt = f"{dtype} (x {str(x_dt)[6:]}, weight/bias {str(p_dt)[6:]})" if dtype == "mixed" else dtype
            out += [f"### {dt}, {MODE_TITLES[mode]}", "", common.markdown_table(headers, rows), ""]
    out += common.per_call_markdown(records, list(payload["providers"]), labels)
    latency = [r for r in records if r["kind"] == "latency"]
    if latency:
        alone = "the device time alone" if env["device"] == "cuda" else "the median of single timed calls"
        out += [f"### Few rows: forward + backward per call, N = {LATENCY_N}", "",
                f"Wall time per call of back-to-back calls (Python and launch included), and in brackets {alone}.",
                ""]
        headers = ["dtype", "M"] + [labels[p] for p in names]
        rows = []
        for dtype, m in sorted({(r["dtype"], r["M"]) for r in latency}, key=lambda k: (payload["config"]["dtypes"].index(k[0]), k[1])):
            row = [dtype, m]
            for p in names:
                r = _lookup(latency, "latency", dtype, m, LATENCY_N, p, "fwd_bwd")
                if r is None or "error" in r:
                    row.append("n/a" if r else "—")
                else:
                    mark = "" if r["correct"] else " " + common.MISMATCH
                    row.append(f"{r['wall_us']:.1f} µs ({r['ms'] * 1e3:.1f} µs){mark}")
            rows.append(row)
        out += [common.markdown_table(headers, rows), ""]
    return "\n".join(out)


def plot(payload: dict, path: Path) -> Optional[Path]:
    """GB/s against N, one column per dtype, rows forward / backward, copy line drawn.
    Timings whose outputs missed the reference are ringed in red."""
    plt = common.pyplot()
    if plt is None:
        print("matplotlib is not installed: no plot", file=sys.stderr)
        return None
    records = [r for r in payload["results"] if r["kind"] == "throughput" and "gbps" in r]
    dtypes = [d for d in payload["config"]["dtypes"] if any(r["dtype"] == d for r in records)]
    if not dtypes:
        return None
    names = [p for p in payload["providers"] if payload["providers"][p]["available"]]
    ceilings = payload["ceilings"]
    top = 1.12 * max([ceilings["copy_gbps"], ceilings["read2_write1_gbps"]] + [r["gbps"] for r in records])
    fig, axes = plt.subplots(2, len(dtypes), figsize=(5.2 * len(dtypes), 8.4), squeeze=False, sharex=True)
    colors = {p: f"C{list(BY_NAME).index(p)}" for p in names}  # stable across runs
    for col, dtype in enumerate(dtypes):
        for row, mode in enumerate(("fwd", "bwd")):
            ax = axes[row][col]
            ax.axhline(ceilings["copy_gbps"], color="black", lw=1.2, label="copy")
            ax.axhline(ceilings["read2_write1_gbps"], color="gray", lw=1, ls="--", label="read-2-write-1")
            for p in names:
                mine = sorted((r["N"], r["gbps"], r["correct"]) for r in records
                              if r["provider"] == p and r["dtype"] == dtype and r["mode"] == mode)
                regular = [(n, g) for n, g, _ in mine if n % 256 == 0]
                odd = [(n, g) for n, g, _ in mine if n % 256]
                label = payload["providers"][p]["label"]
                lw = 2.2 if p == "ln_ext" else 1.2
                if regular:
                    ax.plot(*zip(*regular), marker="o", ms=3.5, lw=lw, color=colors[p], label=label)
                if odd:  # N like 1000 or 5127 off the line: a different regime (ragged or unaligned rows)
                    ax.plot(*zip(*odd), ls="none", marker="x", ms=7, mew=2, color=colors[p],
                            label=None if regular else label)
                wrong = [(n, g) for n, g, ok in mine if not ok]
                if wrong:
                    ax.plot(*zip(*wrong), ls="none", marker="o", ms=11, mfc="none", mec="red", mew=1.5,
                            label=f"{common.MISMATCH} missed the reference")
            ax.set_xscale("log", base=2)
            ax.set_ylim(bottom=0, top=top)
            ax.set_title(f"{dtype}, {MODE_TITLES[mode].split(' (')[0]}")
            ax.grid(True, which="both", alpha=0.3)
            if row == 1:
                ax.set_xlabel("N (×: N not a multiple of 256)")
            if col == 0:
                ax.set_ylabel("GB/s")
    env = payload["env"]
    fig.suptitle(f"LayerNorm, M·N ≈ {payload['config']['elements']:,} elements: {common.card_name(env)} "
                 f"({env['date_utc']}, torch {env['torch']})", fontsize=10)
    common.figure_legend(fig, axes)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------- main


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtypes", type=common.csv_list(), help=f"from {sorted(DTYPES)} (default: by device)")
    p.add_argument("--n", type=common.csv_list(int), help="hidden sizes N (default: by device)")
    p.add_argument("--m", type=common.csv_list(int),
                   help="row counts M, each run with each N (default: M = elements / N)")
    p.add_argument("--elements", type=int, help="M*N target when --m is not given (GPU 2^26, CPU 2^23)")
    p.add_argument("--no-per-call", dest="per_call", action="store_false",
                   help="skip the per-call table (tiny shapes, host time per call)")
    p.add_argument("--latency-m", type=common.csv_list(int),
                   help=f"M of the few-rows latency set at N={LATENCY_N}; '' for none")
    p.add_argument("--providers", type=common.csv_list(),
                   help=f"from {[q.name for q in PROVIDERS]} (default: all on a GPU, but compile only "
                   "without --quick; ln_ext,torch on the CPU)")
    p.add_argument("--quick", action="store_true",
                   help="a small subset: bf16, 6 N, M=16 latency, no torch.compile unless named")
    p.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    p.add_argument("--rep-ms", type=float, help="time budget per measurement (default 100, quick 40)")
    p.add_argument("--warmup-ms", type=float, default=25)
    p.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's choice)")
    p.add_argument("--out", type=Path, help="output folder (default benchmarks/results/<card>)")
    args = p.parse_args(argv)
    for d in args.dtypes or []:
        if d not in DTYPES:
            p.error(f"--dtypes: unknown dtype {d!r}; choose from {sorted(DTYPES)}")
    for name in args.providers or []:
        if name not in BY_NAME:
            p.error(f"--providers: unknown provider {name!r}; choose from {list(BY_NAME)}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    device = common.pick_device(args.device)
    on_gpu = device.type == "cuda"
    if not on_gpu and argv is None:  # run as a script (not called from another program)
        common.rerun_with_steady_malloc()
    defaults = (GPU_QUICK if args.quick else GPU_DEFAULTS) if on_gpu else (CPU_QUICK if args.quick else CPU_DEFAULTS)
    dtypes = args.dtypes or defaults["dtypes"]
    ns = args.n or defaults["n"]
    elements = args.elements or defaults["elements"]
    latency_m = defaults["latency_m"] if args.latency_m is None else args.latency_m
    args.rep_ms = args.rep_ms or (40 if args.quick else 100)
    if on_gpu:
        torch.cuda.set_device(device)
    if args.threads:
        torch.set_num_threads(args.threads)

    env = common.environment(device)
    if args.providers:
        wanted = args.providers
    elif on_gpu:
        wanted = GPU_QUICK_PROVIDERS if args.quick else [p.name for p in PROVIDERS]
    else:
        wanted = CPU_DEFAULT_PROVIDERS
    provider_info, missing, providers = {}, {}, []
    for p in PROVIDERS:
        reason = why_missing(p, device)
        provider_info[p.name] = {"label": p.label, "available": reason is None and p.name in wanted}
        if p.name not in wanted:
            continue
        if reason:
            missing[p.name] = reason
        else:
            providers.append(p)
    if not providers:
        print("no provider can run here: " + str(missing), file=sys.stderr)
        return 2

    cases = []
    for dtype in dtypes:
        for n in ns:
            for m in args.m or [max(1, round(elements / n))]:
                cases.append(Case(dtype, m, n, "throughput"))
    for dtype in dtypes:
        cases += [Case(dtype, m, LATENCY_N, "latency") for m in latency_m]

    print(common.header_line(env), file=sys.stderr)
    if missing:
        print("not measured: " + "; ".join(f"{k} ({v})" for k, v in missing.items()), file=sys.stderr)
    ceilings = common.measure_ceilings(device)
    print(f"copy {ceilings['copy_gbps']:.0f} GB/s, read-2-write-1 {ceilings['read2_write1_gbps']:.0f} GB/s",
          file=sys.stderr)

    steps = sum(len(providers) * (len(MODES) if c.kind == "throughput" else 1) for c in cases)
    bar = common.progress(steps, "layer_norm")
    records, done = [], 0
    try:
        with common.sigterm_as_interrupt():
            for case in cases:
                records += run_case(case, providers, device, args, bar)
                done += 1
                if on_gpu:
                    torch.cuda.empty_cache()
    except KeyboardInterrupt:
        print(f"\ninterrupted: writing the {done} of {len(cases)} shapes finished", file=sys.stderr)
    bar.close()
    if args.per_call:
        # torch.compile too where it can run, unless providers were named or --quick.
        extra = [] if args.providers or args.quick else [p for p in PROVIDERS if p.name == "compile"
                                                          and p not in providers and why_missing(p, device) is None]
        records += per_call_records(dtypes, providers + extra, device)
    add_relative_numbers(records, ceilings)

    payload = {
        "schema": "ln_ext.bench.layer_norm/1",
        "env": env,
        "timing": common.timing_method(device),
        "config": {"dtypes": dtypes, "n": ns, "m": args.m, "elements": elements, "latency_m": latency_m,
                   "latency_n": LATENCY_N, "eps": EPS, "rep_ms": args.rep_ms, "quick": args.quick},
        "ceilings": ceilings,
        "providers": provider_info,
        "missing": missing,
        "completed": {"shapes": done, "of": len(cases)},
        "results": records,
    }
    return common.write_results(payload, "layer_norm", args.out, markdown_report, plot, "the float64 reference", len(cases))


if __name__ == "__main__":
    sys.exit(main())
