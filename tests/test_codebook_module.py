"""CodebookLinear, 1-D k-means and share_weights_(): reconstruction error against known bounds,
weighted k-means, groups, packed storage size, autograd and codebook fine-tuning with FusedAdamW,
state_dict / safetensors round trips and rebuilding from config, dtype moves, torch.compile, the
shape dispatch, Hugging Face GPT-2 (Conv1D) and Llama from tiny configs, logging and bad input."""
from __future__ import annotations

import copy
import io
import logging
import math

import pytest
import torch
from torch import nn

import bigkernels as bk
from bigkernels.nn import CodebookLinear
from bigkernels.quant.codebook import kmeans_1d
from bigkernels.reference import codebook as ref
from conftest import assert_close, require_kernel

# Minimum mean squared error of any 2**bits-level scalar quantiser of N(0, 1) (Max, 1960; the
# Lloyd-Max quantiser): k-means on Gaussian weights must come within 2% of it (a finite sample's
# own optimum differs from the population's by well under 1% at these sizes).
LLOYD_MAX = {2: 0.1175, 3: 0.03454, 4: 0.009497}
# 8 bits: the high-resolution optimum (Panter & Dite, 1951): sqrt(3) pi / 2 * 4**-8 for N(0, 1).
PANTER_DITE_8 = math.sqrt(3) * math.pi / 2 * 4.0 ** -8


