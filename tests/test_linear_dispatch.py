"""Shape dispatch of the compressed linear layers (bigkernels.nn._dispatch): the measured choice,
forced modes, and SparseLinear's dense fallback (cached weight kept in step with the stored
values; training and torch.compile never dispatched)."""
from __future__ import annotations

import copy
import time

import pytest
import torch
from torch import nn

import bigkernels as bk
from bigkernels.nn import SparseLinear, _dispatch
from conftest import assert_close, devices


@pytest.fixture(autouse=True)
def fresh_decisions(force_linear_dispatch):
    force_linear_dispatch("measure")
    return force_linear_dispatch


def _slow(seconds, calls, name):
    def fn():
        calls.append(name)
        time.sleep(seconds)
        return torch.zeros(1)
    return fn


@pytest.mark.parametrize("slow", ["kernel", "dense"])
def test_choose_measures_once_and_keeps_the_faster(slow):
    calls = []
    paths = {name: _slow(0.004 if name == slow else 0.0, calls, name) for name in ("kernel", "dense")}
    cpu = torch.device("cpu")
    want = "dense" if slow == "kernel" else "kernel"
    assert _dispatch.choose("k", paths, cpu) == want
    measured = len(calls)
    assert 4 <= measured <= 2 * (1 + _dispatch.MAX_ROUNDS)  # a warm-up and 1 (a 2x faster path wins at once) to 7 rounds per path
    assert _dispatch.choose("k", paths, cpu) == want and len(calls) == measured  # not measured again
    assert _dispatch.choices() == {"k": want}


@pytest.mark.parametrize("forced", ["kernel", "dense"])
def test_forced_mode(fresh_decisions, forced):
    fresh_decisions(forced)
    calls = []
    paths = {"cusparselt": _slow(0, calls, "c"), "kernel": _slow(0, calls, "k"), "dense": _slow(0, calls, "d")}
    assert _dispatch.choose("k", paths, torch.device("cpu")) == ("cusparselt" if forced == "kernel" else "dense")
    assert calls == []
    fresh_decisions("fastest")
    with pytest.raises(ValueError, match="BIGKERNELS_LINEAR_DISPATCH"):
        _dispatch.choose("k", paths, torch.device("cpu"))


def _layer(pattern, seed=0, k=64, n=48, device="cpu", dtype=torch.float32):
    torch.manual_seed(seed)
    lin = nn.Linear(k, n)
    bk.prune_(lin, pattern=pattern, **({} if pattern == "2:4" else dict(sparsity=0.6, block_size=16)))
    lin = lin.to(device=device, dtype=dtype)
    return lin, SparseLinear.from_linear(lin, pattern=pattern, block_size=16)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("forced", ["kernel", "dense", "measure"])
@pytest.mark.parametrize("pattern", ["2:4", "block", "unstructured"])
def test_every_path_computes_the_masked_linear(fresh_decisions, pattern, forced, device):
    """CPU fp32, CUDA bf16 (where 2:4 also has the cuSPARSELt path)."""
    fresh_decisions(forced)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    tol = 1e-2 if device == "cuda" else 1e-5
    lin, sparse = _layer(pattern, device=device, dtype=dtype)
    for shape in [(5, 64), (3, 7, 64), (1, 64), (32, 64)]:
        x = torch.randn(shape, device=device, dtype=dtype)
        with torch.no_grad():
            assert_close(sparse(x), lin(x), rtol=tol, atol=tol, what=f"{pattern} {forced} {shape}")
    if forced != "measure":  # (measured routes may differ between row buckets)
        assert (sparse._dense.weight is not None) == (forced == "dense")


