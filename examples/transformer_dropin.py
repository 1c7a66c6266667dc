"""ln_ext as a drop-in on a real Transformer: convert, check, time, profile, checkpoint.

A GPT-2-small-like language model (token + position embeddings, a pre-norm
`torch.nn.TransformerEncoder` with a causal mask, a final LayerNorm, an LM head) is built
with `nn.LayerNorm`, then `ln_ext.convert_layer_norm` swaps every LayerNorm in it for
`ln_ext.LayerNorm`. The script shows, on the GPU when there is one and on the CPU otherwise:

  1. outputs and gradients of the converted model are as close to a float64 copy of the
     model as the unconverted model's are (bf16 autocast on GPU, float32 on CPU);
  2. training steps per second before and after, eager and under torch.compile;
  3. the share of the step's op time spent in LayerNorm (torch.profiler), before and after;
  4. a checkpoint saved from either model loads (strict) into the other;
  5. the same model written with its residual adds next to the norms (a pre-norm block as
     GPT-2 code writes it): add-then-norm with nn.LayerNorm, with ln_ext.LayerNorm, and
     ln_ext's fused add + norm (`norm(delta, residual=h) -> (y, h)`, one pass instead of an
     add and a norm): agreement with float64 and training steps/s, side by side.

Sizes: on a GPU, GPT-2 small (12 layers, d_model 768, 12 heads, vocab 50257, 8 x 1024
tokens); on the CPU a small model (2 layers, d_model 256) so the whole run takes about a
minutes on 2 cores, torch.compile included (--no-compile skips it; its first step, the
compilation, is reported separately and not in the steps/s). Dropout is 0 so that the two
models compute the same function. The data is random tokens: this measures speed and
agreement, not learning.

Run:  python examples/transformer_dropin.py [--device auto|cpu|cuda] [--no-compile] [--threads N] [--smoke]
Writes examples/results/transformer_dropin_<device>.json and .md (--out to change).

Note for inference: in eval mode under torch.no_grad(), nn.TransformerEncoderLayer takes
a fused "fast path" (torch._transformer_encoder_layer_fwd) that reads the LayerNorm
weights directly and never calls the LayerNorm modules, so no LayerNorm implementation
swapped in by conversion runs there. `torch.backends.mha.set_fastpath_enabled(False)`
makes the layers call their modules (this script does so when it runs inference).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import io
import os
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.profiler import ProfilerActivity, profile

import ln_ext

from _report import environment, markdown_header, markdown_table, pick_device, write_results


@dataclass(frozen=True)
class Config:
    vocab: int
    seq_len: int
    batch: int
    layers: int
    d_model: int
    heads: int
    autocast_bf16: bool  # bf16 autocast (GPU) or plain float32
    warmup_steps: int  # per model, before timing (includes compilation)
    timed_steps: int  # per round
    rounds: int  # rounds alternate between the models; the best round counts
    profile_steps: int


CONFIGS = {
    "cuda": Config(vocab=50257, seq_len=1024, batch=8, layers=12, d_model=768, heads=12, autocast_bf16=True,
                   warmup_steps=5, timed_steps=20, rounds=5, profile_steps=5),
    "cpu": Config(vocab=1024, seq_len=128, batch=8, layers=2, d_model=256, heads=4, autocast_bf16=False,
                  warmup_steps=2, timed_steps=3, rounds=7, profile_steps=3),
    "smoke": Config(vocab=64, seq_len=16, batch=2, layers=1, d_model=32, heads=2, autocast_bf16=False,
                    warmup_steps=1, timed_steps=2, rounds=1, profile_steps=1),
}


class GPTLike(nn.Module):
    """Decoder-only language model built from stock PyTorch modules (pre-norm, causal)."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.tok = nn.Embedding(cfg.vocab, cfg.d_model)
        self.pos = nn.Embedding(cfg.seq_len, cfg.d_model)
        layer = nn.TransformerEncoderLayer(
            cfg.d_model, cfg.heads, dim_feedforward=4 * cfg.d_model, dropout=0.0,
            activation="gelu", batch_first=True, norm_first=True,
        )
        # enable_nested_tensor only applies to post-norm layers; False silences its warning.
        self.blocks = nn.TransformerEncoder(layer, cfg.layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.vocab, bias=False)
        mask = nn.Transformer.generate_square_subsequent_mask(cfg.seq_len)
        self.register_buffer("causal_mask", mask, persistent=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        # tokens: [B, T] -> logits: [B, T, vocab]
        t = tokens.shape[1]
        x = self.tok(tokens) + self.pos(torch.arange(t, device=tokens.device))
        x = self.blocks(x, mask=self.causal_mask[:t, :t], is_causal=True)
        return self.head(self.norm(x))


def add_then_norm(norm: nn.Module, delta: torch.Tensor, residual, fused: bool):
    """h = delta + residual, y = norm(h); returns (y, h). fused: one ln_ext call does both."""
    if residual is None:  # the first norm of the stack: the residual stream is the embedding
        return norm(delta), delta
    if fused:
        return norm(delta, residual=residual)
    h = delta + residual
    return norm(h), h


class PreNormBlock(nn.Module):
    """A pre-norm Transformer block that hands its residual stream to the next norm.

    forward(delta, residual) -> (delta', h): h = residual + delta is the stream before this
    block's attention; the block's MLP output delta' is added by the next norm. Computes
    what nn.TransformerEncoderLayer(norm_first=True) computes, with the adds moved into
    the norms, where a fused add + norm can take them.
    """

    def __init__(self, d_model: int, heads: int):
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = nn.MultiheadAttention(d_model, heads, dropout=0.0, batch_first=True)
        self.ln2 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(nn.Linear(d_model, 4 * d_model), nn.GELU(), nn.Linear(4 * d_model, d_model))

    def forward(self, delta, residual, mask, fused: bool):
        y, h = add_then_norm(self.ln1, delta, residual, fused)
        attn, _ = self.attn(y, y, y, attn_mask=mask, is_causal=True, need_weights=False)
        y, h = add_then_norm(self.ln2, attn, h, fused)
        return self.mlp(y), h


class PreNormGPT(GPTLike):
    """GPTLike with its blocks written out (PreNormBlock); `fused_add` needs ln_ext norms."""

    def __init__(self, cfg: Config, fused_add: bool = False):
        super().__init__(cfg)
        self.fused_add = fused_add
        self.blocks = nn.ModuleList(PreNormBlock(cfg.d_model, cfg.heads) for _ in range(cfg.layers))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        t = tokens.shape[1]
        delta, residual = self.tok(tokens) + self.pos(torch.arange(t, device=tokens.device)), None
        for block in self.blocks:
            delta, residual = block(delta, residual, self.causal_mask[:t, :t], self.fused_add)
        y, _ = add_then_norm(self.norm, delta, residual, self.fused_add)
        return self.head(y)


def autocast(cfg: Config, device: torch.device, enabled: bool = True):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled and cfg.autocast_bf16)


