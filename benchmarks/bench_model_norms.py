#!/usr/bin/env python
"""The norm classes of the models people train, as they are and after convert_layer_norm:
time (eager and torch.compile) and memory saved for backward, side by side in one run.

Forms and their original modules (built directly, nothing downloaded):
  llama    transformers' LlamaRMSNorm (x.float(), normalize, cast back, weight * x̂)
  gemma    transformers' GemmaRMSNorm (x̂ * (1 + weight) in float32; weight randomized)
  ln2d     timm's LayerNorm2d (permute, F.layer_norm, permute back) vs ln_ext's channels-first kernel
Each is timed forward and forward + backward (gradients of x and weight), eager and compiled
(torch.compile of the module, compilation excluded), and the bytes of the tensors it saves for
backward are counted once (torch.autograd.graph.saved_tensors_hooks). Outputs and gradients of
the converted module are checked against the original's in float64 first (✗ marks a miss).

Writes <out>/model_norms.json, model_norms.md, model_norms.png.

    python benchmarks/bench_model_norms.py                     # CPU: small shapes, fp32 and bf16
    python benchmarks/bench_model_norms.py --forms llama --dtypes bf16 --tiny
"""
from __future__ import annotations

import argparse
import copy
from typing import Callable, Optional

import common  # first: puts the repository root on sys.path
import torch
from common import DTYPES

import ln_ext

FORMS = ("llama", "gemma", "ln2d")
CPU_SHAPES = {"llama": [(2048, 1024), (512, 4096), (8, 4096)], "gemma": [(2048, 1024), (512, 4096), (8, 4096)],
              "ln2d": [(8, 96, 56, 56), (8, 384, 14, 14)]}
GPU_SHAPES = {"llama": [(16384, 4096), (65536, 1024), (16, 4096)], "gemma": [(16384, 4096), (16, 4096)],
              "ln2d": [(64, 96, 56, 56), (64, 384, 14, 14), (64, 768, 7, 7)]}
TINY_SHAPES = {"llama": [(16, 64)], "gemma": [(16, 64)], "ln2d": [(2, 8, 5, 5)]}
MODES = ("fwd", "fwd_bwd")


def original_module(form: str, shape, dtype: torch.dtype, device) -> Optional[torch.nn.Module]:
    """The model library's own module for the form, or None when the library is missing."""
    torch.manual_seed(0)
    try:
        if form == "llama":
            from transformers.models.llama.modeling_llama import LlamaRMSNorm
            module = LlamaRMSNorm(shape[-1], eps=1e-6)
        elif form == "gemma":
            from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
            module = GemmaRMSNorm(shape[-1], eps=1e-6)
        else:
            from timm.layers import LayerNorm2d
            module = LayerNorm2d(shape[1])
    except ImportError:
        return None
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0.0 if form == "gemma" else 1.0, 0.3)
    return module.to(device=device, dtype=dtype)


def saved_bytes(module: torch.nn.Module, x: torch.Tensor) -> int:
    """Bytes of the tensors autograd keeps for the backward of one call (parameters excluded)."""
    params = {p.data_ptr() for p in module.parameters()}
    total = 0

    def pack(t):
        nonlocal total
        if t.data_ptr() not in params:
            total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        module(x.detach().requires_grad_())
    return total


def runner(module, x, mode: str) -> Callable[[], object]:
    if mode == "fwd":
        def fwd():
            with torch.no_grad():
                return module(x)
        return fwd
    xg = x.detach().requires_grad_()
    dy = torch.randn_like(module(xg))

    def fwd_bwd():
        module(xg).backward(dy)
    return fwd_bwd


def check(original, converted, x) -> bool:
    """The converted module's output and gradients against the original's, both in float32 (the
    transformers forms compute in float32 whatever their input: no float64 reference)."""
    a, b = copy.deepcopy(original).float(), copy.deepcopy(converted).float()
    xa, xb = x.float().detach().requires_grad_(), x.float().detach().requires_grad_()
    ya, yb = a(xa), b(xb)
    dy = torch.randn_like(ya)
    ya.backward(dy)
    yb.backward(dy)
    pairs = [(yb, ya), (xb.grad, xa.grad)] + [(p.grad, q.grad) for p, q in zip(b.parameters(), a.parameters())]
    # Relative to each tensor's norm: dweight sums B * S terms, whose rounding both sides carry.
    return all(float((u - v).detach().norm()) <= 1e-5 * float(v.detach().norm()) for u, v in pairs)


