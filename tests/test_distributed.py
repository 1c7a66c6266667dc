"""ln_ext under PyTorch's distributed engine, on CPU processes with gloo.

Each parallelism trains the same small pre-norm Transformer (examples/train_parallel.py,
which holds the model and torchtitan's plans) twice from the same weights on the same
batches: with nn.LayerNorm, and converted by ln_ext.convert_layer_norm before being
parallelized. The two runs must agree on the loss and logits and every parameter
gradient of the first step, and on every parameter after 3 AdamW steps. An op log of
the first step shows that the converted model ran ln_ext's ops and no aten layer norm,
on the placements expected (sequence shards under sequence parallelism).

To keep CI time modest every 2-rank scenario runs in one spawned process group, and
the 2-D one in one 4-rank group; each test checks one scenario's saved results.
"""
from __future__ import annotations

import collections
import contextlib
import copy
import datetime
import os
import socket
import subprocess
import sys
import time
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import ln_ext

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "examples"))
import train_parallel as example  # noqa: E402

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="needs torch.distributed with gloo")

STEPS, LR = 3, 1e-2
# AdamW's eps well above the gradients' float32 rounding noise (~1e-8 here): with the
# default 1e-8, a gradient element that is zero up to rounding gets a step of about
# +-lr either way, which would turn rounding into lr-sized parameter differences.
ADAM_EPS = 1e-4
BATCH, SEQ = 2, 8  # per data-parallel group; SEQ splits evenly over 2 TP ranks
MODEL = dict(vocab=64, dim=32, layers=2, heads=4, hidden=64)
# ln_ext vs nn.LayerNorm in float32. Both compute each norm's statistics in two float32
# passes, so a norm's outputs differ by float32 rounding (~1e-7 relative); two blocks,
# the loss and the backward may grow that ~10x, and AdamW (eps above the noise) keeps
# the parameters as close. Measured here: 6e-7 or less for every quantity compared.
TOL = dict(atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- worker-side helpers

def make_models(seed=0):
    """(nn.LayerNorm model, its ln_ext copy): same weights; the norms get random gains
    and shifts (SequenceParallel takes each rank's copy as replicated: same seed)."""
    torch.manual_seed(seed)
    model = example.Transformer(**MODEL)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight.normal_(1.0, 0.5)
                if m.bias is not None:
                    m.bias.normal_(0.0, 0.5)
    return model, ln_ext.convert_layer_norm(copy.deepcopy(model))


def batches(seed, n=STEPS):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(MODEL["vocab"], (BATCH, SEQ + 1), generator=gen) for _ in range(n)]


def full(t):
    """The whole tensor (gathered when it is a DTensor), float32, detached."""
    if hasattr(t, "full_tensor"):
        t = t.full_tensor()
    return t.detach().float().clone()


class OpLog(TorchDispatchMode):
    """Counts the layer-norm ops that run, keyed "op placements-of-x dtype-of-x"
    ("local": a plain tensor)."""

    OPS = {"ln_ext.layer_norm_fwd": 0, "ln_ext.layer_norm_bwd": 1,
           "aten.native_layer_norm": 0, "aten.native_layer_norm_backward": 1}

    def __init__(self):
        super().__init__()
        self.calls = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket)
        if name in self.OPS:
            x = args[self.OPS[name]]
            where = tuple(x.placements) if hasattr(x, "placements") else "local"
            self.calls[f"{name} {where} {x.dtype}"] += 1
        return func(*args, **(kwargs or {}))


def loss_of(model, tokens):
    logits = model(tokens[:, :-1])
    return F.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten()), logits


def train(model, data, average_over=None, log_ops=True):
    """len(data) AdamW steps. Returns the losses (averaged over the group `average_over`),
    the first step's logits, op log (log_ops) and gradients, and the final parameters."""
    opt = torch.optim.AdamW(model.parameters(), lr=LR, eps=ADAM_EPS)
    out = {"loss": []}
    for step, tokens in enumerate(data):
        log = OpLog()
        with log if step == 0 and log_ops else contextlib.nullcontext():
            loss, logits = loss_of(model, tokens)
            loss.backward()
        if step == 0:
            out["logits"] = full(logits)
            out["ops"] = dict(log.calls)
            out["grads"] = {_name(n): full(p.grad) for n, p in model.named_parameters()}
        loss = loss.detach().clone()
        if average_over is not None:
            dist.all_reduce(loss, group=average_over)
            loss /= dist.get_world_size(average_over)
        out["loss"].append(loss)
        opt.step()
        opt.zero_grad()
    out["loss"] = torch.stack(out["loss"])
    out["params"] = {_name(n): full(p) for n, p in model.named_parameters()}
    return out


