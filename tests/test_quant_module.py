"""QuantLinear and quantize_(): accuracy vs the float layer, autograd, serialisation, dtype moves,
torch.compile, bad input, and a small LM trained here on real text keeping its perplexity."""
from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

import bigkernels as bk
from bigkernels.nn import QuantLinear
from conftest import assert_close, devices

MODES = ["w8a8", "w8a16"]
BOUND = {"w8a8": 2e-2, "w8a16": 1e-2}  # relative error vs the float layer on Gaussian data


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape", [(5, 123), (2, 3, 123), (1, 123), (0, 123)])
def test_close_to_the_float_layer(device, mode, shape):
    torch.manual_seed(1)
    lin = nn.Linear(123, 77).to(device)
    q = QuantLinear.from_linear(lin, mode=mode)
    x = torch.randn(shape, device=device)
    y, ref = q(x), lin(x)
    assert y.shape == ref.shape and y.dtype == x.dtype
    if x.numel():
        assert _rel(y, ref) <= BOUND[mode], f"{mode}: relative error {_rel(y, ref):.3g}"


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("mode", MODES)
def test_16bit_inputs_give_16bit_outputs(device, mode):
    torch.manual_seed(2)
    lin = nn.Linear(64, 48).to(device)
    q = QuantLinear.from_linear(lin, mode=mode).to(torch.bfloat16)
    x = torch.randn(7, 64, device=device)
    y = q(x.bfloat16())
    assert y.dtype == torch.bfloat16 and _rel(y, lin(x)) <= BOUND[mode] + 1e-2
    assert q.weight_int8.dtype == torch.int8 and q.weight_scale.dtype == torch.float32
    assert q.weight.dtype == torch.bfloat16 and q.weight.shape == (48, 64)


@pytest.mark.parametrize("mode", MODES)
def test_zero_token_gives_bias_and_nan_stays_in_its_row(mode):
    torch.manual_seed(3)
    q = QuantLinear.from_linear(nn.Linear(32, 16), mode=mode)
    x = torch.randn(4, 32)
    x[1] = 0.0
    x[2, 5] = float("nan")
    y = q(x)
    assert_close(y[1], q.bias.detach(), rtol=1e-6, atol=1e-6, what="zero token")
    assert torch.isnan(y[2]).all() and torch.isfinite(y[[0, 1, 3]]).all()


@pytest.mark.parametrize("mode", MODES)
def test_gradient_flows_to_input_and_bias(mode):
    torch.manual_seed(4)
    lin = nn.Linear(40, 24)
    q = QuantLinear.from_linear(lin, mode=mode)
    x = torch.randn(6, 40, requires_grad=True)
    g = torch.randn(6, 24)
    q(x).backward(g)
    deq = x.detach().clone().requires_grad_()
    torch.nn.functional.linear(deq, q.weight, q.bias.detach()).backward(g)
    assert_close(x.grad, deq.grad, rtol=1e-5, atol=1e-6, what="grad x")
    assert_close(q.bias.grad, g.sum(0), rtol=1e-5, atol=1e-6, what="grad bias")
    assert not q.weight_int8.requires_grad


def test_state_dict_and_safetensors_round_trip():
    torch.manual_seed(5)
    model = bk.quantize_(nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8)), mode="w8a8",
                         calibration_data=[torch.randn(4, 16)])
    x = torch.randn(3, 16)
    fresh = bk.quantize_(nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8)), mode="w8a8",
                         calibration_data=[torch.randn(4, 16)])
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    buf.seek(0)
    fresh.load_state_dict(torch.load(buf))
    assert torch.equal(fresh(x), model(x))
    safetensors = pytest.importorskip("safetensors.torch")
    blob = safetensors.save(model.state_dict())
    again = copy.deepcopy(fresh)
    again.load_state_dict(safetensors.load(blob))
    assert torch.equal(again(x), model(x))
    assert again[0].weight_int8.dtype == torch.int8


def test_repr_weight_and_linear_attributes():
    q = QuantLinear(20, 10, bias=False, mode="w8a16")
    text = repr(q)
    assert "w8a16" in text and "int8[10, 20]" in text
    assert q.in_features == 20 and q.out_features == 10 and q.bias is None
    assert q.weight.shape == (10, 20) and q.weight.dtype == torch.float32


@pytest.mark.parametrize("mode", MODES)
def test_compiles_fullgraph(mode, force_linear_dispatch):
    # Compiled graphs always trace the int8 op; eager inference may pick the dense product for
    # these tiny layers (w8a8 then skips activation quantisation), so compare with the op path.
    force_linear_dispatch("kernel")
    torch._dynamo.reset()
    torch.manual_seed(6)
    model = bk.quantize_(nn.Sequential(nn.Linear(24, 48), nn.GELU(), nn.Linear(48, 12)), mode=mode)
    x = torch.randn(5, 24)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    assert_close(compiled(x), model(x), rtol=1e-6, atol=1e-6, what="compiled")


def test_quantize_filter_fn_and_bad_input():
    torch.manual_seed(7)
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 4))
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="mode"):
        bk.quantize_(model, mode="int4")
    with pytest.raises(ValueError, match="smooth_alpha"):
        bk.quantize_(model, smooth_alpha=1.5)
    assert all(type(m) is nn.Linear for m in model) and all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    out = bk.quantize_(model, filter_fn=lambda m, fqn: fqn == "1")
    assert out is model and type(model[0]) is nn.Linear and isinstance(model[1], QuantLinear)
    q = model[1]
    with pytest.raises(ValueError, match="in_features=8"):
        q(torch.randn(3, 5))
    with pytest.raises(TypeError, match="floating"):
        q(torch.ones(3, 8, dtype=torch.int64))
    with pytest.raises(TypeError, match="nn.Linear"):
        QuantLinear.from_linear(nn.Conv1d(2, 2, 1))
    with pytest.raises(ValueError, match="mode"):
        QuantLinear(4, 4, mode="w4a16")


@pytest.mark.slow
def test_small_lm_keeps_its_perplexity_after_w8a8_smoothquant():
    from bigkernels.demo.data import batches, load_corpus
    from bigkernels.demo.model import TinyGPT, perplexity

    torch.manual_seed(0)
    train, heldout = load_corpus(max_bytes=1_200_000)
    seq = 64
    model = TinyGPT(d=128, layers=2, heads=4, seq=seq)
    opt = bk.optim.FusedAdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    it = batches(train, 32, seq, torch.Generator().manual_seed(0))
    for _ in range(300):
        x, y = next(it)
        loss = torch.nn.functional.cross_entropy(model(x).reshape(-1, 256), y.reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    dense = perplexity(model, heldout, seq)
    assert dense < 12, f"the model did not learn (held-out perplexity {dense:.2f})"
    calibration = [next(it)[0] for _ in range(8)]
    for mode, data in (("w8a16", None), ("w8a8", calibration)):
        q = bk.quantize_(copy.deepcopy(model), mode=mode, calibration_data=data)
        ppl = perplexity(q, heldout, seq)
        assert ppl <= dense * 1.01, f"{mode}: perplexity {ppl:.4f} vs dense {dense:.4f}"
