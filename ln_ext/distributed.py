"""DTensor sharding rules of ln_ext's ops (tensor and sequence parallelism).

Every op here normalizes rows, and follows aten's layer_norm strategy: a tensor is a
stack of rows over its leading dims, any one leading ("row") dim may be sharded as
long as every row-shaped argument and result is sharded on that same dim, and the
normalized (feature) dims are whole on every rank, so an input sharded there is
redistributed (all-gathered, as aten does) instead of refused. Parameters are
replicated; a parameter gradient summed over the rows is Partial (sum) when the rows
are sharded, since each rank holds the sum over its own rows.

Adding an op is one entry in RULES, naming the role of each tensor argument and each
result in schema order (non-tensor arguments are skipped):

    "layer_norm_fwd": Rule(args=(ROW, PARAM, PARAM), outs=(ROW, ROW, ROW),
                           row_dims=lambda a: a.x.ndim - len(a.normalized_shape)),

  ROW      row-shaped, [*rows, *features]: sharded on a row dim, or replicated
  PARAM    replicated (weight, bias, gains)
  ROW_SUM  a parameter gradient summed over the rows: Partial when rows are sharded
  SEQ      a time-major sequence [T, B, ...] of row-shaped steps: its dim 1 is sharded
           where ROW tensors shard dim 0 (the LN-RNN sequence ops' batch)
row_dims(a) says how many leading dims are rows, from the call's arguments by schema
name; empty(a), when given, says which results the call leaves as empty placeholders
(replicated). The rules are registered once both ln_ext and torch.distributed.tensor
are imported, whichever comes first; with a torch built without torch.distributed, or
too old for DTensor's register_sharding, there is nothing to register and ln_ext works
as before.
"""
from __future__ import annotations

import dataclasses
import importlib.abc
import importlib.util
import sys
import types
from typing import Callable, Optional, Sequence

import torch

from . import _C  # noqa: F401  (loading it registers torch.ops.ln_ext.*)

ROW, PARAM, ROW_SUM, SEQ = "row", "param", "row_sum", "seq"


@dataclasses.dataclass(frozen=True)
class Rule:
    args: Sequence[str]
    outs: Sequence[str]
    row_dims: Callable[[types.SimpleNamespace], int]
    empty: Optional[Callable[[types.SimpleNamespace], Sequence[bool]]] = None


_BATCH = lambda a: 1  # noqa: E731  (LN-RNN cells: every row tensor is [B, n], rows = batch)
_UNPACKED = lambda a: 0 if a.batch_sizes is not None else 1  # noqa: E731  (LN-RNN sequences)