def _mse(w, idx, cent, gs):
    rows = cent[torch.arange(w.shape[0]) // gs]
    return (rows.gather(1, idx) - w).pow(2).mean().item()


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_kmeans_error_is_near_the_optimal_quantiser(bits):
    gen = torch.Generator().manual_seed(bits)
    w = torch.randn(512, 512, generator=gen)
    idx, cent = kmeans_1d(w, bits)
    assert idx.shape == w.shape and cent.shape == (1, 1 << bits)
    assert bool((cent[:, 1:] >= cent[:, :-1]).all()), "centroids must ascend"
    mse = _mse(w, idx, cent, 512)
    uidx, ucent = kmeans_1d(w, bits, method="uniform")
    uniform = _mse(w, uidx, ucent, 512)
    assert mse < 0.7 * uniform, f"{bits}-bit k-means {mse:.3g} is not clearly below uniform quantisation {uniform:.3g}"
    if bits in LLOYD_MAX:
        assert mse <= 1.02 * LLOYD_MAX[bits], f"{bits}-bit: {mse:.5f} vs the Lloyd-Max optimum {LLOYD_MAX[bits]}"
    else:
        assert mse <= 1.5 * PANTER_DITE_8, f"8-bit: {mse:.3g} vs the high-resolution optimum {PANTER_DITE_8:.3g}"
    # every weight is mapped to its nearest centroid
    dist = (w.unsqueeze(-1) - cent[0]).abs()
    assert bool((dist.gather(2, idx.unsqueeze(-1)).squeeze(-1) <= dist.min(-1).values + 1e-6).all())


def test_kmeans_weighted_by_activation_energy_lowers_the_weighted_error():
    gen = torch.Generator().manual_seed(1)
    scale = torch.linspace(0.2, 3.0, 256)
    w = torch.randn(64, 256, generator=gen) * scale  # columns of different widths
    energy = scale ** -4  # the narrow columns see the large activations: the output is sensitive there
    plain_idx, plain = kmeans_1d(w, 3)
    weighted_idx, weighted = kmeans_1d(w, 3, sample_weight=energy)

    def werr(idx, c):  # the diagonal approximation of the output error
        return ((c[0][idx] - w).pow(2) * energy).sum().item()

    assert werr(weighted_idx, weighted) < 0.5 * werr(plain_idx, plain)
    x = torch.randn(512, 256, generator=gen) * energy.sqrt()
    out_err = {name: (x @ (c[0][i] - w).T).pow(2).mean().item()
               for name, (i, c) in (("plain", (plain_idx, plain)), ("weighted", (weighted_idx, weighted)))}
    assert out_err["weighted"] < 0.5 * out_err["plain"], out_err
    with pytest.raises(ValueError, match="sample_weight"):
        kmeans_1d(w, 3, sample_weight=torch.ones(7))
    with pytest.raises(ValueError, match="non-negative"):
        kmeans_1d(w, 3, sample_weight=-energy)


def test_group_codebooks_follow_row_scales():
    gen = torch.Generator().manual_seed(2)
    scale = torch.tensor([0.01, 0.1, 1.0, 10.0]).repeat_interleave(8)[:30].unsqueeze(1)  # last group shorter
    w = torch.randn(30, 100, generator=gen) * scale
    idx_g, cent_g = kmeans_1d(w, 4, group_size=8)
    idx_1, cent_1 = kmeans_1d(w, 4)
    assert cent_g.shape == (4, 16)
    rel_g = ((cent_g[torch.arange(30) // 8].gather(1, idx_g) - w).norm(dim=1) / w.norm(dim=1)).mean().item()
    rel_1 = ((cent_1[0][idx_1] - w).norm(dim=1) / w.norm(dim=1)).mean().item()
    # sqrt(Lloyd-Max 4-bit) = 0.097 relative error per row, plus sampling noise of 100-weight rows
    assert rel_g < 0.12 and rel_1 > 0.5, f"per-group codebooks: mean row error {rel_g:.3g}, one codebook {rel_1:.3g}"


def test_kmeans_degenerate_weights():
    w = torch.zeros(4, 9)
    idx, cent = kmeans_1d(w, 2)
    assert torch.equal(cent[0][idx], w)
    w = torch.tensor([[0.0, 1.0, 1.0, 2.0]] * 3)  # 3 distinct values, 16 centroids
    idx, cent = kmeans_1d(w, 4)
    assert torch.equal(cent[0][idx], w)
    with pytest.raises(ValueError, match="NaN"):
        kmeans_1d(torch.tensor([[1.0, float("nan")]]), 2)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_packed_storage_size(bits):
    layer = CodebookLinear.from_linear(nn.Linear(100, 30), bits=bits, group_size=8)
    per = {2: 25, 3: 39, 4: 50, 8: 100}[bits]  # bytes per row of 100 indices
    assert layer.indices.dtype == torch.uint8 and layer.indices.shape == (30, per)
    assert layer.centroids.shape == (4, 1 << bits) and layer.centroids.dtype == torch.float32
    big = CodebookLinear(1024, 512, bits=bits, device="meta")
    stored = sum(t.numel() * t.element_size() for n, t in big.state_dict().items() if n != "bias")
    assert stored == 512 * 1024 * bits // 8 + 4 * (1 << bits)  # bits/32 of the fp32 weight, plus one codebook


def test_close_to_the_float_layer_and_weight_reads_back():
    torch.manual_seed(3)
    lin = nn.Linear(256, 96)
    x = torch.randn(7, 256)
    errs = {}
    for bits in (2, 3, 4, 8):
        q = CodebookLinear.from_linear(lin, bits=bits)
        w = q.weight
        assert w.shape == (96, 256) and len(torch.unique(w)) <= 1 << bits
        assert_close(q(x), torch.nn.functional.linear(x, w.detach(), lin.bias.detach()), rtol=1e-5, atol=1e-5,
                     what=f"{bits}-bit forward vs its own weight")
        errs[bits] = ((q(x) - lin(x)).norm() / lin(x).norm()).item()
    assert errs[8] < 0.01 and errs[4] < 0.1 and errs[8] < errs[4] < errs[3] < errs[2] < 0.5, errs


def test_gradients_and_codebook_fine_tuning_keep_the_sharing():
    torch.manual_seed(4)
    teacher = nn.Sequential(nn.Linear(32, 64), nn.Tanh(), nn.Linear(64, 8))
    model = bk.share_weights_(copy.deepcopy(teacher), bits=3, group_size=16)
    idx_before = [m.indices.clone() for m in model if isinstance(m, CodebookLinear)]
    opt = bk.optim.FusedAdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    data = torch.randn(256, 32)
    target = teacher(data).detach()
    losses = []
    for step in range(40):
        loss = torch.nn.functional.mse_loss(model(data), target)
        opt.zero_grad()
        loss.backward()
        if step == 0:
            assert all(m.centroids.grad is not None and m.centroids.grad.abs().sum() > 0
                       for m in model if isinstance(m, CodebookLinear))
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0], f"codebook fine-tuning did not reduce the loss: {losses[0]:.4g} -> {losses[-1]:.4g}"
    for m, before in zip([m for m in model if isinstance(m, CodebookLinear)], idx_before):
        assert torch.equal(m.indices, before), "fine-tuning must not touch the indices"
        for g in range(m.num_codebooks):
            rows = m.weight.detach()[g * 16:(g + 1) * 16]
            assert len(torch.unique(rows)) <= 8, "every weight stays tied to one of its group's centroids"


def test_weight_is_differentiable_when_the_centroids_train():
    layer = CodebookLinear.from_linear(nn.Linear(10, 4), bits=2)
    layer.weight.sum().backward()
    counts = torch.bincount(ref.unpack_indices(layer.indices, 2, 10).reshape(-1), minlength=4).float()
    assert torch.equal(layer.centroids.grad[0], counts)
    with torch.no_grad():
        assert not layer.weight.requires_grad


def test_state_dict_safetensors_and_rebuild_from_config():
    torch.manual_seed(5)
    model = bk.share_weights_(nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8)), bits=4, group_size=8)
    x = torch.randn(3, 16)
    want = model(x)
    configs = {name: m.config() for name, m in model.named_modules() if isinstance(m, CodebookLinear)}
    assert configs["0"] == dict(in_features=16, out_features=32, bias=True, bits=4, group_size=8)
    fresh = nn.Sequential(*[CodebookLinear.from_config(configs[str(i)]) if str(i) in configs else nn.ReLU()
                            for i in range(3)])
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    buf.seek(0)
    fresh.load_state_dict(torch.load(buf))
    assert torch.equal(fresh(x), want)
    safetensors = pytest.importorskip("safetensors.torch")
    again = nn.Sequential(*[CodebookLinear.from_config(configs[str(i)], device="meta") if str(i) in configs
                            else nn.ReLU() for i in range(3)])
    again.load_state_dict(safetensors.load(safetensors.save(model.state_dict())), assign=True)
    assert torch.equal(again(x), want)
    with pytest.raises(RuntimeError, match="size mismatch"):
        CodebookLinear(16, 32, bits=3, group_size=8).load_state_dict(model[0].state_dict())


def test_dtype_moves_and_16bit_inputs():
    torch.manual_seed(6)
    lin = nn.Linear(64, 48)
    q = CodebookLinear.from_linear(lin, bits=4).to(torch.bfloat16)
    assert q.centroids.dtype == torch.bfloat16 and q.indices.dtype == torch.uint8
    x = torch.randn(5, 64)
    y = q(x.bfloat16())
    assert y.dtype == torch.bfloat16 and q.weight.dtype == torch.bfloat16
    ref32 = torch.nn.functional.linear(x, q.weight.float(), q.bias.float())
    assert ((y.float() - ref32).norm() / ref32.norm()).item() < 1e-2


def test_compiles_fullgraph(force_linear_dispatch):
    force_linear_dispatch("kernel")
    torch._dynamo.reset()
    torch.manual_seed(7)
    model = bk.share_weights_(nn.Sequential(nn.Linear(24, 48), nn.GELU(), nn.Linear(48, 12)), bits=4)
    x = torch.randn(2, 5, 24)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-6, what="compiled")