def test_dense_cache_follows_in_place_updates_and_training_uses_the_op(fresh_decisions):
    fresh_decisions("dense")
    lin, sparse = _layer("unstructured", seed=1)
    x = torch.randn(4, 64)
    with torch.no_grad():
        sparse(x)
        sparse.values.mul_(2.0)  # e.g. an optimizer step: bumps the stored tensor's version
        lin.weight.mul_(2.0)
        assert_close(sparse(x), lin(x), rtol=1e-5, atol=1e-5, what="after an in-place update")
    out = sparse(x)  # gradients wanted: the differentiable op, not the cached weight
    out.square().sum().backward()
    assert sparse.values.grad is not None and sparse.values.grad.shape == sparse.values.shape


def test_kernel_choice_drops_the_dense_weight(monkeypatch):
    lin, sparse = _layer("block", seed=2)
    x = torch.randn(2, 64)
    real_choose = _dispatch.choose
    monkeypatch.setattr(_dispatch, "choose", lambda key, paths, device: (real_choose(key, paths, device), "kernel")[1])
    with torch.no_grad():
        sparse(x)
    assert sparse._routes.table == {(x.dtype, x.device, 2): "kernel"} and sparse._dense.weight is None


def test_decisions_are_shared_by_shape_and_reset_by_clear():
    _, a = _layer("2:4", seed=3)
    _, b = _layer("2:4", seed=4)
    x = torch.randn(3, 64)
    with torch.no_grad():
        a(x)
        keys = set(_dispatch.choices())
        b(x)  # same shape, density and batch bucket: no new measurement
        b(torch.randn(4, 64))  # rows 3 and 4 share the bucket of 4
        assert set(_dispatch.choices()) == keys and len(keys) == 1
        _dispatch.clear()
        assert a._routes.get(x) is None


@pytest.mark.parametrize("mode", ["w8a16", "w8a8"])
def test_quant_linear_paths_and_gradients(fresh_decisions, mode):
    """The dense path gives the int8 kernel's numbers; training runs the kernel op (gradients to
    the input and the bias)."""
    torch.manual_seed(5)
    lin = nn.Linear(40, 24)
    data = torch.randn(3, 5, 40)
    outs = {}
    for forced in ("kernel", "dense"):
        fresh_decisions(forced)
        q = bk.nn.QuantLinear.from_linear(lin, mode=mode)
        x = data.clone().requires_grad_()
        out = q(x)
        out.square().sum().backward()
        assert x.grad is not None and q.bias.grad is not None
        with torch.no_grad():
            outs[forced] = q(x)
    # the dense paths reproduce the kernel's numbers (w8a8: activations quantised there too)
    tol = 1e-5
    # a dense weight first cached under inference_mode still serves a later training call
    q = bk.nn.QuantLinear.from_linear(lin, mode=mode)
    with torch.inference_mode():
        q(data)
    x = data.clone().requires_grad_()
    q(x).sum().backward()
    assert x.grad is not None
    assert_close(outs["kernel"], outs["dense"], rtol=tol, atol=tol, what=f"{mode} kernel vs dense")


@pytest.mark.parametrize("budget", [0, None])
def test_dense_copies_only_for_small_layers(fresh_decisions, monkeypatch, budget):
    """The cached dense path exists only for layers within BIGKERNELS_DENSE_CACHE_BYTES (default
    1 MiB); otherwise a forced dense mode decompresses per call and keeps nothing."""
    if budget is not None:
        monkeypatch.setenv("BIGKERNELS_DENSE_CACHE_BYTES", str(budget))
    fresh_decisions("dense")
    small_lin, small = _layer("unstructured", seed=6)                  # 48 x 64 fp32: 12 KB
    big_lin, big = _layer("unstructured", seed=7, k=1024, n=512)       # 2 MiB
    for lin, layer, cached in ((small_lin, small, budget is None), (big_lin, big, False)):
        x = torch.randn(3, lin.in_features)
        with torch.no_grad():
            assert_close(layer(x), lin(x), rtol=1e-5, atol=1e-5, what="dense path")
        assert (layer._dense.weight is not None) == cached
        assert set(layer._routes.table.values()) == {"dense" if cached else "decompress"}
    monkeypatch.setenv("BIGKERNELS_DENSE_CACHE_BYTES", "lots")
    fresh_decisions("measure")
    with pytest.raises(ValueError, match="BIGKERNELS_DENSE_CACHE_BYTES"), torch.no_grad():
        small(torch.randn(2, 64))