def _name(n):
    return n.removeprefix("module.")  # DDP's wrapper


def train_pair(parallelize, data, average_over=None):
    model_nn, model_ln = make_models()
    return {name: train(parallelize(model), data, average_over)
            for name, model in (("nn", model_nn), ("ln", model_ln))}


def mesh_1d():
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh("cpu", (dist.get_world_size(),))


# ---------------------------------------------------------------- 2-rank scenarios

def scenario_ddp(rank, tmp):
    return train_pair(nn.parallel.DistributedDataParallel, batches(100 + rank), dist.group.WORLD)


def scenario_fsdp2(rank, tmp, mp_policy=None):
    from torch.distributed.fsdp import MixedPrecisionPolicy

    mesh = mesh_1d()
    policy = mp_policy or MixedPrecisionPolicy()
    return train_pair(lambda m: (example.apply_fsdp(m, mesh, policy), m)[1], batches(100 + rank), dist.group.WORLD)


def scenario_fsdp2_bf16(rank, tmp):
    from torch.distributed.fsdp import MixedPrecisionPolicy

    return scenario_fsdp2(rank, tmp, MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32))


def scenario_tp_sp(rank, tmp):
    mesh = mesh_1d()
    data = batches(100)  # TP ranks share the batch
    result = train_pair(lambda m: (example.apply_tp(m, mesh), m)[1], data)
    result["single"] = train(make_models()[0], data)  # the unsharded model, one process
    return result


def scenario_compile_tp(rank, tmp):
    """torch.compile(fullgraph=True) of the whole TP model: a graph break anywhere, at the
    ln_ext op included, raises. AOTAutograd traces through the DTensors, so the sharding
    rules run at trace time. Backend aot_eager: inductor's code generation would take
    minutes of CI here and adds nothing DTensor-specific (the op lowers from its fake
    kernel, as test_layer_norm_autograd's compile tests check). Compared with the eager
    nn.LayerNorm run. (Compiling each block instead, as torchtitan does, fails in this
    torch's DTensor backward with nn.LayerNorm just the same.)"""
    import torch._dynamo.testing

    mesh = mesh_1d()
    data = batches(100)
    model_nn, model_ln = make_models()
    example.apply_tp(model_ln, mesh)
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    model_ln.compile(backend=counter, fullgraph=True)
    example.apply_tp(model_nn, mesh)
    # No op log here: dynamo does not compile under an active dispatch mode.
    result = {"ln": train(model_ln, data, log_ops=False), "nn": train(model_nn, data, log_ops=False)}
    result["frames"] = counter.frame_count
    result["graph_ops"] = collections.Counter(str(n.target) for g in counter.graphs for n in g.graph.nodes
                                              if n.op == "call_function" and "layer_norm" in str(n.target))
    return result