@pytest.mark.parametrize("mode", ["measure", "kernel", "dense"])
def test_shape_dispatch_gives_the_kernels_numbers(mode, force_linear_dispatch):
    force_linear_dispatch(mode)
    torch.manual_seed(8)
    q = CodebookLinear.from_linear(nn.Linear(96, 40), bits=3)
    want = torch.nn.functional.linear(torch.zeros(1, 96), q.weight.detach(), q.bias.detach())
    with torch.no_grad():
        for m in (1, 5, 0):
            x = torch.randn(m, 96)
            assert_close(q(x), torch.nn.functional.linear(x, q.weight, q.bias), rtol=1e-5, atol=1e-5, what=mode)
        # indices rewritten in place (load_state_dict does this): no stale dense copy survives
        q.indices.copy_(ref.pack_indices(torch.zeros(40, 96, dtype=torch.long), 3))
        assert_close(q(torch.zeros(1, 96)), torch.nn.functional.linear(torch.zeros(1, 96), q.weight, q.bias),
                     rtol=0, atol=0, what="after rewriting indices")
        x = torch.randn(2, 96)
        assert_close(q(x), torch.nn.functional.linear(x, q.weight, q.bias), rtol=1e-5, atol=1e-5, what="rewritten")
    assert want.shape == (1, 40)


