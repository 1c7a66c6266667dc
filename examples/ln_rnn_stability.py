"""Does layer normalization stabilize RNN hidden dynamics and speed up training?

Ba, Kiros & Hinton (2016) claim that normalizing the summed inputs of a recurrent layer at
every time step stabilizes its hidden-state dynamics and makes training faster. This script
puts the claim to a small, repeatable test: plain `nn.RNN` (tanh) and `nn.LSTM` against
`ln_ext.LayerNormRNN` and `ln_ext.LayerNormLSTM`, same hidden size, optimizer, data order and
number of updates, over a grid that stresses the dynamics, with several seeds.

The task: scikit-learn's bundled digits (1797 8x8 images, no download) read pixel by pixel
in raster order, two pixels per time step (32 steps; --pixels-per-step 1 gives 64), each
pixel's gray level (0..16) fed one-hot like a token, classified after the last step.
Why this task:
  * it is real data that ships inside a package (`pip install scikit-learn`), small enough
    for a whole sweep to train in minutes on a laptop CPU;
  * read pixel by pixel the class depends on evidence spread over the whole sequence, so
    the gradient has to travel back through every application of the recurrence: whether
    the dynamics vanish or explode decides the result. Read row by row (8 steps of 8
    pixels) every model solves it and nothing is stressed;
  * it is a small sibling of sequential MNIST, the usual test bed for RNN dynamics.
Why one-hot gray levels rather than the raw intensity: a layer norm of W_x x_t for a
scalar x_t keeps only its sign (LN(x w) = sign(x) LN(w)), so an LN-LSTM fed raw pixels
would see "ink or no ink" and lose for a reason unrelated to dynamics. Tokens keep every
gray level distinct for both kinds of model. (A real limitation to know: normalizing the
projection of a low-dimensional input discards its magnitude.)

The grid:
  * recurrent weight scale: each H x H block of the recurrent weights starts as an
    orthogonal matrix times `scale`. Below 1 the unnormalized tanh RNN's state decays
    (gradients vanish); above 1 it saturates and turns chaotic (gradients explode or die in
    saturated units). A layer-normalized layer is invariant to the scale of its summed
    inputs, so the claim predicts it does not care;
  * Adam learning rate: a large one stresses training stability.
Besides the learning curves the script measures, at initialization, how strongly the loss
depends on the input at each time step (|dL/dx_t|, averaged over a batch): the reach of the
gradient back through time, which is what "stable dynamics" means for training.

Run:  python examples/ln_rnn_stability.py [--steps N] [--seeds K] [--smoke]
Writes examples/results/ln_rnn_stability_<device>.json, .md, and two PNGs (learning curves,
gradient reach). Uses the GPU when there is one and ln_ext has its CUDA kernels.
"""
from __future__ import annotations

import argparse
import functools
import itertools
import json
import math
import os
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

import ln_ext

from _report import environment, markdown_header, markdown_table, pick_device, write_results

MODELS = ("tanh RNN", "LN tanh RNN", "LSTM", "LN-LSTM")
# Each unnormalized model and its layer-normalized counterpart.
PAIRS = (("tanh RNN", "LN tanh RNN"), ("LSTM", "LN-LSTM"))
NUM_CLASSES = 10
GRAY_LEVELS = 17  # the digits' pixels take the values 0..16


