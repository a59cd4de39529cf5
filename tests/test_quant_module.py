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


# ----- model-level behaviour: layer selection, repeated calls, errors at call time, loading -------
def _mlp(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8)).to(dtype)


def test_quantize_a_bare_linear_raises_and_changes_nothing():
    lin = nn.Linear(8, 4)
    before = lin.weight.detach().clone()
    with pytest.raises(ValueError, match=r"itself a linear layer \(nn.Linear\).*QuantLinear.from_linear"):
        bk.quantize_(lin)
    assert type(lin) is nn.Linear and torch.equal(lin.weight, before)


def test_quantize_twice():
    model = bk.quantize_(_mlp(), mode="w8a8")
    int8 = model[0].weight_int8.clone()
    with pytest.raises(ValueError, match=r"0 \(mode='w8a8'\), 2 \(mode='w8a8'\) already quantised.*'w8a16'"):
        bk.quantize_(model, mode="w8a16")
    with pytest.warns(UserWarning, match=r"converted no layer; 0, 2 \(already QuantLinear\(w8a8\)\)"):
        bk.quantize_(model, mode="w8a8")
    assert model[0].mode == "w8a8" and torch.equal(model[0].weight_int8, int8)
    # layers left out the first time are quantised the second time, in the other mode
    model = bk.quantize_(_mlp(), mode="w8a8", filter_fn=lambda m, fqn: fqn == "0")
    bk.quantize_(model, mode="w8a16", filter_fn=lambda m, fqn: isinstance(m, nn.Linear))
    assert model[0].mode == "w8a8" and model[2].mode == "w8a16"


class _MyLinear(nn.Linear):
    pass


def test_linear_subclasses_and_attention_out_proj():
    torch.manual_seed(1)
    model = nn.Sequential(_MyLinear(16, 16), nn.MultiheadAttention(16, 2, batch_first=True))
    bk.quantize_(model, mode="w8a16")
    assert isinstance(model[0], QuantLinear)
    # MultiheadAttention reads out_proj.weight itself: left alone (as torchao does) ...
    assert type(model[1].out_proj) is nn.modules.linear.NonDynamicallyQuantizableLinear
    # ... and prune_ treats subclasses the same way (isinstance, not the exact type)
    sub = bk.prune_(nn.Sequential(_MyLinear(16, 16), nn.Linear(16, 8)), sparsity=0.5)
    assert all(hasattr(m, "weight_mask") for m in sub)


def test_float64_raises_at_call_time_naming_the_layer():
    model = _mlp(dtype=torch.float64)
    with pytest.raises(TypeError, match=r"quantize_: 0, 2 have float64 weights.*model.float\(\)"):
        bk.quantize_(model)
    assert all(type(m) is not QuantLinear for m in model)
    with pytest.raises(TypeError, match="float64"):
        QuantLinear.from_linear(nn.Linear(4, 4).double())
    q = QuantLinear.from_linear(nn.Linear(4, 4))
    with pytest.raises(TypeError, match="QuantLinear: expected an input of dtype float32, bfloat16, float16, got float64"):
        q(torch.randn(2, 4, dtype=torch.float64))


def test_calibration_batch_of_the_wrong_shape_names_the_layer():
    model = _mlp()
    with pytest.raises(ValueError, match=r"calibration batch 1: layer '0' got an input of shape \(4, 15\).*in_features=16"):
        bk.quantize_(model, calibration_data=[torch.randn(4, 16), torch.randn(4, 15)])
    assert all(type(m) is not QuantLinear for m in model)
    with pytest.raises(ValueError, match="no batches"):
        bk.quantize_(model, calibration_data=[])
    # one tensor is one batch (not an iterable of rows); w8a16 ignores calibration data, saying so
    bk.quantize_(model, calibration_data=torch.randn(4, 16), filter_fn=lambda m, fqn: fqn == "0")
    assert model[0].smooth_scale is not None
    with pytest.warns(UserWarning, match="used by mode='w8a8'"):
        bk.quantize_(model, mode="w8a16", calibration_data=torch.randn(4, 16), filter_fn=lambda m, fqn: fqn == "2")