def test_dense_copy_allowed_when_the_format_is_not_smaller(fresh_decisions):
    """CSR at 20% sparsity (8 bytes per kept weight) is larger than the dense weight: a cached
    dense copy is offered even for a layer above the small-layer budget."""
    fresh_decisions("dense")
    torch.manual_seed(8)
    lin = nn.Linear(1024, 512)
    bk.prune_(lin, sparsity=0.2)
    layer = SparseLinear.from_linear(lin, pattern="unstructured")
    assert _dispatch.stored_bytes(layer) > 1024 * 512 * 4
    with torch.no_grad():
        layer(torch.randn(2, 1024))
    assert set(layer._routes.table.values()) == {"dense"} and layer._dense.weight is not None


def test_per_call_decompression_is_timed_only_without_a_cached_copy(fresh_decisions, monkeypatch):
    """"decompress" is "dense" plus building the weight: it is timed only where "dense" is not
    offered (timing it beside "dense" slowed the path timed after it, which then lost wrongly)."""
    timed = []
    real_time = _dispatch._time
    monkeypatch.setattr(_dispatch, "_time", lambda paths, device: timed.append(sorted(paths)) or real_time(paths, device))
    _, small = _layer("unstructured", seed=10)                   # 12 KB: within the budget
    _, big = _layer("unstructured", seed=11, k=1024, n=512)      # 2 MiB at 60%: over it, CSR smaller
    with torch.no_grad():
        small(torch.randn(2, 64))
        big(torch.randn(2, 1024))
    dense = ["dense", "dense_mm", "kernel"] if _dispatch.dense_mm_applies(torch.randn(2, 64)) else ["dense", "kernel"]
    assert timed == [dense, ["decompress", "kernel"]]


@pytest.mark.parametrize("kind", ["2:4", "unstructured", "w8a16", "w8a8", "codebook"])
def test_dense_mm_path_computes_the_layer(fresh_decisions, kind):
    """The cached dense weight multiplied by bigkernels::dense_mm (the path timed beside F.linear
    for few rows on the CPU) gives the layer's product, keeps the copy, and follows weight updates."""
    torch.manual_seed(12)
    lin = nn.Linear(64, 48)
    if kind in ("w8a16", "w8a8"):
        layer = bk.nn.QuantLinear.from_linear(lin, mode=kind)
    elif kind == "codebook":
        layer = bk.nn.CodebookLinear.from_linear(lin, bits=4)
    else:
        lin, layer = _layer(kind, seed=12)
    stored = next(t for name, t in list(layer.named_parameters()) + list(layer.named_buffers()) if name != "bias")
    with torch.no_grad():
        for m in (1, 3, 7):
            x = torch.randn(m, 64)
            want = _dispatch.dense_linear(layer, "dense", x, stored)
            got = _dispatch.dense_linear(layer, "dense_mm", x, stored)
            assert_close(got, want, rtol=1e-5, atol=1e-5, what=f"{kind} dense_mm vs F.linear, M={m}")
        assert layer._dense.weight is not None
        stored.mul_(0.5) if stored.is_floating_point() else stored.div_(2, rounding_mode="trunc")
        x = torch.randn(2, 64)
        assert_close(_dispatch.dense_linear(layer, "dense_mm", x, stored), _dispatch.dense_linear(layer, "decompress", x, stored),
                     rtol=1e-5, atol=1e-5, what=f"{kind} dense_mm after an in-place update")