RULES = {
    "layer_norm_fwd": Rule(
        args=(ROW, PARAM, PARAM),  # x, weight?, bias?
        outs=(ROW, ROW, ROW),  # y, mean, rstd (mean/rstd: x.shape[:-k], so they shard alike)
        row_dims=lambda a: a.x.ndim - len(a.normalized_shape),
    ),
    "layer_norm_bwd": Rule(
        args=(ROW, ROW, ROW, ROW, PARAM, PARAM, ROW),  # dy, x, mean, rstd, weight?, bias?, grad_h?
        outs=(ROW, ROW_SUM, ROW_SUM),  # dx, dweight, dbias
        row_dims=lambda a: a.mean.ndim,
        empty=lambda a: (not a.output_mask[0], not a.output_mask[1] or a.weight is None,
                         not a.output_mask[2] or a.bias is None),
    ),
    # RMSNorm and add + norm: the same kernels (h and residual are row-shaped like x).
    "rms_norm_fwd": Rule(args=(ROW, PARAM), outs=(ROW, ROW),  # x, weight? -> y, rstd
                         row_dims=lambda a: a.x.ndim - len(a.normalized_shape)),
    "rms_norm_bwd": Rule(
        args=(ROW, ROW, ROW, PARAM, ROW),  # dy, x, rstd, weight?, grad_h?
        outs=(ROW, ROW_SUM),  # dx, dweight
        row_dims=lambda a: a.rstd.ndim,
        empty=lambda a: (not a.output_mask[0], not a.output_mask[1] or a.weight is None),
    ),
    "add_layer_norm_fwd": Rule(args=(ROW, ROW, PARAM, PARAM), outs=(ROW,) * 4,  # -> y, h, mean, rstd
                               row_dims=lambda a: a.x.ndim - len(a.normalized_shape)),
    "add_rms_norm_fwd": Rule(args=(ROW, ROW, PARAM), outs=(ROW,) * 3,  # -> y, h, rstd
                             row_dims=lambda a: a.x.ndim - len(a.normalized_shape)),
    # LN-RNN cells: per-row parameter contributions (*_rows) are ROW results; the
    # modules sum them over the batch with torch ops, which DTensor handles.
    "rnn_cell_fwd": Rule((ROW, ROW, PARAM, PARAM), (ROW, ROW), _BATCH),
    "rnn_cell_bwd": Rule((ROW, ROW, ROW, ROW, PARAM, PARAM), (ROW,) * 3, _BATCH),
    "lstm_cell_fwd": Rule((ROW, ROW, ROW) + (PARAM,) * 4, (ROW,) * 4, _BATCH),
    "lstm_cell_bwd": Rule((ROW,) * 7 + (PARAM,) * 3, (ROW,) * 6, _BATCH),
    "gru_cell_fwd": Rule((ROW,) * 4 + (PARAM, PARAM), (ROW,) * 3, _BATCH),
    "gru_cell_bwd": Rule((ROW,) * 5 + (PARAM,), (ROW,) * 6, _BATCH),
    # The LN-RNN input projection (input @ weight^T): any leading dim of input is rows.
    "input_projection": Rule((ROW, PARAM), (ROW,), lambda a: a.input.ndim - 1),
    # LN-RNN sequences: [T, B, n] sequence tensors (SEQ) beside [B, H] states (ROW), the
    # batch sharded. A packed sequence mixes sequences in its rows: replicated only.
    # batch_sizes (CPU, host-read) is a PARAM.
    # save=False (inference) leaves the saved results empty.
    "rnn_sequence_fwd": Rule((SEQ, PARAM, ROW, PARAM, PARAM, PARAM), (SEQ, ROW, SEQ, SEQ), _UNPACKED,
                             empty=lambda a: (False, False) + (not a.save,) * 2),
    "rnn_sequence_bwd": Rule((SEQ, ROW, SEQ, PARAM, ROW, SEQ, SEQ, SEQ, PARAM, PARAM, PARAM),
                             (SEQ, ROW_SUM, ROW, ROW_SUM, ROW_SUM), _UNPACKED),
    # LSTM: weight_hr (PARAM, optional) and h_full (SEQ; empty without it).
    "lstm_sequence_fwd": Rule((SEQ, PARAM, ROW, ROW) + (PARAM,) * 6, (SEQ, ROW, ROW) + (SEQ,) * 5, _UNPACKED,
                              empty=lambda a: (False,) * 3 + (not a.save,) * 4
                              + (not a.save or a.weight_hr is None,)),
    "lstm_sequence_bwd": Rule((SEQ, ROW, ROW, PARAM, ROW, ROW) + (SEQ,) * 5 + (PARAM,) * 5 + (SEQ,),
                              (SEQ, ROW_SUM, ROW, ROW) + (ROW_SUM,) * 5, _UNPACKED,
                              empty=lambda a: (False,) * 8 + (a.weight_hr is None,)),
    "gru_sequence_fwd": Rule((SEQ, SEQ, PARAM, ROW, PARAM, PARAM, PARAM), (SEQ, ROW, SEQ, SEQ, SEQ), _UNPACKED,
                             empty=lambda a: (False,) * 2 + (not a.save,) * 3),
    "gru_sequence_bwd": Rule((SEQ, ROW, PARAM, ROW) + (SEQ,) * 4 + (PARAM, PARAM),
                             (SEQ, SEQ, ROW_SUM, ROW, ROW_SUM, ROW_SUM), _UNPACKED),
}