def load_digits_sequences(pixels_per_step: int, device: torch.device, test_size: int = 450):
    """Digits as sequences of one-hot gray levels: x: [N, 64 / k, 17 * k] for k pixels per
    step, y: [N]. A fixed split (seeded permutation), the same for every run."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:
        raise SystemExit("ln_rnn_stability.py needs scikit-learn for its bundled digits data: "
                         "pip install scikit-learn") from err
    digits = load_digits()
    levels = torch.tensor(digits.data, dtype=torch.long)  # [N, 64], gray levels 0..16
    x = F.one_hot(levels, GRAY_LEVELS).float().reshape(len(levels), 64 // pixels_per_step, GRAY_LEVELS * pixels_per_step)
    y = torch.tensor(digits.target, dtype=torch.long)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    test, train = order[:test_size], order[test_size:]
    return (x[train].to(device), y[train].to(device)), (x[test].to(device), y[test].to(device))


def scale_recurrent_weights(rnn: nn.Module, scale: float, hidden: int):
    """Each [H, H] block of every recurrent weight (nn's `weight_hh_*` naming) = orthogonal * scale."""
    found = 0
    with torch.no_grad():
        for name, weight in rnn.named_parameters():
            if name.startswith("weight_hh"):
                for block in weight.split(hidden, dim=0):  # one block per gate
                    nn.init.orthogonal_(block, gain=scale)
                found += 1
    if not found:
        raise RuntimeError(f"{type(rnn).__name__} has no weight_hh_* parameter to scale")


class SequenceClassifier(nn.Module):
    """A one-layer recurrent network read out by a linear layer after the last step."""

    def __init__(self, kind: str, input_size: int, hidden: int, recurrent_scale: float):
        super().__init__()
        # --8<-- [start:ln_rnn]
        layers = {
            "tanh RNN": functools.partial(nn.RNN, nonlinearity="tanh"),
            "LN tanh RNN": ln_ext.LayerNormRNN,  # h_t = tanh(LN(W_h h_{t-1} + W_x x_t))
            "LSTM": nn.LSTM,
            "LN-LSTM": ln_ext.LayerNormLSTM,  # a drop-in for nn.LSTM: same arguments, same outputs
        }
        self.rnn = layers[kind](input_size, hidden, batch_first=True)
        # --8<-- [end:ln_rnn]
        scale_recurrent_weights(self.rnn, recurrent_scale, hidden)
        self.readout = nn.Linear(hidden, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [B, T, F] -> logits: [B, classes]
        outputs, _ = self.rnn(x)  # outputs: [B, T, H]
        return self.readout(outputs[:, -1])


@torch.no_grad()
def accuracy(model: nn.Module, data) -> float:
    x, y = data
    return (model(x).argmax(dim=1) == y).float().mean().item()


def train_one(kind, scale, lr, seed, train, test, args, device) -> dict:
    """Adam, fixed number of updates, no gradient clipping (so the dynamics show).
    Returns the learning curve: test accuracy and mean training loss every eval_every steps."""
    torch.manual_seed(seed)
    model = SequenceClassifier(kind, train[0].shape[2], args.hidden, scale).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    order = torch.Generator().manual_seed(seed)  # the same batches for every model at this seed
    x_train, y_train = train
    steps, accs, losses = [0], [accuracy(model, test)], [float("nan")]
    running, diverged, step = [], False, 0
    while step < args.steps:
        for batch in torch.randperm(len(x_train), generator=order).split(args.batch):
            if len(batch) < args.batch or step == args.steps:
                continue
            batch = batch.to(device)
            loss = F.cross_entropy(model(x_train[batch]), y_train[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            running.append(loss.item())
            if not math.isfinite(running[-1]):
                diverged = True
                break
            if step % args.eval_every == 0:
                steps.append(step), accs.append(accuracy(model, test)), losses.append(statistics.fmean(running))
                running = []
        if diverged:
            # The weights are no longer finite: the model stays where it broke.
            acc = accuracy(model, test)
            while steps[-1] + args.eval_every <= args.steps:
                steps.append(steps[-1] + args.eval_every), accs.append(acc), losses.append(float("nan"))
            break
    return {"model": kind, "scale": scale, "lr": lr, "seed": seed, "steps": steps, "test_accuracy": accs,
            "train_loss": losses, "final_accuracy": accs[-1], "diverged": diverged}


def gradient_reach(kind, scale, train, args, device, batch=256) -> list[float]:
    """|dL/dx_t| at initialization for each step t (mean over the batch and the features):
    how much the loss can learn from step t, i.e. how far gradients travel back in time."""
    torch.manual_seed(0)
    model = SequenceClassifier(kind, train[0].shape[2], args.hidden, scale).to(device)
    x = train[0][:batch].clone().requires_grad_(True)
    F.cross_entropy(model(x), train[1][:batch]).backward()
    return x.grad.abs().mean(dim=(0, 2)).tolist()


def steps_to_reach(run: dict, target: float):
    for step, acc in zip(run["steps"], run["test_accuracy"]):
        if acc >= target:
            return step
    return None


# ---------------------------------------------------------------- summaries
def summarize(runs: list[dict], target: float) -> dict:
    """Per (model, scale, lr): final accuracy mean/std over seeds, diverged runs, steps to target."""
    groups = {}
    for run in runs:
        groups.setdefault((run["model"], run["scale"], run["lr"]), []).append(run)
    summary = {}
    for (kind, scale, lr), group in groups.items():
        finals = [r["final_accuracy"] for r in group]
        reached = [s for s in (steps_to_reach(r, target) for r in group) if s is not None]
        summary[(kind, scale, lr)] = {
            "mean": statistics.fmean(finals), "std": statistics.stdev(finals) if len(finals) > 1 else 0.0,
            "seeds": len(group), "diverged": sum(r["diverged"] for r in group),
            "reached_target": len(reached), "median_steps_to_target": statistics.median(reached) if reached else None,
        }
    return summary


def verdicts(summary: dict, scales, lrs) -> list[dict]:
    """For each setting and pair: does LN help, hurt, or make no clear difference?
    'Clear' = the means differ by more than the larger of the two standard deviations and 1 point."""
    out = []
    for (plain, normed), scale, lr in itertools.product(PAIRS, scales, lrs):
        a, b = summary[(plain, scale, lr)], summary[(normed, scale, lr)]
        margin = max(a["std"], b["std"], 0.01)
        diff = b["mean"] - a["mean"]
        verdict = "LN better" if diff > margin else "LN worse" if diff < -margin else "no clear difference"
        out.append({"pair": f"{normed} vs {plain}", "scale": scale, "lr": lr, "difference": diff, "verdict": verdict})
    return out


def pct(x: float) -> str:
    return f"{100 * x:.1f}"


def markdown(results: dict, summary: dict, judged: list[dict]) -> str:
    cfg, env = results["config"], results["environment"]
    title = (f"LN-RNN stability: digits read pixel by pixel ({64 // cfg['pixels_per_step']} steps), "
             f"hidden {cfg['hidden']}, {cfg['steps']} Adam updates, {len(cfg['seeds'])} seeds")
    header = ["recurrent scale", "lr"] + list(MODELS)
    rows = []
    for scale, lr in itertools.product(cfg["scales"], cfg["lrs"]):
        row = [f"{scale:g}", f"{lr:g}"]
        for kind in MODELS:
            s = summary[(kind, scale, lr)]
            cell = f"{pct(s['mean'])} ± {pct(s['std'])}"
            if s["diverged"]:
                cell += f" ({s['diverged']} diverged)"
            row.append(cell)
        rows.append(row)
    steps_rows = []
    for scale, lr in itertools.product(cfg["scales"], cfg["lrs"]):
        row = [f"{scale:g}", f"{lr:g}"]
        for kind in MODELS:
            s = summary[(kind, scale, lr)]
            row.append("not reached" if s["median_steps_to_target"] is None else
                       f"{s['median_steps_to_target']:g} ({s['reached_target']}/{s['seeds']})")
        steps_rows.append(row)
    stem = f"ln_rnn_stability_{env['device']}"
    lines = [markdown_header(title, env),
             f"![learning curves]({stem}_curves.png)\n",
             f"![gradient reach at initialization]({stem}_gradient_reach.png)\n",
             "Final test accuracy, % (mean ± std over seeds; chance is 10%):\n",
             markdown_table(header, rows),
             f"Updates until test accuracy first reaches {pct(cfg['target_accuracy'])}% "
             "(median over the seeds that reach it; seeds that reach it / all):\n",
             markdown_table(header, steps_rows)]
    counts = {}
    for v in judged:
        counts.setdefault(v["pair"], {}).setdefault(v["verdict"], []).append(f"scale {v['scale']:g}, lr {v['lr']:g}")
    lines.append("What it shows (a difference counts when the means differ by more than the larger std and 1 point):\n")
    for pair, by_verdict in counts.items():
        parts = [f"{verdict} in {len(where)} of {sum(len(w) for w in by_verdict.values())} settings"
                 + (f" ({'; '.join(where)})" if verdict != "LN better" else "")
                 for verdict, where in sorted(by_verdict.items())]
        lines.append(f"- {pair}: " + ", ".join(parts) + ".")
    lines.append(f"\nSame data order, initialization rule and number of updates for every model; Adam, batch "
                 f"{cfg['batch']}, no gradient clipping; the recurrent weights start as orthogonal blocks times "
                 f"the scale. Wall time {results['wall_s'] / 60:.1f} min.")
    return "\n".join(lines) + "\n"


def plot(results: dict, curves_path: str, reach_path: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfg = results["config"]
    style = {"tanh RNN": ("tab:blue", "--"), "LN tanh RNN": ("tab:blue", "-"),
             "LSTM": ("tab:orange", "--"), "LN-LSTM": ("tab:orange", "-")}
    scales, lrs = cfg["scales"], cfg["lrs"]
    fig, axes = plt.subplots(len(lrs), len(scales), figsize=(3.2 * len(scales), 2.8 * len(lrs)),
                             sharex=True, sharey=True, squeeze=False)
    for (i, lr), (j, scale) in itertools.product(enumerate(lrs), enumerate(scales)):
        ax = axes[i][j]
        for kind in MODELS:
            runs = [r for r in results["runs"] if (r["model"], r["scale"], r["lr"]) == (kind, scale, lr)]
            acc = torch.tensor([r["test_accuracy"] for r in runs]) * 100
            mean, std = acc.mean(0), acc.std(0) if len(runs) > 1 else torch.zeros_like(acc[0])
            color, line = style[kind]
            ax.plot(runs[0]["steps"], mean, line, color=color, label=kind)
            ax.fill_between(runs[0]["steps"], mean - std, mean + std, color=color, alpha=0.15)
        ax.set_title(f"recurrent scale {scale:g}, lr {lr:g}", fontsize=9)
        ax.set_ylim(0, 100)
        ax.grid(alpha=0.3)
        if i == len(lrs) - 1:
            ax.set_xlabel("Adam updates")
        if j == 0:
            ax.set_ylabel("test accuracy, %")
    axes[0][0].legend(fontsize=8, loc="lower right")
    fig.suptitle(f"Digits pixel by pixel: test accuracy, mean ± std over {len(cfg['seeds'])} seeds "
                 f"({results['environment']['device']})", fontsize=10)
    fig.tight_layout()
    fig.savefig(curves_path, dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, len(scales), figsize=(3.2 * len(scales), 2.9), sharey=True, squeeze=False)
    for j, scale in enumerate(scales):
        ax = axes[0][j]
        for kind in MODELS:
            color, line = style[kind]
            reach = results["gradient_reach"][f"{scale:g}"][kind]
            ax.semilogy(range(1, len(reach) + 1), reach, line, color=color, label=kind)
        ax.set_title(f"recurrent scale {scale:g}", fontsize=9)
        ax.set_xlabel("time step t")
        ax.grid(alpha=0.3, which="both")
    axes[0][0].set_ylabel("|dL/dx_t| at init")
    axes[0][0].legend(fontsize=8)
    fig.suptitle("Gradient reaching each input at initialization (flat: stable; low at early t: vanishing; "
                 "high: exploding)", fontsize=10)
    fig.tight_layout()
    fig.savefig(reach_path, dpi=110)
    plt.close(fig)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="auto", help="auto (GPU if present), cpu or cuda")
    parser.add_argument("--steps", type=int, default=200, help="Adam updates per run")
    parser.add_argument("--eval-every", type=int, default=20)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--scales", type=float, nargs="+", default=[0.5, 1.0, 4.0])
    parser.add_argument("--lrs", type=float, nargs="+", default=[3e-3, 3e-2])
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--pixels-per-step", type=int, default=2, choices=[1, 2, 4, 8],
                        help="2: 32 steps (default, minutes on a CPU); 1: the full 64 steps")
    parser.add_argument("--target-accuracy", type=float, default=0.8, help="for the 'updates until' table")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (0: torch's default)")
    parser.add_argument("--replot", metavar="JSON", help="no training: tables and plots again from a results JSON")
    parser.add_argument("--smoke", action="store_true", help="tiny sweep, a few updates: seconds (for CI)")
    parser.add_argument("--out", default=None, help="results folder (default: examples/results next to this script)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.steps, args.eval_every, args.seeds, args.hidden = 4, 2, 2, 16
        args.scales, args.lrs, args.pixels_per_step = [1.0], [1e-2], 8
    return args


def run_sweep(args, device) -> dict:
    """Trains every (scale, lr, seed, model) of the grid; the raw results."""
    if device.type == "cpu" and args.threads:
        # Matrices of H=64 gain nothing from intra-op threads; on a busy machine the
        # threads' spin-waits cost more than the work.
        torch.set_num_threads(args.threads)
    train, test = load_digits_sequences(args.pixels_per_step, device)
    seeds = list(range(args.seeds))
    grid = list(itertools.product(args.scales, args.lrs, seeds, MODELS))
    try:
        from tqdm import tqdm
    except ImportError:  # the progress bar is a nicety
        def tqdm(iterable, **_):
            return iterable

    start = time.perf_counter()
    runs = []
    for scale, lr, seed, kind in tqdm(grid, desc="ln_rnn_stability", unit="run"):
        runs.append(train_one(kind, scale, lr, seed, train, test, args, device))
    reach = {f"{scale:g}": {kind: gradient_reach(kind, scale, train, args, device) for kind in MODELS}
             for scale in args.scales}
    config = {k: v for k, v in vars(args).items() if k not in ("out", "device", "seeds", "threads", "replot")}
    config.update(seeds=seeds, train_size=len(train[1]), test_size=len(test[1]))
    return {"environment": environment(device), "config": config, "smoke": args.smoke, "runs": runs,
            "gradient_reach": reach, "wall_s": time.perf_counter() - start}


def report(results: dict, out_dir: str) -> list[str]:
    """Summary, verdicts, Markdown, JSON and the two PNGs from the raw results."""
    cfg = results["config"]
    summary = summarize(results["runs"], cfg["target_accuracy"])
    judged = verdicts(summary, cfg["scales"], cfg["lrs"])
    results["summary"] = [{"model": k[0], "scale": k[1], "lr": k[2], **v} for k, v in summary.items()]
    results["verdicts"] = judged
    text = markdown(results, summary, judged)
    print(text)
    stem = f"ln_rnn_stability_{results['environment']['device']}"
    paths = list(write_results(out_dir, stem, results, text))
    curves, reach_png = os.path.join(out_dir, stem + "_curves.png"), os.path.join(out_dir, stem + "_gradient_reach.png")
    plot(results, curves, reach_png)
    return paths + [curves, reach_png]


def main(argv=None):
    args = parse_args(argv)
    if args.replot:
        with open(args.replot) as f:
            results = json.load(f)
    else:
        results = run_sweep(args, pick_device(args.device))
    out_dir = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
    print("[ln_rnn_stability] wrote " + ", ".join(report(results, out_dir)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
