"""ln_ext.LayerNorm inside DistributedDataParallel: 2 CPU processes, gloo backend."""
import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import ln_ext

WORLD = 2


def _model(norm):
    torch.manual_seed(0)  # the same parameters in both ranks and for both norms
    model = nn.Sequential(nn.Linear(20, 40), norm(40), nn.GELU(), nn.Linear(40, 8), norm(8, bias=False))
    with torch.no_grad():
        for m in model:
            if isinstance(m, nn.LayerNorm):
                m.weight.normal_(1, 0.5)
                if m.bias is not None:
                    m.bias.normal_(0, 0.5)
    return model


def _worker(rank, port, out_dir):
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        gen = torch.Generator().manual_seed(100 + rank)  # each rank its own batch
        x = torch.randn(16, 20, generator=gen) * 2 + 0.5
        target = torch.randn(16, 8, generator=gen)
        grads = {}
        for name, norm in (("ln_ext", ln_ext.LayerNorm), ("nn", nn.LayerNorm)):
            ddp = nn.parallel.DistributedDataParallel(_model(norm))
            nn.functional.mse_loss(ddp(x), target).backward()
            grads[name] = [p.grad.clone() for p in ddp.parameters()]
        torch.save(grads, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()  # both ranks done before either tears down
    finally:
        dist.destroy_process_group()
    # Leave without interpreter finalization, where gloo's threads could abort the
    # process (SIGABRT, "terminate called without an active exception"): ~1 run in 10
    # on a busy 2-core machine, with the same code before and after ln_ext changes.
    os._exit(0)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_gradients_equal_nn_layer_norm(tmp_path):
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    per_rank = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    for grads in per_rank:
        assert len(grads["ln_ext"]) == len(grads["nn"]) == 7
        for g, want in zip(grads["ln_ext"], grads["nn"]):
            torch.testing.assert_close(g, want, atol=1e-5, rtol=1e-5)
    # All-reduced: every rank holds the same gradients, and they are not those of one
    # rank's batch alone (each rank saw different data).
    for g0, g1 in zip(per_rank[0]["ln_ext"], per_rank[1]["ln_ext"]):
        assert torch.equal(g0, g1)
    single = _model(ln_ext.LayerNorm)
    gen = torch.Generator().manual_seed(100)
    x = torch.randn(16, 20, generator=gen) * 2 + 0.5
    nn.functional.mse_loss(single(x), torch.randn(16, 8, generator=gen)).backward()
    assert not torch.allclose(single[1].weight.grad, per_rank[0]["ln_ext"][2])