def test_quantize_logs_what_it_converted_and_warns_when_nothing(caplog):
    torch.manual_seed(2)
    emb = nn.Embedding(10, 8)
    head = nn.Linear(8, 10, bias=False)
    head.weight = emb.weight  # tied
    model = nn.ModuleDict(dict(emb=emb, body=nn.Linear(8, 8), head=head))
    with caplog.at_level("INFO", logger="bigkernels"):
        bk.quantize_(model, mode="w8a16")
    assert "quantize_: 1 layer -> QuantLinear(w8a16): body; left alone: head (weight tied to emb)" in caplog.text
    assert type(model["head"]) is nn.Linear and model["head"].weight is model["emb"].weight
    # filter_fn choosing the tied layer: still never untied, and said so
    with pytest.warns(UserWarning) as caught:
        bk.quantize_(model, mode="w8a16", filter_fn=lambda m, fqn: fqn == "head")
    assert [str(w.message) for w in caught] == [
        "quantize_: left alone although filter_fn chose them: head (weight tied to emb: replacing it would untie "
        "it and keep both copies)", "quantize_: converted no layer; body (filter_fn returned False)"]
    assert type(model["head"]) is nn.Linear
    with pytest.warns(UserWarning, match="converted no layer; the model has no linear layer"):
        bk.quantize_(nn.Sequential(nn.ReLU()))
    with pytest.warns(UserWarning, match=r"converted no layer; 0, 2 \(filter_fn returned False\)"):
        bk.quantize_(_mlp(), filter_fn=lambda m, fqn: False)


@pytest.mark.parametrize("saved_with_smoothquant", [True, False])
def test_state_dict_loads_into_a_fresh_quantize_without_calibration(saved_with_smoothquant):
    calib = [torch.randn(4, 16)]
    model = bk.quantize_(_mlp(3), mode="w8a8", calibration_data=calib if saved_with_smoothquant else None)
    x = torch.randn(5, 16)
    # the fresh model is quantised the other way (no calibration data, or with it)
    fresh = bk.quantize_(_mlp(4), mode="w8a8", calibration_data=None if saved_with_smoothquant else calib)
    fresh.load_state_dict(model.state_dict())
    assert (fresh[0].smooth_scale is not None) == saved_with_smoothquant
    assert torch.equal(fresh(x), model(x))


def test_meta_skeleton_load_state_dict_assign_and_safetensors():
    safetensors = pytest.importorskip("safetensors.torch")
    model = bk.quantize_(_mlp(5), mode="w8a8", calibration_data=[torch.randn(4, 16)])
    blob = safetensors.save(model.state_dict())
    with torch.device("meta"):
        skeleton = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))
    bk.quantize_(skeleton, mode="w8a8")
    skeleton.load_state_dict(safetensors.load(blob), assign=True)
    assert all(t.device.type == "cpu" for t in [*skeleton.parameters(), *skeleton.buffers()])
    x = torch.randn(3, 16)
    assert torch.equal(skeleton(x), model(x))
    skeleton.to("cpu", torch.bfloat16)  # nothing left on meta to trip over
    assert skeleton[0].weight.dtype == torch.bfloat16 and skeleton[0].weight_scale.dtype == torch.float32
    # a layer built empty (what from_pretrained does) loads the same tensors
    empty = QuantLinear.empty(16, 32, mode="w8a8", smoothquant=True, device="meta")
    empty.load_state_dict({k[2:]: v for k, v in safetensors.load(blob).items() if k.startswith("0.")}, assign=True)
    assert torch.equal(empty(x), model[0](x))


# The inference kernel path calls the op bodies directly (no autograd custom-op layer); in grad
# mode a bias that wants a gradient is added by torch's add (fp32: the kernel's own rounding).
@pytest.mark.parametrize("mode", ["w8a8", "w8a16"])
@pytest.mark.parametrize("smooth", [False, True], ids=["plain", "smoothquant"])
def test_inference_kernel_path_matches_the_differentiable_op(mode, smooth, force_linear_dispatch):
    force_linear_dispatch("kernel")
    torch.manual_seed(0)
    lin = nn.Linear(123, 77)
    q = QuantLinear.from_linear(lin, mode=mode)
    if smooth:
        q.smooth_scale = torch.rand(123) + 0.5
    wide = torch.randn(5, 9, 2 * 123)
    for x in (torch.randn(5, 123, 123), wide[:, :, ::2], torch.randn(1, 123), torch.randn(0, 123),
              torch.randn(40, 123)):
        x2 = x.reshape(-1, 123)
        want = q._kernel_forward(x2)  # the autograd op
        want.sum().backward()
        want_grad, q.bias.grad = q.bias.grad, None
        got = q(x)  # grad mode, bias requires grad: kernel without bias + add
        assert got.shape == (*x.shape[:-1], 77)
        assert torch.equal(got.reshape(-1, 77), want.detach()), (mode, tuple(x.shape))
        if x2.shape[0]:
            assert got.requires_grad
            got.sum().backward()
            assert torch.equal(q.bias.grad, want_grad)
            q.bias.grad = None
        with torch.no_grad():
            assert torch.equal(q(x).reshape(-1, 77), want.detach())
    with torch.no_grad():  # bf16: the bias inside the kernel either way
        qb = copy.deepcopy(q).to(torch.bfloat16)
        xb = torch.randn(7, 123, dtype=torch.bfloat16)
        assert torch.equal(qb(xb), qb._kernel_forward(xb))
    qb.bias.requires_grad_(True)
    assert torch.equal(qb(xb).detach(), qb._kernel_forward(xb).detach())