def scenario_dcp(rank, tmp):
    """torch.distributed.checkpoint of FSDP2-sharded models: an ln_ext model's model and
    optimizer state load into an nn.LayerNorm model (different initial weights), which
    trains a step and saves; that loads back into a third, ln_ext, model."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    mesh = mesh_1d()
    data = batches(200 + rank, 2)

    def fresh(seed, convert):
        model = make_models(seed)[1 if convert else 0]
        example.apply_fsdp(model, mesh)
        return model, torch.optim.AdamW(model.parameters(), lr=LR, eps=ADAM_EPS)

    def step(model, opt, tokens):
        loss, _ = loss_of(model, tokens)
        loss.backward()
        opt.step()
        opt.zero_grad()
        return loss.detach()

    def save(model, opt, path):
        msd, osd = get_state_dict(model, opt)
        dcp.save({"model": msd, "optim": osd}, checkpoint_id=path)

    def load(model, opt, path):
        msd, osd = get_state_dict(model, opt)
        state = {"model": msd, "optim": osd}
        dcp.load(state, checkpoint_id=path)
        set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])

    def snapshot(model, opt):
        msd, osd = get_state_dict(model, opt)
        return {k: full(v) for k, v in msd.items()}, {k: full(v) for k, v in _flat(osd).items()}

    out = {}
    src, src_opt = fresh(1, convert=True)
    step(src, src_opt, data[0])
    save(src, src_opt, os.path.join(tmp, "from_ln_ext"))
    out["saved_ln"] = snapshot(src, src_opt)
    mid, mid_opt = fresh(2, convert=False)
    load(mid, mid_opt, os.path.join(tmp, "from_ln_ext"))
    out["loaded_nn"] = snapshot(mid, mid_opt)
    # The next step from the same state: the two models must still train alike.
    out["next_loss"] = (step(src, src_opt, data[1]), step(mid, mid_opt, data[1]))
    out["after_next"] = (snapshot(src, src_opt)[0], snapshot(mid, mid_opt)[0])
    save(mid, mid_opt, os.path.join(tmp, "from_nn"))
    back, back_opt = fresh(3, convert=True)
    load(back, back_opt, os.path.join(tmp, "from_nn"))
    out["saved_nn"] = snapshot(mid, mid_opt)
    out["loaded_ln"] = snapshot(back, back_opt)
    out["types"] = tuple(f"{type(m.norm).__module__}.{type(m.norm).__name__}" for m in (src, mid, back))
    return out


def _flat(d, prefix=""):
    flat = {}
    for k, v in d.items():
        if isinstance(v, dict):
            flat.update(_flat(v, f"{prefix}{k}."))
        elif isinstance(v, torch.Tensor):
            flat[f"{prefix}{k}"] = v
    return flat


def scenario_dtensor_ops(rank, tmp):
    """ln_ext.layer_norm and the LN-RNN cells called directly on DTensors, against the same
    calls on the whole tensors; placements against aten's own layer norm."""
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor

    mesh = mesh_1d()
    torch.manual_seed(7)  # the same tensors on both ranks
    layouts = [((4, 6, 8), (8,), [Shard(0), Shard(1), Replicate(), Shard(2), Partial()]),
               ((4, 6, 8), (6, 8), [Shard(0), Shard(1), Shard(2)]),
               ((3, 5, 8), (8,), [Shard(0), Shard(1)])]  # shards of uneven size
    cases = [(shape, ns, place, use_w, use_b, x_grad) for shape, ns, places in layouts for place in places
             for use_w, use_b, x_grad in ((True, True, True), (False, True, True), (True, False, False),
                                          (False, False, True))]

    def as_dtensor(t, place, grad):
        if place.is_partial():  # rank r holds a share; the shares sum to t
            d = DTensor.from_local(t * (0.25 if rank == 0 else 0.75), mesh, [Partial()])
        else:
            d = distribute_tensor(t, mesh, [place])
        return d.detach().requires_grad_(grad)

    results = []
    for shape, ns, place, use_w, use_b, x_grad in cases:
        x, dy = torch.randn(shape) * 3 + 1.5, torch.randn(shape)
        w, b = torch.randn(ns) * 0.5 + 1, torch.randn(ns)
        got = {}
        for name, fn in (("ln_ext", ln_ext.layer_norm), ("aten", F.layer_norm), ("local", ln_ext.layer_norm)):
            if name == "local":
                xs = x.clone().requires_grad_(x_grad)
                ws = w.clone().requires_grad_() if use_w else None
                bs = b.clone().requires_grad_() if use_b else None
                g = dy
            else:
                xs = as_dtensor(x, place, x_grad)
                ws = distribute_tensor(w, mesh, [Replicate()]).requires_grad_() if use_w else None
                bs = distribute_tensor(b, mesh, [Replicate()]).requires_grad_() if use_b else None
                g = distribute_tensor(dy, mesh, [Replicate()])
            y = fn(xs, ns, ws, bs, 1e-5)
            if name != "local":
                g = g.redistribute(mesh, y.placements)
            y.backward(g)
            got[name] = {
                "y": full(y), "dx": full(xs.grad) if x_grad else None,
                "dw": full(ws.grad) if use_w else None, "db": full(bs.grad) if use_b else None,
                "placements": None if name == "local" else [str(tuple(t.placements)) for t in
                                                            (y, xs.grad if x_grad else y, ws.grad if use_w else y,
                                                             bs.grad if use_b else y)],
            }
        results.append({"case": f"x={list(shape)} normalized_shape={ns} x={place} weight={use_w} bias={use_b} "
                                f"x.grad={x_grad}",
                        **got})

    # The op itself: mean/rstd are x.shape[:-k] and keep a sequence-dim shard.
    x = torch.randn(4, 6, 8) * 3 + 1.5
    xd = distribute_tensor(x, mesh, [Shard(1)])
    y, mean, rstd = torch.ops.ln_ext.layer_norm_fwd(xd, [8], None, None, 1e-5)
    _, mean_ref, rstd_ref = torch.ops.ln_ext.layer_norm_fwd(x, [8], None, None, 1e-5)
    stats = {"placements": [str(tuple(t.placements)) for t in (y, mean, rstd)], "shape": tuple(mean.shape),
             "mean": (full(mean), mean_ref), "rstd": (full(rstd), rstd_ref)}
    return {"layer_norm": results, "stats": stats, "cells": _dtensor_cells(mesh)}