def test_fused_optimizer_steps_reach_the_dense_copy(fresh_decisions):
    """The fused kernels write params through pointers; their steps still invalidate a layer's
    cached dense weight (the optimizers bump the params' version counters)."""
    fresh_decisions("dense")
    for opt_cls in (bk.optim.FusedAdamW, bk.optim.FusedSGD):
        _, sparse = _layer("unstructured", seed=9)
        x = torch.randn(4, 64)
        with torch.no_grad():
            sparse(x)  # caches the dense weight
        opt = opt_cls(sparse.parameters(), lr=0.1)
        sparse(x).square().sum().backward()
        opt.step()
        with torch.no_grad():
            assert_close(sparse(x), torch.nn.functional.linear(x, sparse.weight, sparse.bias), rtol=1e-5,
                         atol=1e-5, what=f"inference after a {opt_cls.__name__} step")


@pytest.mark.parametrize("forced", ["measure", "dense"])
def test_layers_built_under_inference_mode(fresh_decisions, forced):
    fresh_decisions(forced)
    torch.manual_seed(10)
    with torch.inference_mode():
        lin = nn.Linear(64, 32)
        q = bk.nn.QuantLinear.from_linear(lin, mode="w8a16")
        sparse = SparseLinear.from_linear(lin, pattern="unstructured")  # (nothing pruned: CSR of all)
        x = torch.randn(3, 64)
        assert_close(q(x), lin(x), rtol=2e-2, atol=2e-2, what="QuantLinear")
        assert_close(sparse(x), lin(x), rtol=1e-5, atol=1e-5, what="SparseLinear")


def test_timing_synchronises_the_devices_the_paths_run_on(monkeypatch):
    """Defect: the timing called torch.cuda.synchronize() (the current device only), so a layer on
    another GPU was timed by its launch overhead. Every CUDA device the paths run on is waited
    for by index, around every timed call; CPU paths wait for nothing."""
    synced = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: synced.append(device))
    paths = {"kernel": lambda: torch.zeros(1), "dense": lambda: torch.ones(1)}
    _dispatch._time(paths, torch.device("cuda", 1))
    assert synced and all(d == torch.device("cuda", 1) for d in synced)
    synced.clear()
    _dispatch._time(paths, (torch.device("cuda", 2), torch.device("cpu"), torch.device("cuda", 1)))
    assert set(synced) == {torch.device("cuda", 1), torch.device("cuda", 2)}
    assert synced.count(torch.device("cuda", 1)) == synced.count(torch.device("cuda", 2))
    synced.clear()
    _dispatch._time(paths, torch.device("cpu"))
    assert synced == []


def test_layers_time_on_their_own_devices(monkeypatch):
    """pick() hands the timing the input's and the stored weight's devices (not the current one)."""
    seen = []
    real_time = _dispatch._time
    monkeypatch.setattr(_dispatch, "_time", lambda paths, device: (seen.append(device), real_time(paths, device))[1])
    _, sparse = _layer("2:4", seed=11)
    q = bk.nn.QuantLinear.from_linear(nn.Linear(64, 32), mode="w8a16")
    with torch.no_grad():
        sparse(torch.randn(3, 64))
        q(torch.randn(3, 64))
    assert seen == [(torch.device("cpu"), torch.device("cpu"))] * 2