def measure(form, shape, dtype_name, device, rep_ms) -> dict:
    # Each row compiles afresh: the converted modules share one forward function, whose
    # recompiles for new shapes and modules would otherwise reach dynamo's limit and fall back
    # to eager in later rows.
    torch._dynamo.reset()
    dtype, _ = DTYPES[dtype_name]  # (x, parameters): the modules hold x's dtype
    original = original_module(form, shape, dtype, device)
    if original is None:
        return {"form": form, "shape": list(shape), "dtype": dtype_name, "skipped": "library not installed"}
    converted = ln_ext.convert_layer_norm(copy.deepcopy(original))
    x = torch.randn(shape, device=device, dtype=dtype)
    row = {"form": form, "shape": list(shape), "dtype": dtype_name, "provider": "ln_ext",
           "correct": check(original, converted, x),
           "saved_bytes": {"original": saved_bytes(original, x), "ln_ext": saved_bytes(converted, x)}, "ms": {}}
    for name, module in (("original", original), ("ln_ext", converted)):
        compiled = torch.compile(module)
        for mode in MODES:
            row["ms"][f"{name} eager {mode}"] = common.time_ms(runner(module, x, mode), device, rep_ms=rep_ms)
            row["ms"][f"{name} compiled {mode}"] = common.time_ms(runner(compiled, x, mode), device, rep_ms=rep_ms)
    return row


def report(payload: dict) -> str:
    lines = [f"## Model norms: {common.header_line(payload['env'])}", "",
             "Each form's own module (transformers' LlamaRMSNorm / GemmaRMSNorm, timm's LayerNorm2d) against "
             "the same module after `ln_ext.convert_layer_norm`; time per call (median), ratio = original / ln_ext "
             "(> 1: ln_ext faster); saved = bytes autograd keeps for backward per call."]
    for mode in MODES:
        rows = []
        for r in payload["results"]:
            if "skipped" in r:
                continue
            ms = r["ms"]
            mark = "" if r["correct"] else f" {common.MISMATCH}"
            cells = [r["form"] + mark, "x".join(map(str, r["shape"])), r["dtype"]]
            for kind in ("eager", "compiled"):
                o, ours = ms[f"original {kind} {mode}"], ms[f"ln_ext {kind} {mode}"]
                cells += [common.fmt_ms(o), common.fmt_ms(ours), common.fmt_ratio(o / ours)]
            if mode == "fwd_bwd":
                s = r["saved_bytes"]
                cells += [f"{s['original'] / 2**20:.2f} MiB", f"{s['ln_ext'] / 2**20:.2f} MiB"]
            rows.append(cells)
        headers = ["form", "shape", "dtype", "original (eager)", "ln_ext (eager)", "ratio", "original (compiled)",
                   "ln_ext (compiled)", "ratio"]
        if mode == "fwd_bwd":
            headers += ["saved, original", "saved, ln_ext"]
        lines += ["", f"### {'forward' if mode == 'fwd' else 'forward + backward'}", "",
                  common.markdown_table(headers, rows)]
    skipped = sorted({r["form"] for r in payload["results"] if "skipped" in r})
    if skipped:
        lines += ["", "Skipped (library not installed): " + ", ".join(skipped)]
    return "\n".join(lines)


def plot(payload: dict, path):
    plt = common.pyplot()
    rows = [r for r in payload["results"] if "skipped" not in r]
    if plt is None or not rows:
        return None
    fig, ax = plt.subplots(figsize=(max(6, len(rows) * 0.9), 4))
    labels = [f"{r['form']}\n{'x'.join(map(str, r['shape']))}\n{r['dtype']}" for r in rows]
    width = 0.2
    for i, (kind, mode) in enumerate([(k, m) for k in ("eager", "compiled") for m in MODES]):
        ratios = [r["ms"][f"original {kind} {mode}"] / r["ms"][f"ln_ext {kind} {mode}"] for r in rows]
        ax.bar([j + (i - 1.5) * width for j in range(len(rows))], ratios, width, label=f"{kind} {mode}")
    ax.axhline(1.0, color="black", lw=0.8)
    ax.set_xticks(range(len(rows)), labels, fontsize=7)
    ax.set_ylabel("original time / ln_ext time")
    ax.set_title(common.header_line(payload["env"]), fontsize=8)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device")
    parser.add_argument("--forms", type=common.csv_list(), default=list(FORMS))
    parser.add_argument("--dtypes", type=common.csv_list(), default=["fp32", "bf16"])
    parser.add_argument("--tiny", action="store_true", help="one tiny shape per form (a smoke run)")
    parser.add_argument("--rep-ms", type=float, default=100)
    parser.add_argument("--out", type=common.Path, default=None)
    args = parser.parse_args(argv)
    device = common.pick_device(args.device)
    shapes = TINY_SHAPES if args.tiny else GPU_SHAPES if device.type == "cuda" else CPU_SHAPES
    env = common.environment(device)
    payload = {"env": env, "results": [], "completed": {"shapes": 0}}
    todo = [(f, s, d) for f in args.forms for s in shapes[f] for d in args.dtypes]
    with common.progress(len(todo), "model norms") as bar:
        for form, shape, dtype in todo:
            payload["results"].append(measure(form, shape, dtype, device, args.rep_ms))
            payload["completed"]["shapes"] += 1
            bar.update(1)
    return common.write_results(payload, "model_norms", args.out, report, plot, "the original module",
                                len(todo))


if __name__ == "__main__":
    raise SystemExit(main())
