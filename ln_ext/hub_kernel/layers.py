"""The layers ln_ext's kernel repository offers, by the names transformers decorates.

`kernels` demands a stateless layer: no `__init__`, no member beyond nn.Module's (and the
flags `can_torch_compile`, `has_backward`), and the forward signature of the class it replaces.
Its forward runs on the module instance it was swapped into, so `self` is, e.g., a LlamaRMSNorm.

The math is convert.py's: the form its TABLE gives the module's exact class (LlamaRMSNorm and
its copies: llama_rms; the OLMo 2 / GPT-OSS copies that share the name "RMSNorm": olmo2_rms;
Qwen3.5's zero-centered norm: gemma_rms), run by `convert.norm_with_form`. A class the table
does not know (a subclass, a class newer than the table) keeps its own forward, as
`convert_layer_norm` leaves it alone.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ln_ext import convert

_FORM_BY_CLASS: dict = {}  # class -> its NormForm, or None when ln_ext does not know it


def _form(cls: type) -> Optional[convert.NormForm]:
    try:
        return _FORM_BY_CLASS[cls]
    except KeyError:
        name = convert.TABLE.get(f"{cls.__module__}.{cls.__qualname__}")
        form = convert.FORMS[name] if name is not None else None
        _FORM_BY_CLASS[cls] = form
        return form


def _forward(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    form = _form(type(module))
    if form is None or not form.convertible(module):
        return type(module).forward(module, x)
    return convert.norm_with_form(form, module, x)


class RMSNorm(nn.Module):
    """For "RMSNorm": LlamaRMSNorm and the ~140 classes transformers decorates with it."""

    can_torch_compile = True
    has_backward = True

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return _forward(self, hidden_states)


class RMSNormZeroCentered(nn.Module):
    """For "RMSNormZeroCentered": Qwen3.5's RMSNorm, gain 1 + weight (Gemma's form)."""

    can_torch_compile = True
    has_backward = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _forward(self, x)