@pytest.mark.cuda
def test_layers_on_a_second_gpu_are_timed_there(fresh_decisions, monkeypatch):
    """Layers on cuda:1 while cuda:0 is current: the dispatch waits for cuda:1 around each timed
    call and the chosen path computes the layer."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    real_sync, synced = torch.cuda.synchronize, []

    def sync(device=None):
        synced.append(torch.device(device) if device is not None else torch.device("cuda", torch.cuda.current_device()))
        real_sync(device)

    monkeypatch.setattr(torch.cuda, "synchronize", sync)
    torch.cuda.set_device(0)
    lin, sparse = _layer("2:4", seed=12, device="cuda:1", dtype=torch.bfloat16)
    q = bk.nn.QuantLinear.from_linear(nn.Linear(64, 48).to("cuda:1"), mode="w8a16")
    x = torch.randn(300, 64, device="cuda:1", dtype=torch.bfloat16)
    with torch.no_grad():
        assert_close(sparse(x), lin(x), rtol=2e-2, atol=2e-2, what="SparseLinear on cuda:1")
        q(x.float())
    assert synced and torch.device("cuda", 1) in synced and torch.device("cuda", 0) not in synced


def test_close_calls_go_to_the_kernel_and_cheap_ones_get_more_rounds(monkeypatch):
    """On a fake clock (each path call advances it by its cost): per-call decompression within 5%
    of the kernel does not win (timing noise would decide), 10% faster does; the cached dense
    weight wins when faster at all, and through dense_mm only 5% faster than through F.linear;
    cheap paths get up to seven timed rounds, costly ones three, and a 2x faster path wins after
    one."""
    clock = [0.0]
    monkeypatch.setattr(_dispatch.time, "perf_counter", lambda: clock[0])

    def run(costs, key):
        calls = []

        def path(name):
            def fn():
                calls.append(name)
                clock[0] += costs[name]
                return torch.zeros(1)
            return fn

        choice = _dispatch.choose(key, {name: path(name) for name in costs}, torch.device("cpu"))
        return choice, len(calls) // len(costs) - 1  # timed rounds (after one warm-up call each)

    assert run({"kernel": 1e-3, "decompress": 0.97e-3}, "close") == ("kernel", _dispatch.MAX_ROUNDS)
    assert run({"kernel": 1e-3, "decompress": 0.9e-3}, "faster") == ("decompress", _dispatch.MAX_ROUNDS)
    assert run({"kernel": 1e-3, "dense": 0.97e-3, "decompress": 0.96e-3}, "cached") == ("dense", _dispatch.MAX_ROUNDS)
    assert run({"kernel": 0.1, "dense": 0.09}, "costly") == ("dense", 3)
    assert run({"kernel": 0.1, "dense": 0.04}, "clear") == ("dense", 1)
    # dense_mm on the kept copy must beat F.linear on it by 5% too (tiny layers tie within noise)
    assert run({"kernel": 2e-3, "dense": 1e-3, "dense_mm": 0.97e-3}, "tie") == ("dense", _dispatch.MAX_ROUNDS)
    assert run({"kernel": 2e-3, "dense": 1e-3, "dense_mm": 0.9e-3}, "tiles") == ("dense_mm", _dispatch.MAX_ROUNDS)


@pytest.mark.parametrize("variant", ["w8a16", "w8a8", "2:4", "block", "unstructured"])
def test_llama_variants_compute_their_dense_model(fresh_decisions, variant):
    """A Hugging Face Llama (built from a config) compressed as benchmarks/bench_models.py does it:
    the compressed model's hidden states match the dense model's (the pruned one for the sparse
    variants) at one token and at 2 x 24 tokens (48 rows: the CPU engines' batch sizes), on the
    kernel paths (the measured choice may pick the dense product for such small layers)."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64)
    torch.manual_seed(13)
    dense = transformers.LlamaModel(cfg).eval()
    if variant in ("w8a16", "w8a8"):
        want_model, model = dense, bk.quantize_(copy.deepcopy(dense), mode=variant)
        tol = 5e-2
    else:
        want_model = copy.deepcopy(dense)
        bk.prune_(want_model, sparsity=0.5, pattern=variant, block_size=16)
        model = bk.sparse.sparsify_(copy.deepcopy(want_model), pattern=variant, block_size=16)
        tol = 1e-4
    kinds = {type(m).__name__ for m in model.modules()}
    assert ("QuantLinear" if variant.startswith("w8") else "SparseLinear") in kinds and "Linear" not in kinds
    fresh_decisions("kernel")
    for ids in (torch.randint(0, 97, (1, 1)), torch.randint(0, 97, (2, 24))):
        with torch.no_grad():
            got, want = model(ids).last_hidden_state, want_model(ids).last_hidden_state
        assert_close(got, want, rtol=tol, atol=tol * want.abs().max().item(), what=f"{variant} {ids.shape}")