def lm_loss(model: nn.Module, tokens: torch.Tensor, cfg: Config, device: torch.device, amp: bool = True):
    # tokens: [B, T + 1]; predict each next token.
    with autocast(cfg, device, enabled=amp):
        logits = model(tokens[:, :-1])
    loss = F.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten())
    return logits, loss


def train_step(model, optimizer, tokens, cfg, device):
    _, loss = lm_loss(model, tokens, cfg, device)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def inference_mode_through_modules():
    """eval + no_grad with the encoder fast path off, so the LayerNorm modules really run."""
    was = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with torch.no_grad():
            yield
    finally:
        torch.backends.mha.set_fastpath_enabled(was)


def count_layer_norms(model: nn.Module) -> dict[str, int]:
    kinds = [type(m) for m in model.modules() if isinstance(m, nn.LayerNorm)]
    return {"nn.LayerNorm": kinds.count(nn.LayerNorm), "ln_ext.LayerNorm": kinds.count(ln_ext.LayerNorm)}


# ---------------------------------------------------------------- 1. agreement
def rel_l2(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a.double() - ref).norm() / ref.norm().clamp_min(1e-300)).item()


def check_agreement(model_nn, model_ln, tokens, cfg, device) -> dict:
    """Error of each model against a float64 copy: logits and every parameter gradient.

    ln_ext passes when its error is at most twice nn.LayerNorm's (plus a floor at the
    precision's rounding level): it is then as accurate as what it replaces.
    """
    reference = copy.deepcopy(model_nn).double()
    results = {}
    for name, model, amp in (("float64", reference, False), ("nn.LayerNorm", model_nn, True), ("ln_ext", model_ln, True)):
        model.zero_grad(set_to_none=True)
        logits, loss = lm_loss(model, tokens, cfg, device, amp=amp)
        loss.backward()
        grads = {n: p.grad.detach().double() for n, p in model.named_parameters()}
        results[name] = (logits.detach().double(), grads)
        model.zero_grad(set_to_none=True)
    del reference
    ref_logits, ref_grads = results["float64"]

    def errors(name):
        logits, grads = results[name]
        grad_err = {n: rel_l2(g, ref_grads[n]) for n, g in grads.items()}
        worst = max(grad_err, key=grad_err.get)
        return {"logits": rel_l2(logits, ref_logits), "worst_grad": grad_err[worst], "worst_grad_param": worst}

    err_nn, err_ln = errors("nn.LayerNorm"), errors("ln_ext")
    floor = 1e-3 if cfg.autocast_bf16 else 1e-6
    passed = all(err_ln[k] <= 2 * err_nn[k] + floor for k in ("logits", "worst_grad"))
    logits_nn, grads_nn = results["nn.LayerNorm"]
    logits_ln, grads_ln = results["ln_ext"]
    direct = {
        "logits": rel_l2(logits_ln, logits_nn),
        "worst_grad": max(rel_l2(grads_ln[n], grads_nn[n]) for n in grads_nn),
    }
    return {"error_vs_float64": {"nn.LayerNorm": err_nn, "ln_ext": err_ln},
            "ln_ext_vs_nn": direct, "floor": floor, "passed": passed}