def _is_tensor_arg(arg) -> bool:
    t = arg.type
    if isinstance(t, torch.OptionalType):
        t = t.getElementType()
    return isinstance(t, torch.TensorType)


def _strategy(rule: Rule, schema, placements):
    """The register_sharding function of one op: its acceptable (outputs, inputs)
    placements on one mesh dim; DTensor expands them over every mesh dim."""
    arguments = schema.arguments
    tensor_args = [a.name for a in arguments if _is_tensor_arg(a)]
    role = dict(zip(tensor_args, rule.args))
    Replicate, Shard, Partial = placements

    def sharding(*args, **kwargs):
        bound = {a.name: a.default_value if a.has_default_value() else None for a in arguments}
        bound.update(zip((a.name for a in arguments), args))
        bound.update(kwargs)
        call = types.SimpleNamespace(**bound)
        given = [a.name for a in arguments[: len(args)]] + list(kwargs)
        empty = rule.empty(call) if rule.empty else (False,) * len(rule.outs)

        def one(row):
            def place(r):
                if r == PARAM or row is None:
                    return Replicate()
                if r == ROW_SUM:
                    return Partial("sum")
                return Shard(row + 1) if r == SEQ else Shard(row)

            outs = [Replicate() if e else place(r) for r, e in zip(rule.outs, empty)]
            ins = [place(role[n]) if n in role and bound[n] is not None else None for n in given]
            return outs, ins

        return [one(None)] + [one(d) for d in range(rule.row_dims(call))]

    return sharding


def register() -> None:
    """Register every rule in RULES with DTensor (imports torch.distributed.tensor)."""
    try:
        from torch.distributed.tensor import DTensor, Partial, Replicate, Shard
        from torch.distributed.tensor._op_schema import RuntimeSchemaInfo
        from torch.distributed.tensor.experimental import register_sharding
    except ImportError:  # a torch older than DTensor's public API (2.5)
        return

    propagator = DTensor._op_dispatcher.sharding_propagator
    for name, rule in RULES.items():
        op = getattr(torch.ops.ln_ext, name).default
        schema = op._schema
        n_tensors = sum(_is_tensor_arg(a) for a in schema.arguments)
        if len(rule.args) != n_tensors or len(rule.outs) != len(schema.returns):
            raise RuntimeError(f"ln_ext.distributed: the rule of {name} does not match its schema {schema}")
        register_sharding(op)(_strategy(rule, schema, (Replicate, Shard, Partial)))
        # register_sharding has DTensor's Python-side cache key each decision on the
        # arguments from the first int-typed one on (here none, or out_dtype), so calls
        # differing only in normalized_shape, output_mask or which optional tensor is
        # None could share one decision. Key on everything from the first non-Tensor.
        static = next((i for i, a in enumerate(schema.arguments) if not isinstance(a.type, torch.TensorType)),
                      len(schema.arguments))
        kwargs = [a.name for a in schema.arguments[static:]]
        propagator.op_to_schema_info[op] = RuntimeSchemaInfo(static, kwargs or None, needs_pytree=True)


_DTENSOR = "torch.distributed.tensor"


class _RegisterOnImport(importlib.abc.MetaPathFinder):
    """Runs register() right after torch.distributed.tensor is first imported. Importing
    it takes ~1 s, which `import ln_ext` should not cost programs that never use DTensor;
    programs that do import it before making a DTensor."""

    def __init__(self):
        self._finding = False

    def find_spec(self, name, path, target=None):
        if name != _DTENSOR or self._finding:
            return None
        self._finding = True
        try:
            spec = importlib.util.find_spec(name)  # what the other finders make of it
        finally:
            self._finding = False
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_register(module):
            exec_module(module)
            if self in sys.meta_path:
                sys.meta_path.remove(self)
            register()

        spec.loader.exec_module = exec_then_register
        return spec


def _register_when_available() -> None:
    if not torch.distributed.is_available():  # a torch built without it: nothing to shard
        return
    if _DTENSOR in sys.modules:
        register()
    else:
        sys.meta_path.insert(0, _RegisterOnImport())


_register_when_available()
