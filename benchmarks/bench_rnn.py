#!/usr/bin/env python
"""Layer-normalized RNN speed: ln_ext.LayerNormLSTM / LayerNormGRU against cuDNN nn.LSTM / nn.GRU
(no layer norm: the speed a user gives up today by choosing LN) and against the same equations
written as a naive composition of nn modules (nn.Linear + nn.LayerNorm per step, Python loop).

Forward (inference, no autograd graph) and forward+backward (gradients of the input and every
parameter) times, single layer, input size = hidden size. Each provider's output on the first
steps of the timed input is first compared with a float64 CPU copy of the same module.

Writes <out>/rnn.json, rnn.md and rnn.png (see benchmarks/README.md).

    python benchmarks/bench_rnn.py             # GPU: T=128, B=64, H in {256, 512, 1024}, fp32 and bf16
    python benchmarks/bench_rnn.py --quick     # H=1024 only
"""
from __future__ import annotations

import argparse
import copy
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import common  # first: puts the repository root on sys.path
import torch
from common import DTYPES, TOLERANCE
from torch import nn

CELLS = ("lstm", "gru")
GPU_DEFAULTS = dict(dtypes=["fp32", "bf16"], hidden=[256, 512, 1024], seq_len=128, batch=64)
GPU_QUICK = dict(GPU_DEFAULTS, hidden=[1024])
CPU_DEFAULTS = dict(dtypes=["fp32"], hidden=[128, 256], seq_len=32, batch=16)
CPU_QUICK = dict(CPU_DEFAULTS, hidden=[128], seq_len=16)
MODES = ("fwd", "fwd_bwd")
CHECK_STEPS, CHECK_BATCH = 8, 4  # the slice of the timed input checked against float64


# ----------------------------------------------------------------------------- naive baseline