# ---------------------------------------------------------------- 4. checkpoints
def check_checkpoints(model_nn, model_ln, tokens, cfg, device) -> dict:
    """state_dict saved from each model loads strictly into a fresh model of the other kind,
    which then computes what the saved model computes."""
    def round_trip(source, make_target):
        buffer = io.BytesIO()
        torch.save(source.state_dict(), buffer)
        buffer.seek(0)
        target = make_target()
        incompatible = target.load_state_dict(torch.load(buffer, weights_only=True), strict=True)
        source.eval()
        target.eval()
        with inference_mode_through_modules(), autocast(cfg, device):
            diff = rel_l2(target(tokens[:, :-1]), source(tokens[:, :-1]).double())
        source.train()
        return {"strict_load": not incompatible.missing_keys and not incompatible.unexpected_keys,
                "keys": len(source.state_dict()), "output_rel_diff": diff}

    def fresh_nn():
        return GPTLike(cfg).to(device)

    def fresh_ln():
        return ln_ext.convert_layer_norm(GPTLike(cfg).to(device))

    return {"nn.LayerNorm -> ln_ext": round_trip(model_nn, fresh_ln),
            "ln_ext -> nn.LayerNorm": round_trip(model_ln, fresh_nn)}


# ---------------------------------------------------------------- 2. speed
def measure_training(variants: dict, batches, cfg, device, progress) -> dict:
    """Time per training step (forward, backward, AdamW) of each variant: the best round.

    Rounds alternate between the variants, so drifting machine load hits all alike, and
    the fastest round is the one least disturbed by other work on the machine.
    """
    optimizers = {name: torch.optim.AdamW(model.parameters(), lr=1e-4) for name, model in variants.items()}
    warmup_s = {}
    for name, model in variants.items():
        progress(f"warm-up {name}")
        sync(device)
        start = time.perf_counter()
        for i in range(cfg.warmup_steps):
            train_step(model, optimizers[name], batches[i % len(batches)], cfg, device)
        sync(device)
        warmup_s[name] = time.perf_counter() - start
    step_s = {name: [] for name in variants}
    for r in range(cfg.rounds):
        progress(f"timing round {r + 1}/{cfg.rounds}")
        for name, model in variants.items():
            sync(device)
            start = time.perf_counter()
            for i in range(cfg.timed_steps):
                train_step(model, optimizers[name], batches[i % len(batches)], cfg, device)
            sync(device)
            step_s[name].append((time.perf_counter() - start) / cfg.timed_steps)
    tokens_per_step = cfg.batch * cfg.seq_len
    out = {}
    for name, times in step_s.items():
        best = min(times)
        out[name] = {"step_ms": best * 1e3, "steps_per_s": 1 / best, "tokens_per_s": tokens_per_step / best,
                     "step_ms_all_rounds": [t * 1e3 for t in times], "warmup_s": warmup_s[name]}
    return out