def test_dispatch_runs_the_kernel_on_large_cpu_layers(force_linear_dispatch, monkeypatch):
    """On a CPU with the panel engine, a layer over the dense-cache budget routes to the kernel at
    every batch size without timing the per-call dense fallback (which the engine outruns and a
    loaded machine's timing could pick); layers within the budget are still measured, and a
    forced mode is obeyed."""
    from bigkernels.nn import _dispatch
    from bigkernels.nn.codebook_linear import cpu_engine

    require_kernel("codebook_mm", "cpu")
    if not cpu_engine():
        pytest.skip("no AVX2 panel engine on this CPU")
    force_linear_dispatch("measure")
    monkeypatch.setenv("BIGKERNELS_DENSE_CACHE_BYTES", str(64 * 48 * 4 - 1))  # 64 x 48 fp32: over the budget
    _dispatch.clear()
    timed = []
    real_time = _dispatch._time
    monkeypatch.setattr(_dispatch, "_time", lambda paths, device: timed.append(sorted(paths)) or real_time(paths, device))
    torch.manual_seed(9)
    q = CodebookLinear.from_linear(nn.Linear(64, 48), bits=4)
    small = CodebookLinear.from_linear(nn.Linear(32, 16), bits=4)
    with torch.no_grad():
        for m in (1, 7, 64):
            x = torch.randn(m, 64)
            assert_close(q(x), torch.nn.functional.linear(x, q.weight, q.bias), rtol=1e-5, atol=1e-5, what=f"M={m}")
            assert q._routes.get(x) == "kernel" and q._dense.weight is None
        assert timed == []
        small(torch.randn(3, 32))  # within the budget: measured, with the cached dense path offered
    assert timed == [["dense", "dense_mm", "kernel"] if _dispatch.dense_mm_applies(torch.randn(3, 32)) else ["dense", "kernel"]]
    force_linear_dispatch("dense")
    with torch.no_grad():
        x = torch.randn(2, 64)
        assert_close(q(x), torch.nn.functional.linear(x, q.weight, q.bias), rtol=1e-5, atol=1e-5, what="forced")
        assert q._routes.get(x) == "decompress"