def _dtensor_cells(mesh):
    """Each LN-RNN cell with its batch sharded (and replicated) vs the same cell on whole tensors."""
    from torch.distributed.tensor import Replicate, Shard, distribute_module, distribute_tensor

    out = []
    for cls in (ln_ext.LayerNormRNNCell, ln_ext.LayerNormLSTMCell, ln_ext.LayerNormGRUCell):
        torch.manual_seed(11)
        cell = cls(5, 6)
        with torch.no_grad():
            for n, p in cell.named_parameters():
                if n.startswith("ln_") or n == "gate_bias":
                    p.normal_(1.0 if n.endswith("weight") else 0.0, 0.5)
        x, h = torch.randn(4, 5) * 2 + 0.5, torch.randn(4, 6)
        state = (h, torch.randn(4, 6)) if cls is ln_ext.LayerNormLSTMCell else h
        for place in (Shard(0), Replicate()):
            dcell = distribute_module(copy.deepcopy(cell), mesh)  # parameters replicated
            results = {}
            for name, m in (("dtensor", dcell), ("local", cell)):
                m.zero_grad()
                if name == "dtensor":
                    xs = distribute_tensor(x, mesh, [place]).requires_grad_()
                    st = tuple(distribute_tensor(s, mesh, [place]) for s in (state if isinstance(state, tuple) else (state,)))
                else:
                    xs = x.clone().requires_grad_()
                    st = state if isinstance(state, tuple) else (state,)
                res = m(xs, st if isinstance(state, tuple) else st[0])
                res = res if isinstance(res, tuple) else (res,)
                sum((r * (i + 1.5)).sum() for i, r in enumerate(res)).backward()
                results[name] = {"out": [full(r) for r in res], "dx": full(xs.grad),
                                 "grads": {n: full(p.grad) for n, p in m.named_parameters()},
                                 "placement": str(tuple(res[0].placements)) if name == "dtensor" else None}
            out.append((f"{cls.__name__} batch={place}", results))
    return out


SCENARIOS_2 = {
    "ddp": scenario_ddp,
    "fsdp2": scenario_fsdp2,
    "fsdp2_bf16": scenario_fsdp2_bf16,
    "tp_sp": scenario_tp_sp,
    "dtensor_ops": scenario_dtensor_ops,
    "dcp": scenario_dcp,
    "compile_tp": scenario_compile_tp,  # last: the slowest (inductor)
}


# ---------------------------------------------------------------- 4-rank scenario

def scenario_2d(rank, tmp):
    """FSDP2 over TP on a 2 x 2 ("dp", "tp") mesh, as examples/train_parallel.py does it."""
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    data = batches(100 + mesh["dp"].get_local_rank())
    return train_pair(lambda m: example.parallelize(m, mesh), data, mesh["dp"].get_group())


SCENARIOS_4 = {"fsdp2_tp_2d": scenario_2d}


# ---------------------------------------------------------------- spawning

