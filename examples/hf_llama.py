"""ln_ext inside a transformers model: a small Llama-style causal LM built from a config (no
download), trained a few steps as it is and with its RMSNorms converted to ln_ext, side by side.

Reports steps/s (best of interleaved rounds), the memory autograd keeps for backward (all of
it, and the norm modules' part: transformers' LlamaRMSNorm saves a float32 copy of x and a
16-bit x̂ on top of x, ln_ext saves x and one float per row), peak GPU memory on a GPU, the
two loss curves and how many norm modules were converted, by form.

    python examples/hf_llama.py                 # GPU (bf16) if present, else a small CPU run
    python examples/hf_llama.py --smoke         # seconds: what the tests run
"""
from __future__ import annotations

import argparse
import collections
import copy
import os
import time

import torch

import ln_ext
from _report import environment, markdown_header, markdown_table, pick_device, write_results

CONFIGS = {  # hidden, layers, heads, vocab, seq, batch, steps
    "cuda": dict(hidden=1024, layers=8, heads=16, vocab=8192, seq=512, batch=8, steps=30),
    "cpu": dict(hidden=256, layers=4, heads=4, vocab=512, seq=128, batch=8, steps=20),
    "smoke": dict(hidden=64, layers=2, heads=4, vocab=128, seq=16, batch=2, steps=3),
}


def build_model(cfg: dict, device, dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=cfg["vocab"], hidden_size=cfg["hidden"], intermediate_size=4 * cfg["hidden"],
                         num_hidden_layers=cfg["layers"], num_attention_heads=cfg["heads"],
                         num_key_value_heads=cfg["heads"] // 2, max_position_embeddings=cfg["seq"],
                         pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    return LlamaForCausalLM(config).to(device=device, dtype=dtype)


def batches(cfg: dict, device):
    """A learnable token stream: a fixed set of short random patterns, each sequence one of
    them repeated, rotated by the step (the loss falls within a few steps)."""
    g = torch.Generator().manual_seed(1)
    patterns = torch.randint(3, cfg["vocab"], (cfg["batch"], 8), generator=g)
    return [patterns.roll(step, dims=1).repeat(1, cfg["seq"] // 8).to(device) for step in range(cfg["steps"])]


def train_step(model, optimizer, tokens):
    loss = model(input_ids=tokens, labels=tokens).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def saved_for_backward(model, tokens) -> dict:
    """Bytes autograd keeps for one forward: all of it, and inside the norm modules."""
    params = {p.data_ptr() for p in model.parameters()}
    counts = {"total": 0, "norms": 0}
    in_norm = [0]

    def pack(t):
        if t.data_ptr() not in params:
            nbytes = t.numel() * t.element_size()
            counts["total"] += nbytes
            if in_norm[0]:
                counts["norms"] += nbytes
        return t

    norms = [m for m in model.modules() if type(m).__name__.endswith("RMSNorm")]
    hooks = [m.register_forward_pre_hook(lambda *_: in_norm.__setitem__(0, in_norm[0] + 1)) for m in norms]
    hooks += [m.register_forward_hook(lambda *_: in_norm.__setitem__(0, in_norm[0] - 1)) for m in norms]
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=tokens, labels=tokens).loss
    for h in hooks:
        h.remove()
    return counts


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = parser.parse_args(argv)
    device = pick_device(args.device)
    cfg = CONFIGS["smoke" if args.smoke else device.type]
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32

    model_hf = build_model(cfg, device, dtype)
    # --8<-- [start:hf_convert]
    model_ln = ln_ext.convert_layer_norm(copy.deepcopy(model_hf), strict=True)  # every RMSNorm on ln_ext's kernels
    # --8<-- [end:hf_convert]
    forms = collections.Counter(ln_ext.convert.converted_form(m) for m in model_ln.modules())
    forms.pop(None, None)
    data = batches(cfg, device)
    variants = {"transformers": model_hf, "ln_ext": model_ln}
    optimizers = {k: torch.optim.AdamW(m.parameters(), lr=1e-3) for k, m in variants.items()}
    memory = {k: saved_for_backward(m, data[0]) for k, m in variants.items()}

    losses = {k: [] for k in variants}
    seconds = {k: float("inf") for k in variants}
    peak = {}
    rounds = 3 if not args.smoke else 1
    per_round = max(1, len(data) // rounds)
    for r in range(rounds):  # interleaved: both see the same machine state
        for name, model in variants.items():
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            sync(device)
            start = time.perf_counter()
            for tokens in data[r * per_round:(r + 1) * per_round]:
                losses[name].append(float(train_step(model, optimizers[name], tokens)))
            sync(device)
            seconds[name] = min(seconds[name], (time.perf_counter() - start) / per_round)
            if device.type == "cuda":
                peak[name] = torch.cuda.max_memory_allocated(device)
    max_loss_gap = max(abs(a - b) for a, b in zip(losses["transformers"], losses["ln_ext"]))

    env = environment(device)
    results = {"environment": env, "config": cfg, "dtype": str(dtype), "converted": dict(forms),
               "steps_per_s": {k: 1 / v for k, v in seconds.items()}, "saved_for_backward": memory,
               "peak_memory": peak, "losses": losses, "max_loss_gap": max_loss_gap}
    rows = [["training steps/s", f"{1 / seconds['transformers']:.2f}", f"{1 / seconds['ln_ext']:.2f}",
             f"{seconds['transformers'] / seconds['ln_ext']:.2f}x"],
            ["saved for backward, whole model (MiB)", *(f"{memory[k]['total'] / 2**20:.1f}" for k in variants),
             f"{memory['ln_ext']['total'] / memory['transformers']['total']:.2f}x"],
            ["saved for backward, norm modules (MiB)", *(f"{memory[k]['norms'] / 2**20:.2f}" for k in variants),
             f"{memory['ln_ext']['norms'] / max(memory['transformers']['norms'], 1):.2f}x"]]
    if peak:
        rows.append(["peak GPU memory (MiB)", *(f"{peak[k] / 2**20:.0f}" for k in variants),
                     f"{peak['ln_ext'] / peak['transformers']:.2f}x"])
    title = (f"Llama-style causal LM from transformers (hidden {cfg['hidden']}, {cfg['layers']} layers, "
             f"{cfg['batch']}x{cfg['seq']} tokens, {str(dtype).removeprefix('torch.')})")
    md = markdown_header(title, env) + "\n" + markdown_table(["", "transformers", "ln_ext", "ln_ext / transformers"],
                                                             rows)
    md += (f"\nConverted {sum(forms.values())} norm modules ({', '.join(f'{v} {k}' for k, v in forms.items())}). "
           f"Losses over {len(losses['ln_ext'])} AdamW steps: transformers "
           f"{losses['transformers'][0]:.3f} -> {losses['transformers'][-1]:.3f}, ln_ext {losses['ln_ext'][0]:.3f} -> "
           f"{losses['ln_ext'][-1]:.3f} (largest gap {max_loss_gap:.2e}). Steps/s: best of {rounds} interleaved "
           f"rounds. Saved for backward: bytes autograd keeps for one forward (parameters excluded).\n")
    stem = f"hf_llama_{device.type}"
    paths = write_results(args.out, stem, results, md)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(5, 3))
        for name in variants:
            ax.plot(losses[name], label=name, ls="-" if name == "transformers" else "--")
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.legend()
        fig.tight_layout()
        fig.savefig(os.path.join(args.out, stem + "_loss.png"), dpi=110)
        plt.close(fig)
    except ImportError:
        pass
    print(md)
    print("wrote", *paths)


if __name__ == "__main__":
    main()