# ---------------------------------------------------------------- 3. profile
def is_layer_norm_op(name: str) -> bool:
    # aten::layer_norm, aten::native_layer_norm(_backward), ln_ext::layer_norm_fwd/bwd,
    # and their autograd nodes.
    name = name.lower()
    return "layer_norm" in name or "layernorm" in name


def layer_norm_share(model, batches, cfg, device) -> dict:
    """Share of the step's op time spent in LayerNorm ops (self time, so nothing counts twice).

    GPU: kernel time (each kernel is attributed to the op that launched it).
    CPU: op self time on the CPU.
    """
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    train_step(model, optimizer, batches[0], cfg, device)  # warm-up outside the profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for i in range(cfg.profile_steps):
            train_step(model, optimizer, batches[i % len(batches)], cfg, device)
        sync(device)
    events = prof.key_averages()
    cpu_ops = [e for e in events if e.device_type == torch.autograd.DeviceType.CPU]
    if device.type == "cuda":
        kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
        total = sum(e.self_device_time_total for e in kernels)
        per_op = {e.key: e.self_device_time_total for e in cpu_ops if is_layer_norm_op(e.key)}
    else:
        total = sum(e.self_cpu_time_total for e in cpu_ops)
        per_op = {e.key: e.self_cpu_time_total for e in cpu_ops if is_layer_norm_op(e.key)}
    per_op = {k: v for k, v in per_op.items() if v > 0}
    ln_us = sum(per_op.values())
    steps = cfg.profile_steps
    return {"share": ln_us / total, "layer_norm_ms_per_step": ln_us / 1e3 / steps,
            "op_ms_per_step": total / 1e3 / steps,
            "layer_norm_ops_ms_per_step": {k: v / 1e3 / steps for k, v in sorted(per_op.items())}}


# ---------------------------------------------------------------- 5. fused residual add
FUSED_VARIANTS = ("nn.LayerNorm, add then norm", "ln_ext, add then norm", "ln_ext, fused add + norm")


def fused_add_comparison(cfg, device, batches, use_compile, progress) -> dict:
    """PreNormGPT three ways, same weights: nn.LayerNorm and ln_ext.LayerNorm after a separate
    add, and ln_ext's fused add + norm; agreement of the fused one with float64, and speed."""
    torch.manual_seed(0)
    add_nn = PreNormGPT(cfg).to(device)
    add_ln = ln_ext.convert_layer_norm(copy.deepcopy(add_nn))
    fused_ln = copy.deepcopy(add_ln)
    fused_ln.fused_add = True
    progress("fused add: agreement with a float64 copy")
    agreement = check_agreement(add_nn, fused_ln, batches[0], cfg, device)
    models = dict(zip(FUSED_VARIANTS, (add_nn, add_ln, fused_ln)))
    variants = {f"{name} eager": copy.deepcopy(model) for name, model in models.items()}
    if use_compile:
        variants.update({f"{name} compiled": torch.compile(copy.deepcopy(model), fullgraph=True)
                         for name, model in models.items()})
    training = measure_training(variants, batches, cfg, device, lambda msg: progress("fused add: " + msg))
    return {"agreement": agreement, "training": training}