def _worker(rank, world, port, scenarios, tmp):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    # A scenario that deadlocks turns into an error after this, not a hung CI job.
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=300))
    code = 0
    for name in scenarios:
        try:
            result = SCENARIOS_2.get(name, SCENARIOS_4.get(name))(rank, tmp)
        except Exception:
            result, code = {"error": traceback.format_exc()}, 1
        if rank == 0 or "error" in result:
            torch.save(result, os.path.join(tmp, f"{name}.rank{rank}.pt"))
        if code:
            break  # the other ranks may wait in a collective: stop here (they time out)
        dist.barrier()
    if code == 0:
        dist.destroy_process_group()
    # Leave without interpreter finalization, where gloo's threads can abort the process
    # (see test_layer_norm_ddp.py).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(scenarios, world, tmp, limit_s=1200):
    ctx = mp.start_processes(_worker, args=(world, _free_port(), list(scenarios), str(tmp)), nprocs=world,
                             join=False, start_method="spawn")
    deadline, spawn_error = time.monotonic() + limit_s, None
    try:
        while not ctx.join(timeout=5):
            if time.monotonic() > deadline:
                for p in ctx.processes:
                    p.kill()
                spawn_error = f"the workers ran past {limit_s} s and were killed"
                break
    except Exception as e:  # a worker failed (the others are terminated): its error file says why
        spawn_error = e
    results = {}
    for name in scenarios:
        for rank in range(world):
            path = tmp / f"{name}.rank{rank}.pt"
            if path.exists():
                results.setdefault(name, torch.load(path, weights_only=False))
        results.setdefault(name, {"error": f"not run (an earlier scenario failed): {spawn_error}"})
    return results


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    return _spawn(SCENARIOS_2, 2, tmp_path_factory.mktemp("dist2"))


@pytest.fixture(scope="module")
def four_ranks(tmp_path_factory):
    return _spawn(SCENARIOS_4, 4, tmp_path_factory.mktemp("dist4"))


def result_of(results, name):
    r = results[name]
    if "error" in r:
        pytest.fail(f"scenario {name} failed in a worker:\n{r['error']}")
    return r


# ---------------------------------------------------------------- checks

def assert_runs_close(got, want, what, **tol):
    tol = tol or TOL
    torch.testing.assert_close(got["loss"], want["loss"], **tol, msg=lambda m: f"{what} loss: {m}")
    torch.testing.assert_close(got["logits"], want["logits"], **tol, msg=lambda m: f"{what} logits: {m}")
    assert got["grads"].keys() == want["grads"].keys() == got["params"].keys()
    for n in want["grads"]:
        torch.testing.assert_close(got["grads"][n], want["grads"][n], **tol, msg=lambda m: f"{what} grad {n}: {m}")
        torch.testing.assert_close(got["params"][n], want["params"][n], **tol,
                                   msg=lambda m: f"{what} param {n} after {STEPS} steps: {m}")
    for t in (got["loss"], got["logits"], *got["grads"].values(), *got["params"].values()):
        assert torch.isfinite(t).all(), f"{what}: non-finite values"


def assert_ops(result, placement, dtype=torch.float32):
    """The ln_ext model ran only ln_ext's layer norm, forward and backward, on x of
    `placement` and `dtype`; the nn.LayerNorm model only aten's (the comparison is not
    between two runs of the same thing)."""
    norms = 2 * MODEL["layers"] + 1
    assert result["ln"]["ops"] == {f"ln_ext.layer_norm_fwd {placement} {dtype}": norms,
                                   f"ln_ext.layer_norm_bwd {placement} {dtype}": norms}, result["ln"]["ops"]
    assert set(result["nn"]["ops"]) == {f"aten.native_layer_norm {placement} {dtype}",
                                        f"aten.native_layer_norm_backward {placement} {dtype}"}, result["nn"]["ops"]


def assert_trained(result):
    """The runs did train: parameters moved, and norm gradients are not zero."""
    first = result["ln"]["grads"]
    assert any(first[n].abs().max() > 0 for n in first if "norm" in n)
    model, _ = make_models()
    moved = [n for n, p in model.named_parameters() if not torch.equal(p.detach(), result["ln"]["params"][n])]
    assert len(moved) == len(first)


def test_ddp(two_ranks):
    r = result_of(two_ranks, "ddp")
    assert_runs_close(r["ln"], r["nn"], "DDP")
    assert_ops(r, "local")
    assert_trained(r)


