"""ln_ext.LayerNorm as a drop-in for nn.LayerNorm, and convert_layer_norm."""
import copy

import pytest
import torch
from torch import nn

import ln_ext
from samples import DEVICES


def _randomize(module):
    """Parameters that are neither ones nor zeros, so a swapped weight/bias shows."""
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p) * 0.5 + 1)
    return module


@pytest.mark.parametrize("kwargs", [{}, {"bias": False}, {"elementwise_affine": False}, {"eps": 1e-3}])
@pytest.mark.parametrize("normalized_shape", [16, (4, 5)])
def test_same_module_as_nn_layer_norm(normalized_shape, kwargs):
    ours = ln_ext.LayerNorm(normalized_shape, **kwargs)
    ref = nn.LayerNorm(normalized_shape, **kwargs)
    assert isinstance(ours, nn.LayerNorm)
    assert repr(ours) == repr(ref)
    assert ours.normalized_shape == ref.normalized_shape and ours.eps == ref.eps
    assert list(ours.state_dict()) == list(ref.state_dict())
    for (name, p), (_, q) in zip(ours.named_parameters(), ref.named_parameters()):
        assert p.shape == q.shape and torch.equal(p, q), name  # same init
    # Output equal to nn.LayerNorm's with the same (random) parameters.
    _randomize(ref)
    ours.load_state_dict(ref.state_dict())
    shape = (normalized_shape,) if isinstance(normalized_shape, int) else normalized_shape
    x = torch.randn(3, *shape) * 2 + 1
    torch.testing.assert_close(ours(x), ref(x))


def test_state_dict_round_trip_both_ways():
    ours = _randomize(ln_ext.LayerNorm(24))
    ref = nn.LayerNorm(24)
    ref.load_state_dict(ours.state_dict())
    back = ln_ext.LayerNorm(24)
    back.load_state_dict(ref.state_dict())
    for name, t in ours.state_dict().items():
        assert torch.equal(ref.state_dict()[name], t) and torch.equal(back.state_dict()[name], t), name
    # Strict loading also checks that the key sets are the same.
    nn.LayerNorm(24, bias=False).load_state_dict(ln_ext.LayerNorm(24, bias=False).state_dict())


def test_reset_parameters():
    ln = _randomize(ln_ext.LayerNorm(10))
    ln.reset_parameters()
    assert torch.equal(ln.weight, torch.ones(10)) and torch.equal(ln.bias, torch.zeros(10))


def test_constructor_device_and_dtype():
    ln = ln_ext.LayerNorm(8, device="cpu", dtype=torch.float64)
    assert ln.weight.dtype == ln.bias.dtype == torch.float64
    x = torch.randn(2, 8, dtype=torch.float64)
    assert ln(x).dtype == torch.float64


def _encoder(norm_first, device):
    layer = nn.TransformerEncoderLayer(d_model=32, nhead=4, dim_feedforward=64, dropout=0.0,
                                       batch_first=True, norm_first=norm_first)
    # enable_nested_tensor=False: with it, eval-mode fast paths skip the modules' forward.
    model = nn.TransformerEncoder(layer, num_layers=2, norm=nn.LayerNorm(32), enable_nested_tensor=False)
    for m in _layer_norms(model):
        _randomize(m)
    return model.to(device)


def _layer_norms(model):
    return [m for m in model.modules() if isinstance(m, nn.LayerNorm)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("norm_first", [True, False])
def test_convert_transformer_encoder(device, norm_first):
    """Same outputs and gradients after conversion, same Parameter objects (an optimizer
    made before still updates them), same training flag and device."""
    model = _encoder(norm_first, device)
    x = torch.randn(3, 10, 32, device=device) * 2 + 0.3
    before = model(x)
    grads_before = torch.autograd.grad(before.square().sum(), list(model.parameters()))
    params_before = list(model.parameters())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    norms_before = _layer_norms(model)
    assert len(norms_before) == 5 and all(type(m) is nn.LayerNorm for m in norms_before)

    converted = ln_ext.convert_layer_norm(model)
    assert converted is model
    norms = _layer_norms(converted)
    assert len(norms) == 5 and all(type(m) is ln_ext.LayerNorm for m in norms)
    params = list(converted.parameters())
    assert len(params) == len(params_before) and all(p is q for p, q in zip(params, params_before))
    assert all(m.training for m in converted.modules())
    assert all(p.device.type == device for p in params)

    after = converted(x)
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)
    grads_after = torch.autograd.grad(after.square().sum(), params)
    for g, h in zip(grads_after, grads_before):
        torch.testing.assert_close(g, h, atol=1e-5, rtol=1e-4)

    # The optimizer made before conversion still steps the layer norms' parameters.
    w = norms[0].weight
    w_before = w.detach().clone()
    opt.zero_grad()
    converted(x).square().sum().backward()
    assert w.grad is not None
    opt.step()
    assert not torch.equal(w, w_before)


def test_convert_keeps_eval_mode_and_options():
    model = nn.Sequential(nn.Linear(6, 6), nn.LayerNorm(6, eps=1e-3, bias=False), nn.LayerNorm((2, 3), elementwise_affine=False))
    model.eval()
    ln_ext.convert_layer_norm(model)
    assert type(model[1]) is ln_ext.LayerNorm and type(model[2]) is ln_ext.LayerNorm
    assert not model[1].training and not model[2].training
    assert model[1].eps == 1e-3 and model[1].bias is None and model[1].weight is not None
    assert model[2].weight is None and model[2].normalized_shape == (2, 3)


def test_convert_a_bare_layer_norm_returns_the_new_module():
    ln = _randomize(nn.LayerNorm(12))
    new = ln_ext.convert_layer_norm(ln)
    assert type(new) is ln_ext.LayerNorm and new.weight is ln.weight and new.bias is ln.bias


def test_convert_leaves_subclasses_alone():
    class MyNorm(nn.LayerNorm):
        def forward(self, x):
            return super().forward(x) * 2

    model = nn.Sequential(MyNorm(4), nn.LayerNorm(4), ln_ext.LayerNorm(4))
    keep = [model[0], model[2]]
    ln_ext.convert_layer_norm(model)
    assert model[0] is keep[0] and model[2] is keep[1]
    assert type(model[1]) is ln_ext.LayerNorm


def test_converted_model_deepcopies_and_pickles(tmp_path):
    model = ln_ext.convert_layer_norm(nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4)))
    clone = copy.deepcopy(model)
    x = torch.randn(2, 4)
    torch.testing.assert_close(clone(x), model(x))
    torch.save(model, tmp_path / "m.pt")
    loaded = torch.load(tmp_path / "m.pt", weights_only=False)
    torch.testing.assert_close(loaded(x), model(x))