def fused_add_markdown(fused: dict) -> str:
    train = fused["training"]
    rows = []
    for name in FUSED_VARIANTS:
        row = [name]
        for mode in ("eager", "compiled"):
            base, this = train.get(f"{FUSED_VARIANTS[0]} {mode}"), train.get(f"{name} {mode}")
            row += ([f"{this['steps_per_s']:.2f}", f"{this['steps_per_s'] / base['steps_per_s']:.2f}x"]
                    if this else ["not run", ""])
        rows.append(row)
    table = markdown_table(["pre-norm blocks (same weights)", "steps/s eager", "vs nn.LayerNorm",
                            "steps/s compiled", "vs nn.LayerNorm"], rows)
    agree = fused["agreement"]
    err = agree["error_vs_float64"]
    return ("\n" + table + f"\nFused add + norm vs float64: {'PASS' if agree['passed'] else 'FAIL'} (logits "
            f"{err['ln_ext']['logits']:.2e}, worst gradient {err['ln_ext']['worst_grad']:.2e}; add-then-nn.LayerNorm "
            f"{err['nn.LayerNorm']['logits']:.2e}, {err['nn.LayerNorm']['worst_grad']:.2e}). The blocks are "
            "written out (PreNormGPT) so each residual add sits next to a norm: `norm(delta, residual=h)` "
            "returns (y, h) in one pass where add-then-norm reads and writes the stream once more.  \n")