def test_share_weights_filter_logging_and_bad_input(caplog):
    torch.manual_seed(9)

    class LM(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(50, 16)
            self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(16, 16), nn.ReLU()) for _ in range(2))
            self.head = nn.Linear(16, 50, bias=False)
            self.head.weight = self.emb.weight  # tied

        def forward(self, idx):
            h = self.emb(idx)
            for b in self.blocks:
                h = b(h)
            return self.head(h)

    model = LM()
    before = copy.deepcopy(model.state_dict())
    for kwargs, match in ((dict(bits=5), "bits"), (dict(group_size=0), "group_size"), (dict(method="lloyd"), "method"),
                          (dict(iters=-1), "iters"), (dict(calibration_data=[]), "no batches"),
                          (dict(filter_fn=3), "filter_fn")):
        with pytest.raises((ValueError, TypeError), match=match):
            bk.share_weights_(model, **kwargs)
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()), f"{kwargs} modified the model"
        assert not any(isinstance(m, CodebookLinear) for m in model.modules())
    with pytest.raises(TypeError, match="nn.Module"):
        bk.share_weights_(torch.randn(3))
    with caplog.at_level(logging.INFO, logger="bigkernels"):
        out = bk.share_weights_(model, bits=4, calibration_data=[torch.randint(0, 50, (4, 7))])
    assert out is model
    assert isinstance(model.blocks[0][0], CodebookLinear) and isinstance(model.blocks[1][0], CodebookLinear)
    assert type(model.head) is nn.Linear and model.head.weight is model.emb.weight
    lines = [r.getMessage() for r in caplog.records if r.name == "bigkernels" and r.levelno == logging.INFO]
    assert len(lines) == 1, lines  # the one report line
    assert lines[0].startswith("share_weights_: 2 layers -> CodebookLinear(4-bit") and "blocks.0.0, blocks.1.0" in lines[0]
    assert "head (weight tied to emb)" in lines[0] and "weighted by calibration" in lines[0]
    with pytest.warns(UserWarning, match="converted no layer"):
        bk.share_weights_(model)  # nothing linear left but the tied head
    only = bk.share_weights_(LM(), bits=2, filter_fn=lambda m, fqn: fqn == "blocks.1.0")
    assert isinstance(only.blocks[1][0], CodebookLinear) and type(only.blocks[0][0]) is nn.Linear
    with pytest.warns(UserWarning, match="head.*weight tied to emb"):  # chosen, but never untied
        tied = bk.share_weights_(LM(), filter_fn=lambda m, fqn: True)
    assert type(tied.head) is nn.Linear and tied.head.weight is tied.emb.weight
    # call-time errors name the layers and change nothing
    bad = LM()
    bad.blocks[1][0].weight.data[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"blocks\.1\.0 \(with NaN"):
        bk.share_weights_(bad)
    assert type(bad.blocks[0][0]) is nn.Linear
    with pytest.raises(ValueError, match=r"blocks\.0\.0, blocks\.1\.0 \(in float64"):
        bk.share_weights_(LM().double())
    seq = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4))
    with pytest.raises(ValueError, match=r"layer '0' got an input of shape \(2, 5\).*in_features=16"):
        bk.share_weights_(seq, calibration_data=[torch.randn(2, 5)])
    assert type(seq[0]) is nn.Linear
    with pytest.raises(ValueError, match="itself a linear layer"):
        bk.share_weights_(nn.Linear(4, 4))
    with pytest.raises(ValueError, match="in_features=16"):
        model.blocks[0][0](torch.randn(3, 5))
    with pytest.raises(TypeError, match="nn.Linear"):
        CodebookLinear.from_linear(nn.Conv1d(2, 2, 1))
    with pytest.raises(ValueError, match="bits"):
        CodebookLinear(4, 4, bits=1)


def _hf_models():
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_embd=64, n_layer=2, n_head=4, n_positions=32, vocab_size=101))
    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=101, max_position_embeddings=32, tie_word_embeddings=False))
    # model, linear-like layers that convert: GPT-2's 8 Conv1D (lm_head tied: left alone); Llama's
    # 14 + its untied lm_head (output heads convert by default, as in quantize_)
    return {"gpt2": (gpt2, 8), "llama": (llama, 15)}


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_hugging_face_models(name, tmp_path, force_linear_dispatch):
    transformers = pytest.importorskip("transformers")
    force_linear_dispatch("kernel")
    torch.manual_seed(10)
    model, expected = _hf_models()[name]
    model.eval()
    ids = torch.randint(0, 101, (2, 12))
    with torch.no_grad():
        dense = model(ids).logits
    shared = bk.share_weights_(copy.deepcopy(model), bits=4, group_size=16, calibration_data=[ids])
    layers = {n: m for n, m in shared.named_modules() if isinstance(m, CodebookLinear)}
    assert len(layers) == expected, sorted(layers)
    assert ("lm_head" in layers) == (name == "llama")
    with torch.no_grad():
        logits = shared(ids).logits
    # 4-bit Lloyd-Max on Gaussian weights leaves ~10% relative RMS error per weight (sqrt(0.0095));
    # through two residual blocks and the head that stays well under 25% of the logits' norm
    assert ((logits - dense).norm() / dense.norm()).item() < 0.25
    # save_pretrained -> from_pretrained: the same layers, the same logits
    shared.save_pretrained(tmp_path)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    again = {n: m for n, m in loaded.named_modules() if isinstance(m, CodebookLinear)}
    assert {n: m.config() for n, m in again.items()} == {n: m.config() for n, m in layers.items()}
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, logits)
    if name == "gpt2":
        assert loaded.lm_head.weight is loaded.transformer.wte.weight  # still tied
    # rebuild from the layers' configs and load the state_dict (no transformers integration)
    rebuilt = copy.deepcopy(model)
    for fqn, m in layers.items():
        bk.nn._layers.set_submodule(rebuilt, fqn, CodebookLinear.from_config(m.config()))
    rebuilt.load_state_dict(shared.state_dict())
    with torch.no_grad():
        assert torch.equal(rebuilt(ids).logits, logits)
