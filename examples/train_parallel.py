"""ln_ext in a model trained with FSDP2 + tensor/sequence parallelism on a 2-D mesh.

A small pre-norm Transformer, written and parallelized as torchtitan does it: the norms
run sequence parallel (`SequenceParallel`: the residual stream stays sharded on the
sequence dim), the attention and MLP linears column/row-wise parallel, and FSDP2
(`fully_shard`) shards every block's parameters over the data-parallel mesh dim. The
model is built with `nn.LayerNorm`; `ln_ext.convert_layer_norm` swaps its norms before
parallelizing, which is the only change a model needs. Both versions train side by side
from the same weights on the same batches, and each step prints their losses.

Run (the mesh is data-parallel x tensor-parallel, world size = dp * tp):
    torchrun --nproc-per-node 2 examples/train_parallel.py            # dp 1 x tp 2
    torchrun --nproc-per-node 4 examples/train_parallel.py --tp 2     # dp 2 x tp 2
gloo on CPUs, nccl when every rank has a GPU (one per rank). tests/test_distributed.py
imports the model and the plan from here.
"""
from __future__ import annotations

import argparse
import copy
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)

import ln_ext


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.head_dim = dim // heads
        self.wq, self.wk, self.wv, self.wo = (nn.Linear(dim, dim, bias=False) for _ in range(4))

    def forward(self, x):
        b, s, _ = x.shape
        # -1 heads: under tensor parallelism each rank holds its share of the heads.
        q, k, v = (w(x).view(b, s, -1, self.head_dim).transpose(1, 2) for w in (self.wq, self.wk, self.wv))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.wo(out.transpose(1, 2).reshape(b, s, -1))


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1, self.w3 = nn.Linear(dim, hidden, bias=False), nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, hidden: int):
        super().__init__()
        self.attention_norm, self.attention = nn.LayerNorm(dim), Attention(dim, heads)
        self.ffn_norm, self.feed_forward = nn.LayerNorm(dim), FeedForward(dim, hidden)

    def forward(self, x):
        h = x + self.attention(self.attention_norm(x))
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    def __init__(self, vocab: int = 128, dim: int = 64, layers: int = 2, heads: int = 4, hidden: int = 128):
        super().__init__()
        self.tok_embeddings = nn.Embedding(vocab, dim)
        self.layers = nn.ModuleList(Block(dim, heads, hidden) for _ in range(layers))
        self.norm = nn.LayerNorm(dim, bias=False)
        self.output = nn.Linear(dim, vocab, bias=False)

    def forward(self, tokens):
        h = self.tok_embeddings(tokens)
        for layer in self.layers:
            h = layer(h)
        return self.output(self.norm(h))


def apply_tp(model: Transformer, tp_mesh) -> None:
    """torchtitan's plan: the residual stream is sharded on the sequence dim (dim 1)
    between the linears, so the norms see sequence shards (SequenceParallel)."""
    parallelize_module(model, tp_mesh, {
        "tok_embeddings": RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1)),
        "norm": SequenceParallel(),
        "output": ColwiseParallel(input_layouts=Shard(1), output_layouts=Replicate()),
    })
    for block in model.layers:
        parallelize_module(block, tp_mesh, {
            "attention_norm": SequenceParallel(),
            "attention": PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)),
            "attention.wq": ColwiseParallel(),
            "attention.wk": ColwiseParallel(),
            "attention.wv": ColwiseParallel(),
            "attention.wo": RowwiseParallel(output_layouts=Shard(1)),
            "ffn_norm": SequenceParallel(),
            "feed_forward": PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)),
            "feed_forward.w1": ColwiseParallel(),
            "feed_forward.w2": RowwiseParallel(output_layouts=Shard(1)),
            "feed_forward.w3": ColwiseParallel(),
        })


def apply_fsdp(model: Transformer, dp_mesh, mp_policy: MixedPrecisionPolicy | None = None) -> None:
    """FSDP2: each block is one all-gather unit, the root holds the rest."""
    kwargs = {"mesh": dp_mesh, "mp_policy": mp_policy or MixedPrecisionPolicy()}
    for block in model.layers:
        fully_shard(block, **kwargs)
    fully_shard(model, **kwargs)


def parallelize(model: Transformer, mesh) -> Transformer:
    """FSDP2 over TP on a ("dp", "tp") mesh."""
    apply_tp(model, mesh["tp"])
    apply_fsdp(model, mesh["dp"])
    return model


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tp", type=int, default=2, help="tensor-parallel degree (divides the world size)")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch", type=int, default=4, help="sequences per data-parallel rank")
    parser.add_argument("--seq", type=int, default=32, help="sequence length (a multiple of --tp)")
    args = parser.parse_args(argv)

    use_cuda = torch.cuda.is_available() and ln_ext.has_cuda_kernels()
    device = "cuda" if use_cuda else "cpu"
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if use_cuda else "gloo")
    world, rank = dist.get_world_size(), dist.get_rank()
    if world % args.tp:
        raise SystemExit(f"--tp {args.tp} must divide the world size {world}")
    mesh = init_device_mesh(device, (world // args.tp, args.tp), mesh_dim_names=("dp", "tp"))

    torch.manual_seed(0)  # the same weights on every rank (TP needs them replicated to start)
    model_nn = Transformer().to(device)
    model_ln = ln_ext.convert_layer_norm(copy.deepcopy(model_nn))  # the one line ln_ext needs
    models = {"nn.LayerNorm": parallelize(model_nn, mesh), "ln_ext": parallelize(model_ln, mesh)}
    optims = {k: torch.optim.AdamW(m.parameters(), lr=1e-3) for k, m in models.items()}

    # Each data-parallel group draws its own batches; the TP ranks of a group share them.
    gen = torch.Generator().manual_seed(1000 + mesh["dp"].get_local_rank())
    vocab = model_ln.tok_embeddings.num_embeddings
    if rank == 0:
        print(f"mesh dp {world // args.tp} x tp {args.tp} on {device}; loss per step")
        print(f"{'step':>4} {'nn.LayerNorm':>14} {'ln_ext':>14} {'difference':>11}")
    for step in range(args.steps):
        tokens = torch.randint(vocab, (args.batch, args.seq + 1), generator=gen).to(device)
        losses = {}
        for name, model in models.items():
            logits = model(tokens[:, :-1])
            loss = F.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten())
            loss.backward()
            optims[name].step()
            optims[name].zero_grad()
            losses[name] = loss.detach()
            dist.all_reduce(losses[name], group=mesh["dp"].get_group())  # sum (gloo has no average)
            losses[name] /= mesh["dp"].size()
        a, b = losses["nn.LayerNorm"].item(), losses["ln_ext"].item()
        if rank == 0:
            print(f"{step:>4} {a:>14.6f} {b:>14.6f} {abs(a - b):>11.2e}")
    # Every rank done with every group before any tears its down: under load a rank that
    # destroyed its gloo groups while the other still used them aborted at exit.
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