# ---------------------------------------------------------------- report
def markdown(results: dict) -> str:
    env, cfg, train, prof, agree, ckpt = (results[k] for k in
                                          ("environment", "config", "training", "profile", "agreement", "checkpoint"))
    precision = "bf16 autocast" if cfg["autocast_bf16"] else "float32"
    title = (f"Drop-in on a {cfg['layers']}-layer Transformer (d_model {cfg['d_model']}, {cfg['heads']} heads, "
             f"{cfg['batch']}x{cfg['seq_len']} tokens, {precision})")
    rows = []
    for mode in ("eager", "compiled"):
        before, after = train.get(f"nn.LayerNorm {mode}"), train.get(f"ln_ext {mode}")
        if before and after:
            rows.append([f"training steps/s, {mode}", f"{before['steps_per_s']:.2f}", f"{after['steps_per_s']:.2f}",
                         f"{after['steps_per_s'] / before['steps_per_s']:.2f}x"])
        else:
            rows.append([f"training steps/s, {mode}", "not run", "not run", ""])
    rows.append(["LayerNorm share of op time (eager, profiler)", f"{prof['nn.LayerNorm']['share']:.1%}",
                 f"{prof['ln_ext']['share']:.1%}", ""])
    rows.append(["LayerNorm ms per step (eager, profiler)", f"{prof['nn.LayerNorm']['layer_norm_ms_per_step']:.2f}",
                 f"{prof['ln_ext']['layer_norm_ms_per_step']:.2f}", ""])
    err = agree["error_vs_float64"]
    rows.append(["rel. error of logits vs float64", f"{err['nn.LayerNorm']['logits']:.2e}",
                 f"{err['ln_ext']['logits']:.2e}", ""])
    rows.append(["rel. error of worst parameter gradient vs float64", f"{err['nn.LayerNorm']['worst_grad']:.2e}",
                 f"{err['ln_ext']['worst_grad']:.2e}", ""])
    table = markdown_table(["", "nn.LayerNorm", "ln_ext", "speed-up"], rows)
    lines = [markdown_header(title, env), table]
    lines.append(f"Agreement: {'PASS' if agree['passed'] else 'FAIL'} (ln_ext's error vs float64 at most 2x "
                 f"nn.LayerNorm's + {agree['floor']:g}); ln_ext vs nn.LayerNorm directly: logits "
                 f"{agree['ln_ext_vs_nn']['logits']:.1e}, worst gradient {agree['ln_ext_vs_nn']['worst_grad']:.1e} "
                 f"(relative L2).  ")
    ck = [f"{k}: {'strict load OK' if v['strict_load'] else 'LOAD FAILED'}, {v['keys']} keys, outputs differ by "
          f"{v['output_rel_diff']:.1e}" for k, v in ckpt.items()]
    lines.append("Checkpoints: " + "; ".join(ck) + ".  ")
    lines.append(f"Converted {results['layer_norms_converted']} LayerNorms. Steps/s: best of {cfg['rounds']} rounds of "
                 f"{cfg['timed_steps']} steps (forward, backward, AdamW); compiled = torch.compile(model, fullgraph=True), "
                 "compilation excluded. Profile shares: " +
                 ("GPU kernel time." if env["device"] == "cuda" else "CPU op self time."))
    if "fused_add" in results:
        lines.append(fused_add_markdown(results["fused_add"]))
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="auto", help="auto (GPU if present), cpu or cuda")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile timings")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    parser.add_argument("--smoke", action="store_true", help="tiny model, few steps, no compile: seconds (for CI)")
    parser.add_argument("--out", default=None, help="results folder (default: examples/results next to this script)")
    args = parser.parse_args(argv)

    device = pick_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = CONFIGS["smoke" if args.smoke else device.type]
    use_compile = not (args.no_compile or args.smoke)

    def progress(msg):
        print(f"[transformer_dropin] {msg}", flush=True)

    torch.manual_seed(0)
    model_nn = GPTLike(cfg).to(device)
    # --8<-- [start:dropin]
    model_ln = ln_ext.convert_layer_norm(copy.deepcopy(model_nn))  # same weights, ln_ext.LayerNorm inside
    # --8<-- [end:dropin]
    counts = count_layer_norms(model_ln)
    assert counts["nn.LayerNorm"] == 0, counts
    progress(f"{device.type}: converted {counts['ln_ext.LayerNorm']} LayerNorms; "
             f"{sum(p.numel() for p in model_nn.parameters()) / 1e6:.1f}M parameters")
    generator = torch.Generator().manual_seed(1)
    batches = [torch.randint(cfg.vocab, (cfg.batch, cfg.seq_len + 1), generator=generator).to(device) for _ in range(4)]

    progress("agreement with a float64 copy")
    agreement = check_agreement(model_nn, model_ln, batches[0], cfg, device)
    progress("checkpoint round trips")
    checkpoint = check_checkpoints(model_nn, model_ln, batches[0], cfg, device)

    variants = {"nn.LayerNorm eager": copy.deepcopy(model_nn), "ln_ext eager": copy.deepcopy(model_ln)}
    if use_compile:
        variants["nn.LayerNorm compiled"] = torch.compile(copy.deepcopy(model_nn), fullgraph=True)
        variants["ln_ext compiled"] = torch.compile(copy.deepcopy(model_ln), fullgraph=True)
    training = measure_training(variants, batches, cfg, device, progress)
    progress("profiling")
    profile_results = {"nn.LayerNorm": layer_norm_share(copy.deepcopy(model_nn), batches, cfg, device),
                       "ln_ext": layer_norm_share(copy.deepcopy(model_ln), batches, cfg, device)}

    fused_add = fused_add_comparison(cfg, device, batches, use_compile, progress)

    results = {"environment": environment(device), "config": asdict(cfg), "smoke": args.smoke,
               "compile": use_compile, "layer_norms_converted": counts["ln_ext.LayerNorm"],
               "agreement": agreement, "checkpoint": checkpoint, "training": training, "profile": profile_results,
               "fused_add": fused_add}
    text = markdown(results)
    print(text)
    out_dir = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
    paths = write_results(out_dir, f"transformer_dropin_{device.type}", results, text)
    progress("wrote " + ", ".join(paths))
    ok = agreement["passed"] and fused_add["agreement"]["passed"] and all(v["strict_load"] for v in checkpoint.values())
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