def test_fsdp2(two_ranks):
    r = result_of(two_ranks, "fsdp2")
    assert_runs_close(r["ln"], r["nn"], "FSDP2")
    assert_ops(r, "local")
    assert_trained(r)


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def test_fsdp2_bf16_mixed_precision(two_ranks):
    """param_dtype bf16: the norms run on bf16 inputs and parameters. ln_ext and
    nn.LayerNorm round differently there (ln_ext rounds once from float32), so rather
    than bitwise agreement: both stay close to the float32 FSDP2 run, and ln_ext is
    never further from it than 2x nn.LayerNorm (the project's accuracy rule) + 1e-4.
    Measured: ln_ext 0.5-1.1% from float32 on the first gradients, nn.LayerNorm 0.55-1.1%."""
    r = result_of(two_ranks, "fsdp2_bf16")
    ref = result_of(two_ranks, "fsdp2")["nn"]
    assert_ops(r, "local", torch.bfloat16)
    checks = [("loss", r["ln"]["loss"], r["nn"]["loss"], ref["loss"]),
              ("logits", r["ln"]["logits"], r["nn"]["logits"], ref["logits"])]
    checks += [(f"grad {n}", r["ln"]["grads"][n], r["nn"]["grads"][n], ref["grads"][n]) for n in ref["grads"]]
    checks += [(f"param {n}", r["ln"]["params"][n], r["nn"]["params"][n], ref["params"][n]) for n in ref["params"]]
    for what, ln, nn_, want in checks:
        assert torch.isfinite(ln).all(), what
        err_ln, err_nn = _rel(ln, want), _rel(nn_, want)
        assert err_ln <= 2 * err_nn + 1e-4, f"{what}: ln_ext {err_ln:.2e} vs nn.LayerNorm {err_nn:.2e} from float32"
        assert err_ln < 0.05, f"{what}: ln_ext bf16 is {err_ln:.2e} from the float32 run"


def test_tensor_sequence_parallel(two_ranks):
    r = result_of(two_ranks, "tp_sp")
    assert_runs_close(r["ln"], r["nn"], "TP+SP")
    assert_ops(r, "(Shard(dim=1),)")  # every norm sees the residual stream's sequence shard
    assert_trained(r)
    # And TP reproduces the unsharded model.
    assert_runs_close(r["ln"], r["single"], "TP+SP vs one process")


def test_fsdp2_over_tp_2d_mesh(four_ranks):
    r = result_of(four_ranks, "fsdp2_tp_2d")
    assert_runs_close(r["ln"], r["nn"], "FSDP2 x TP")
    assert_ops(r, "(Shard(dim=1),)")
    assert_trained(r)


def test_compile_tp_no_graph_break(two_ranks):
    r = result_of(two_ranks, "compile_tp")
    # fullgraph=True and one frame: the whole model is one graph, every norm an ln_ext op in it.
    assert r["frames"] == 1
    assert r["graph_ops"] == {"ln_ext.layer_norm_fwd": 2 * MODEL["layers"] + 1}, r["graph_ops"]
    assert_runs_close(r["ln"], r["nn"], "compiled TP ln_ext vs eager TP nn.LayerNorm")


def test_dtensor_layer_norm(two_ranks):
    """Every leading dim sharded (evenly and not), replicated, a normalized dim sharded
    (redistributed, as aten does), a Partial input; weight/bias None; x not needing grad
    (dx not computed)."""
    r = result_of(two_ranks, "dtensor_ops")
    assert len(r["layer_norm"]) == 40
    for c in r["layer_norm"]:
        got, local, aten = c["ln_ext"], c["local"], c["aten"]
        exact = "P(sum)" not in c["case"]
        if exact:  # a Partial input is reduced first: aten all-reduces, ours is reduce-scattered (cheaper)
            assert got["placements"] == aten["placements"], (c["case"], got["placements"], aten["placements"])
        # Each rank normalizes whole rows with the same kernel: y and dx bitwise equal to
        # one call on the whole tensor; dweight/dbias sum the rows in another order.
        # (A Partial input's shares are summed first, which rounds: tolerance then.)
        for k in ("y", "dx", "dw", "db"):
            if local[k] is None:
                assert got[k] is None
                continue
            if exact and k in ("y", "dx"):
                assert torch.equal(got[k], local[k]), f"{c['case']}: {k}"
            else:
                torch.testing.assert_close(got[k], local[k], atol=5e-5 * float(local[k].abs().max()), rtol=5e-5,
                                           msg=lambda m: f"{c['case']}: {k}: {m}")
    s = r["stats"]
    assert s["placements"] == ["(Shard(dim=1),)"] * 3 and s["shape"] == (4, 6)
    for k in ("mean", "rstd"):
        assert torch.equal(*s[k]), k