class NaiveLayerNormLSTM(nn.Module):
    """LN-LSTM (Ba et al. 2016, supplement) as a user writes it from nn modules, one step at a time:

        [i, f, o, u] = LN(W_h h_{t-1}; g_h, b_h) + LN(W_x x_t; g_x, b_x) + b   (each LN over 4H)
        c_t = σ(f) ⊙ c_{t-1} + σ(i) ⊙ tanh(u)
        h_t = σ(o) ⊙ tanh(LN(c_t; g_c, b_c))
    """

    def __init__(self, input_size: int, hidden_size: int, eps: float = 1e-5, device=None, dtype=None):
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        self.hidden_size = hidden_size
        self.w_x = nn.Linear(input_size, 4 * hidden_size, bias=False, **kw)
        self.w_h = nn.Linear(hidden_size, 4 * hidden_size, bias=False, **kw)
        self.ln_x = nn.LayerNorm(4 * hidden_size, eps=eps, **kw)
        self.ln_h = nn.LayerNorm(4 * hidden_size, eps=eps, **kw)
        self.ln_c = nn.LayerNorm(hidden_size, eps=eps, **kw)
        self.bias = nn.Parameter(torch.zeros(4 * hidden_size, **kw))

    def forward(self, x: torch.Tensor, hx=None):
        """x: [T, B, input_size] -> (out [T, B, H], (h [1, B, H], c [1, B, H])), as nn.LSTM."""
        batch = x.shape[1]
        if hx is None:
            h = c = x.new_zeros(batch, self.hidden_size)
        else:
            h, c = hx[0][0], hx[1][0]
        outputs = []
        for x_t in x:
            gates = self.ln_h(self.w_h(h)) + self.ln_x(self.w_x(x_t)) + self.bias
            i, f, o, u = gates.chunk(4, dim=1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(u)
            h = torch.sigmoid(o) * torch.tanh(self.ln_c(c))
            outputs.append(h)
        return torch.stack(outputs), (h.unsqueeze(0), c.unsqueeze(0))


class NaiveLayerNormGRU(nn.Module):
    """LN-GRU (Ba et al. 2016, supplement) from nn modules, one step at a time:

        [z, r] = LN(W_h h_{t-1}) + LN(W_x x_t)                  (each LN over 2H)
        ĥ = tanh(LN(W x_t) + σ(r) ⊙ LN(U h_{t-1}))               (each LN over H)
        h_t = (1 - σ(z)) ⊙ h_{t-1} + σ(z) ⊙ ĥ

    The x projections [W_x; W] and the h projections [W_h; U] are one nn.Linear each,
    as in nn.GRU.
    """

    def __init__(self, input_size: int, hidden_size: int, eps: float = 1e-5, device=None, dtype=None):
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        self.hidden_size = hidden_size
        self.w_x = nn.Linear(input_size, 3 * hidden_size, bias=False, **kw)
        self.w_h = nn.Linear(hidden_size, 3 * hidden_size, bias=False, **kw)
        self.ln_x_zr = nn.LayerNorm(2 * hidden_size, eps=eps, **kw)
        self.ln_h_zr = nn.LayerNorm(2 * hidden_size, eps=eps, **kw)
        self.ln_x_n = nn.LayerNorm(hidden_size, eps=eps, **kw)
        self.ln_h_n = nn.LayerNorm(hidden_size, eps=eps, **kw)

    def forward(self, x: torch.Tensor, hx=None):
        """x: [T, B, input_size] -> (out [T, B, H], h [1, B, H]), as nn.GRU."""
        two_h = 2 * self.hidden_size
        h = x.new_zeros(x.shape[1], self.hidden_size) if hx is None else hx[0]
        outputs = []
        for x_t in x:
            a_x, a_h = self.w_x(x_t), self.w_h(h)
            z, r = (self.ln_h_zr(a_h[:, :two_h]) + self.ln_x_zr(a_x[:, :two_h])).chunk(2, dim=1)
            candidate = torch.tanh(self.ln_x_n(a_x[:, two_h:]) + torch.sigmoid(r) * self.ln_h_n(a_h[:, two_h:]))
            z = torch.sigmoid(z)
            h = (1 - z) * h + z * candidate
            outputs.append(h)
        return torch.stack(outputs), h.unsqueeze(0)


# ----------------------------------------------------------------------------- providers


def build_ln_ext(cell: str, hidden: int, device, dtype) -> nn.Module:
    import ln_ext

    cls = getattr(ln_ext, {"lstm": "LayerNormLSTM", "gru": "LayerNormGRU"}[cell])
    return cls(hidden, hidden, device=device, dtype=dtype)


def build_torch(cell: str, hidden: int, device, dtype) -> nn.Module:
    return {"lstm": nn.LSTM, "gru": nn.GRU}[cell](hidden, hidden, device=device, dtype=dtype)


def build_naive(cell: str, hidden: int, device, dtype) -> nn.Module:
    return {"lstm": NaiveLayerNormLSTM, "gru": NaiveLayerNormGRU}[cell](hidden, hidden, device=device, dtype=dtype)


@dataclass
class Provider:
    name: str
    label: str
    build: object


PROVIDERS = [
    Provider("ln_ext", "ln_ext", build_ln_ext),
    Provider("torch", "nn.LSTM / nn.GRU (no LN)", build_torch),
    Provider("naive", "naive nn modules", build_naive),
]
BY_NAME = {p.name: p for p in PROVIDERS}


def ln_ext_missing() -> Optional[str]:
    try:
        import ln_ext
    except Exception as exc:  # noqa: BLE001
        return f"ln_ext does not import: {type(exc).__name__}: {exc}".splitlines()[0]
    # With one of the two, the other cell's rows say n/a with the reason.
    if not any(hasattr(ln_ext, n) for n in ("LayerNormLSTM", "LayerNormGRU")):
        return "this ln_ext has no LayerNormLSTM / LayerNormGRU yet"
    return None


# ----------------------------------------------------------------------------- one shape


def check(module: nn.Module, x: torch.Tensor, hidden: int, tf32: bool) -> dict:
    """The module on the first steps of x in its own dtype and device, against a float64
    CPU copy of itself: catches GPU kernels that differ from the module's CPU path, NaN/Inf,
    and outputs not shaped [T, B, H] like nn.LSTM's / nn.GRU's."""
    x = x[:CHECK_STEPS, :CHECK_BATCH]
    with torch.no_grad():
        out, state = module(x)
        ref_out, ref_state = copy.deepcopy(module).to(device="cpu", dtype=torch.float64)(x.cpu().double())
    # A few steps of recurrence compound the rounding; TF32 rounds float32 GEMM inputs to
    # 10 mantissa bits, like float16.
    tol_dtype = torch.float16 if tf32 and x.dtype == torch.float32 else x.dtype
    tol = 2 * TOLERANCE[tol_dtype][1]
    states, ref_states = (state, ref_state) if isinstance(state, tuple) else ((state,), (ref_state,))
    ratios = {"output": common.error_ratio(out, ref_out, tol)}
    for i, (s, r) in enumerate(zip(states, ref_states)):
        ratios[f"state{i}"] = common.error_ratio(s, r, tol)
    shapes_ok = out.shape == ref_out.shape == (*x.shape[:2], hidden) and len(states) == len(ref_states)
    return {"ok": shapes_ok and all(v <= 1 for v in ratios.values()), "error_ratio": ratios}


def run_shape(cell, dtype, hidden, providers, device, args, bar) -> list[dict]:
    """Every provider on one shape: built and checked first, then each mode's calls timed in
    interleaved rounds (common.interleaved_ms), so that their ratios come from the same
    spells of this machine."""
    x_dtype = DTYPES[dtype][0]
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(args.seq_len, args.batch, hidden, generator=g, device=device).to(x_dtype)
    dout = torch.randn(args.seq_len, args.batch, hidden, generator=g, device=device).to(x_dtype)
    records, ready = [], []
    for provider in providers:
        base = dict(kind="rnn", cell=cell, dtype=dtype, T=args.seq_len, B=args.batch, H=hidden, provider=provider.name)
        bar.set_postfix_str(f"{cell} {dtype} H={hidden} {provider.name}")
        try:
            torch.manual_seed(0)
            module = provider.build(cell, hidden, device, x_dtype)
            verdict = check(module, x, hidden, args.tf32)
        except Exception as exc:  # noqa: BLE001
            records.append(dict(base, mode="all", error=f"{type(exc).__name__}: {exc}".splitlines()[0][:300]))
            bar.update(len(MODES))
            continue
        if not verdict["ok"]:
            print(f"\nMISMATCH: {provider.name} {cell} {dtype} H={hidden}: {verdict}", file=sys.stderr)
        ready.append((base, module, verdict))

    def forward(module):
        def call():
            with torch.no_grad():
                return module(x)
        return call

    def forward_backward(module):
        xg = x.detach().requires_grad_()
        inputs = [xg, *module.parameters()]

        def call():
            out, _ = module(xg)
            return torch.autograd.grad(out, inputs, dout, allow_unused=True)
        return call

    for mode, make_call in (("fwd", forward), ("fwd_bwd", forward_backward)):
        timed = []
        for base, module, verdict in ready:
            call = make_call(module)
            try:
                call()
            except Exception as exc:  # noqa: BLE001
                records.append(dict(base, mode=mode, error=f"{type(exc).__name__}: {exc}".splitlines()[0][:300]))
            else:
                timed.append((base, verdict, call))
        times = common.interleaved_ms([call for _, _, call in timed], device, rep_ms=args.rep_ms * len(timed),
                                      warmup_ms=args.warmup_ms)
        for (base, verdict, _), ms in zip(timed, times):
            records.append(dict(base, mode=mode, ms=ms, correct=verdict["ok"], check=verdict))
        bar.update(len(ready))
    return records


def inference_path(cell, dtype, hidden, device, args) -> list[dict]:
    """ln_ext's sequence op under no_grad as it runs now (save=False: nothing kept for a
    backward) and as it ran before issue 21 (save=True: every step's hproj, gates and
    statistics computed, stored and returned): time per call and the bytes its results hold."""
    from ln_ext import rnn as lnrnn

    mode = cell.upper()
    x_dtype = DTYPES[dtype][0]
    torch.manual_seed(0)
    module = build_ln_ext(cell, hidden, device, x_dtype)
    x = torch.randn(args.seq_len, args.batch, hidden, device=device).to(x_dtype)
    states = tuple(x.new_zeros(args.batch, hidden) for _ in range(2 if mode == "LSTM" else 1))
    op = getattr(torch.ops.ln_ext, f"{cell}_sequence_fwd")
    records = []
    with torch.no_grad():
        q = lnrnn._prepare(mode, module.layer_parameters(0, 0), hidden, x)
        xs = lnrnn._project_inputs(mode, x, q, hidden, module.eps)

        def call_saving(save):
            extra = (save, None) if mode == "LSTM" else (save,)
            return lambda: op(*xs, q["weight_hh"], *states, *lnrnn._cell_params(mode, q), None, False,
                              module.eps, *extra)

        calls = [call_saving(False), call_saving(True)]
        held = [sum(t.numel() * t.element_size() for t in call()) for call in calls]
        times = common.interleaved_ms(calls, device, rep_ms=2 * args.rep_ms, warmup_ms=args.warmup_ms)
        for save, ms, nbytes in zip((False, True), times, held):
            records.append(dict(kind="rnn_inference_path", cell=cell, dtype=dtype, T=args.seq_len, B=args.batch,
                                H=hidden, provider="ln_ext", mode="saving" if save else "inference", ms=ms,
                                bytes_held=nbytes))
    return records


def inference_path_markdown(records: list[dict]) -> list[str]:
    rows = []
    for r in records:
        if r.get("kind") != "rnn_inference_path" or r["mode"] != "inference":
            continue
        before = next(b for b in records if b.get("kind") == r["kind"] and b["mode"] == "saving"
                      and (b["cell"], b["dtype"], b["H"]) == (r["cell"], r["dtype"], r["H"]))
        rows.append([r["cell"], r["dtype"], r["H"], common.fmt_ms(before["ms"]), common.fmt_ms(r["ms"]),
                     f"{before['bytes_held'] / 2**20:.2f} MiB", f"{r['bytes_held'] / 2**20:.2f} MiB"])
    if not rows:
        return []
    headers = ["cell", "dtype", "H", "time, saving (before)", "time, inference path", "results hold, saving",
               "results hold, inference path"]
    return ["### inference path: the sequence op under no_grad, saving for a backward (as before) and not", "",
            "One layer-direction's sequence op (ln_ext.ops' `<cell>_sequence_fwd`), called with `save=True` "
            "(what every call did before the inference path) and `save=False` (what no_grad calls run now); "
            "bytes: the tensors the op returns.", "", common.markdown_table(headers, rows), ""]


def add_relative_numbers(records: list[dict]) -> None:
    """ln_ext time / nn.LSTM time (target <= 1.25) and naive time / each provider's time."""
    key = lambda r: (r["cell"], r["dtype"], r["H"], r["mode"])  # noqa: E731
    timed = [r for r in records if "ms" in r]
    torch_ms = {key(r): r["ms"] for r in timed if r["provider"] == "torch"}
    naive_ms = {key(r): r["ms"] for r in timed if r["provider"] == "naive"}
    for r in timed:
        if key(r) in torch_ms:
            r["time_vs_torch"] = r["ms"] / torch_ms[key(r)]
        if key(r) in naive_ms:
            r["speedup_vs_naive"] = naive_ms[key(r)] / r["ms"]


# ----------------------------------------------------------------------------- reports


def _lookup(records, cell, dtype, hidden, provider, mode) -> Optional[dict]:
    for r in records:
        if (r["cell"], r["dtype"], r["H"], r["provider"]) == (cell, dtype, hidden, provider) and r["mode"] in (mode, "all"):
            return r
    return None


def _cell(r: Optional[dict]) -> str:
    if r is None:
        return "—"
    if "error" in r:
        return "n/a"
    return common.fmt_ms(r["ms"]) + ("" if r["correct"] else " " + common.MISMATCH)


def markdown_report(payload: dict) -> str:
    env, cfg, records = payload["env"], payload["config"], payload["results"]
    names = [p for p in payload["providers"] if payload["providers"][p]["available"]]
    labels = {p: payload["providers"][p]["label"] for p in payload["providers"]}
    done = payload["completed"]
    interrupted = ([f"**Interrupted: {done['shapes']} of {done['of']} shapes measured.**", ""]
                   if done["shapes"] < done["of"] else [])
    out = [f"## LN-RNN: {common.card_name(env)}", "", common.header_line(env), "", *interrupted,
           f"T = {cfg['seq_len']}, B = {cfg['batch']}, input size = hidden size H, one layer. "
           f"Timing: {payload['timing']}, the best of 5 rounds that interleave the providers. Forward: inference (no autograd graph); forward + backward: "
           f"gradients of the input and every parameter. TF32: matmul {env.get('tf32_matmul')}, "
           f"cuDNN {env.get('tf32_cudnn')}."]
    if payload["missing"]:
        out.append("Not measured: " + "; ".join(f"{labels[p]} ({why})" for p, why in payload["missing"].items()) + ".")
    notes = common.mismatch_notes(
        records, lambda r: f"{labels[r['provider']]} {r['cell']} {r['dtype']} H={r['H']}")
    notes += common.error_notes(records, lambda p: labels[p])
    if notes:
        out += ["", f"**Notes** ({common.MISMATCH}: outputs missed their float64 CPU copy; n/a: the provider "
                "failed):", ""] + notes
    out.append("")
    for mode in MODES:
        headers = ["cell", "dtype", "H"] + [labels[p] for p in names]
        # Targets (issues 13 and 21): LN-LSTM within 1.25x of nn.LSTM, forward + backward and
        # inference alike; the naive module composition at least 2x slower than ln_ext.
        if "ln_ext" in names and "torch" in names:
            headers.append("ln_ext / nn (target ≤ 1.25×)")
        if "ln_ext" in names and "naive" in names:
            headers.append("naive / ln_ext (target ≥ 2×)")
        rows = []
        for cell in cfg["cells"]:
            for dtype in cfg["dtypes"]:
                for hidden in cfg["hidden"]:
                    row = [cell, dtype, hidden] + [_cell(_lookup(records, cell, dtype, hidden, p, mode)) for p in names]
                    ours = _lookup(records, cell, dtype, hidden, "ln_ext", mode) or {}
                    mark = " " + common.MISMATCH if ours.get("correct") is False else ""
                    if "ln_ext" in names and "torch" in names:
                        row.append(common.fmt_ratio(ours.get("time_vs_torch")) + mark)
                    if "ln_ext" in names and "naive" in names:
                        row.append(common.fmt_ratio(ours.get("speedup_vs_naive")) + mark)
                    rows.append(row)
        title = "forward (inference)" if mode == "fwd" else "forward + backward"
        out += [f"### {title}, time per call", "", common.markdown_table(headers, rows), ""]
    out += inference_path_markdown(records)
    return "\n".join(out)


def plot(payload: dict, path: Path) -> Optional[Path]:
    """Time against H, one panel per (cell, dtype): fwd+bwd solid, fwd dashed, log scale.
    Timings whose outputs missed the float64 check are ringed in red."""
    plt = common.pyplot()
    if plt is None:
        print("matplotlib is not installed: no plot", file=sys.stderr)
        return None
    cfg, records = payload["config"], [r for r in payload["results"] if "ms" in r]
    panels = [(c, d) for c in cfg["cells"] for d in cfg["dtypes"]]
    names = [p for p in payload["providers"] if payload["providers"][p]["available"]]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 4.8), squeeze=False)
    for ax, (cell, dtype) in zip(axes[0], panels):
        for p in names:
            color = f"C{list(BY_NAME).index(p)}"  # stable across runs with different providers
            for mode, style in (("fwd_bwd", "-"), ("fwd", "--")):
                pts = sorted((r["H"], r["ms"], r["correct"]) for r in records
                             if (r["cell"], r["dtype"], r["provider"], r["mode"]) == (cell, dtype, p, mode))
                if pts:
                    label = f"{payload['providers'][p]['label']} {'fwd+bwd' if mode == 'fwd_bwd' else 'fwd'}"
                    ax.plot([h for h, _, _ in pts], [ms for _, ms, _ in pts], ls=style, marker="o", ms=4,
                            color=color, label=label, lw=2.2 if p == "ln_ext" else 1.2)
                wrong = [(h, ms) for h, ms, ok in pts if not ok]
                if wrong:
                    ax.plot(*zip(*wrong), ls="none", marker="o", ms=11, mfc="none", mec="red", mew=1.5,
                            label=f"{common.MISMATCH} missed the float64 check")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(f"{cell.upper()}, {dtype}, T={cfg['seq_len']}, B={cfg['batch']}")
        ax.set_xlabel("hidden size H")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].set_ylabel("ms per call")
    env = payload["env"]
    fig.suptitle(f"LN-RNN: {common.card_name(env)} ({env['date_utc']}, torch {env['torch']})", fontsize=10)
    common.figure_legend(fig, axes)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------- main


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cells", type=common.csv_list(), default=list(CELLS), help="lstm,gru")
    p.add_argument("--dtypes", type=common.csv_list(), help="fp32,bf16,fp16,fp64 (default: by device)")
    p.add_argument("--hidden", type=common.csv_list(int), help="hidden sizes H (default: by device)")
    p.add_argument("--seq-len", type=int, help="T (GPU 128, CPU 32)")
    p.add_argument("--batch", type=int, help="B (GPU 64, CPU 16)")
    p.add_argument("--providers", type=common.csv_list(), default=[q.name for q in PROVIDERS],
                   help="ln_ext,torch,naive")
    p.add_argument("--quick", action="store_true", help="H = 1024 only (CPU: H = 128, T = 16)")
    p.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    p.add_argument("--tf32", action="store_true", help="allow TF32 in float32 matmuls and cuDNN")
    p.add_argument("--rep-ms", type=float, help="time budget per measurement (default 100, quick 40)")
    p.add_argument("--warmup-ms", type=float, default=25)
    p.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's choice)")
    p.add_argument("--out", type=Path, help="output folder (default benchmarks/results/<card>)")
    args = p.parse_args(argv)
    for c in args.cells:
        if c not in CELLS:
            p.error(f"--cells: unknown cell {c!r}; choose from {list(CELLS)}")
    for d in args.dtypes or []:
        if d not in DTYPES or d == "mixed":
            p.error(f"--dtypes: {d!r} is not one of fp32, bf16, fp16, fp64")
    for name in args.providers:
        if name not in BY_NAME:
            p.error(f"--providers: unknown provider {name!r}; choose from {list(BY_NAME)}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    device = common.pick_device(args.device)
    on_gpu = device.type == "cuda"
    # As the LayerNorm benchmarks: malloc keeps freed memory, so the timings compare the
    # layers, not page faults of fresh mmap'd outputs (with glibc's default thresholds
    # LN-LSTM at H = 128 was ~20% slower, nn.LSTM ~5%: ln_ext allocates its saved tensors).
    if not on_gpu and argv is None:  # run as a script (not called from another program)
        common.rerun_with_steady_malloc()
    defaults = (GPU_QUICK if args.quick else GPU_DEFAULTS) if on_gpu else (CPU_QUICK if args.quick else CPU_DEFAULTS)
    args.dtypes = args.dtypes or defaults["dtypes"]
    args.hidden = args.hidden or defaults["hidden"]
    args.seq_len = args.seq_len or defaults["seq_len"]
    args.batch = args.batch or defaults["batch"]
    args.rep_ms = args.rep_ms or (40 if args.quick else 100)
    if on_gpu:
        torch.cuda.set_device(device)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = bool(args.tf32)

    env = common.environment(device)
    env.update(tf32_matmul=torch.backends.cuda.matmul.allow_tf32, tf32_cudnn=torch.backends.cudnn.allow_tf32)
    missing, providers = {}, []
    for p in PROVIDERS:
        if p.name not in args.providers:
            continue
        reason = ln_ext_missing() if p.name == "ln_ext" else None
        if reason:
            missing[p.name] = reason
        else:
            providers.append(p)
    provider_info = {p.name: {"label": p.label, "available": p in providers} for p in PROVIDERS}
    if on_gpu:
        provider_info["torch"]["label"] = "nn.LSTM / nn.GRU (cuDNN, no LN)"

    print(common.header_line(env), file=sys.stderr)
    if missing:
        print("not measured: " + "; ".join(f"{k} ({v})" for k, v in missing.items()), file=sys.stderr)
    shapes = [(c, d, h) for c in args.cells for d in args.dtypes for h in args.hidden]
    bar = common.progress(len(shapes) * len(providers) * len(MODES), "rnn")
    records, done = [], 0
    try:
        with common.sigterm_as_interrupt():
            for cell, dtype, hidden in shapes:
                records += run_shape(cell, dtype, hidden, providers, device, args, bar)
                if any(p.name == "ln_ext" for p in providers):
                    records += inference_path(cell, dtype, hidden, device, args)
                done += 1
                if on_gpu:
                    torch.cuda.empty_cache()
    except KeyboardInterrupt:
        print(f"\ninterrupted: writing the {done} of {len(shapes)} shapes finished", file=sys.stderr)
    bar.close()
    add_relative_numbers(records)

    payload = {
        "schema": "ln_ext.bench.rnn/1",
        "env": env,
        "timing": common.timing_method(device),
        "config": {"cells": args.cells, "dtypes": args.dtypes, "hidden": args.hidden, "seq_len": args.seq_len,
                   "batch": args.batch, "rep_ms": args.rep_ms, "quick": args.quick},
        "providers": provider_info,
        "missing": missing,
        "completed": {"shapes": done, "of": len(shapes)},
        "results": records,
    }
    return common.write_results(payload, "rnn", args.out, markdown_report, plot, "their float64 CPU copy", len(shapes))


if __name__ == "__main__":
    sys.exit(main())