def test_dtensor_ln_rnn_cells(two_ranks):
    r = result_of(two_ranks, "dtensor_ops")
    assert len(r["cells"]) == 6
    for case, res in r["cells"]:
        got, want = res["dtensor"], res["local"]
        assert got["placement"] == ("(Shard(dim=0),)" if "S(0)" in case else "(Replicate(),)"), case
        # The cells' GEMMs round differently on 2 rows than on 4 (CPU blocking), and the
        # parameter gradients are summed per rank, then across ranks: float32 rounding.
        for a, b in zip(got["out"], want["out"]):
            torch.testing.assert_close(a, b, **TOL, msg=lambda m: f"{case}: {m}")
        torch.testing.assert_close(got["dx"], want["dx"], **TOL, msg=lambda m: f"{case} dx: {m}")
        assert got["grads"].keys() == want["grads"].keys()
        for n in want["grads"]:
            torch.testing.assert_close(got["grads"][n], want["grads"][n], **TOL, msg=lambda m: f"{case} {n}: {m}")


def test_distributed_checkpoint(two_ranks):
    r = result_of(two_ranks, "dcp")
    assert r["types"] == ("ln_ext.modules.LayerNorm", "torch.nn.modules.normalization.LayerNorm",
                          "ln_ext.modules.LayerNorm")
    for saved, loaded in (("saved_ln", "loaded_nn"), ("saved_nn", "loaded_ln")):
        for part in (0, 1):  # model, optimizer state: every entry, bitwise
            assert r[saved][part].keys() == r[loaded][part].keys()
            assert len(r[saved][part]) > 0
            for k in r[saved][part]:
                assert torch.equal(r[saved][part][k], r[loaded][part][k]), f"{saved} -> {loaded}: {k}"
    torch.testing.assert_close(*r["next_loss"], **TOL)
    for k in r["after_next"][0]:
        torch.testing.assert_close(*(d[k] for d in r["after_next"]), **TOL)


@pytest.mark.parametrize("order", ["ln_ext first", "dtensor first"])
def test_rules_registered_whenever_dtensor_is_imported(order):
    """`import ln_ext` leaves torch.distributed.tensor unimported (it costs ~1 s), and the
    rules are registered whichever of the two a program imports first."""
    first, second = ("import ln_ext", "import torch.distributed.tensor")[:: 1 if order == "ln_ext first" else -1]
    code = f"""
import importlib.util, sys
{first}
print("dtensor imported:", "torch.distributed.tensor" in sys.modules)
importlib.util.find_spec("torch.distributed.tensor")  # a probe that imports nothing changes nothing
{second}
import torch
from torch.distributed.tensor import DTensor
funcs = DTensor._op_dispatcher.sharding_propagator.op_strategy_funcs
import ln_ext.distributed
print("registered:", all(getattr(torch.ops.ln_ext, n).default in funcs for n in ln_ext.distributed.RULES))
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split("\n")[:2] == [f"dtensor imported: {order == 'dtensor first'}", "registered: True"]


def test_imports_without_torch_distributed():
    """ln_ext works on a torch built without torch.distributed (simulated)."""
    code = """
import torch
torch.distributed.is_available = lambda: False
import ln_ext
x = torch.randn(3, 8)
torch.testing.assert_close(ln_ext.layer_norm(x, (8,)), torch.nn.functional.layer_norm(x, (8,)))
print("ok")
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]


def test_example_runs_under_torchrun(tmp_path):
    """examples/train_parallel.py as the README launches it: 2 ranks (dp 1 x tp 2)."""
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(_free_port()),
           os.path.join(ROOT, "examples", "train_parallel.py"), "--steps", "2", "--seq", "8"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = [line.split() for line in done.stdout.splitlines() if line.strip()[:1].isdigit()]
    assert [int(row[0]) for row in rows] == [0, 1], done.stdout
    for _, loss_nn, loss_ln, diff in rows:
        assert abs(float(loss_nn) - float(loss_ln)) <= 1e-5 * float(loss_nn), done.stdout
