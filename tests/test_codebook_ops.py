"""The codebook (weight-sharing) kernel ops (torch.ops.bigkernels.codebook_mm / codebook_dequantize /
codebook_quantize / codebook_centroid_grad, and the differentiable codebook_linear) against
bigkernels.reference.codebook on every device's compiled kernel: each bit width, dtypes x odd shapes
(M = 0 and 1, K and N off every tile, non-contiguous x), groups that do not divide N, every CPU
instruction set, the documented bit layout, opcheck, torch.compile(fullgraph=True), rejected input."""
from __future__ import annotations

import pytest
import torch

from bigkernels.ops import codebook as cb_ops
from bigkernels.reference import codebook as ref
from conftest import assert_close, check_16bit, devices, poison_, require_kernel

ops = torch.ops.bigkernels
BITS = [2, 3, 4, 8]
# (M, K, N, group_size): K not a multiple of 8 / 64 (the AVX2 steps), N not a multiple of the row
# tiles, groups that split a tile and a last group shorter than the others, M = 0 and 1; M >= 32
# runs the CPU panel path (K over several 256-wide slices, M not a multiple of its 3-row tiles).
SHAPES = [(5, 123, 77, 77), (1, 4097, 33, 33), (0, 64, 16, 16), (1, 64, 6, 4), (13, 200, 7, 3), (3, 130, 25, 10),
          (2, 67, 9, 9), (6, 64, 5, 5), (37, 123, 77, 77), (40, 603, 19, 7), (70, 300, 21, 5)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.fixture(params=["native", "scalar"])
def isa(request, monkeypatch):
    """The codebook CPU kernels with the best instruction set (AVX2 where present; there is no
    AVX-512 variant) and with the scalar one forced through BIGKERNELS_CPU_ISA."""
    if request.param != "native":
        if request.node.callspec.params.get("device", "cpu") != "cpu":
            pytest.skip("instruction sets are a CPU matter")
        monkeypatch.setenv("BIGKERNELS_CPU_ISA", request.param)
    return request.param


def _format(n, k, bits, group_size, device, gen=None):
    c = 1 << bits
    groups = ref.num_groups(n, group_size)
    cent = torch.randn(groups, c, generator=gen).sort(dim=1).values.to(device)
    idx = torch.randint(0, c, (n, k), generator=gen)
    return ref.pack_indices(idx, bits).to(device), cent, idx.to(device)


def _x(m, k, dtype, device, noncontig):
    x = torch.randn(m, 2 * k if noncontig else k, device=device)
    x = x[:, ::2] if noncontig else x
    return x.to(dtype)


def test_bit_layout_is_the_documented_little_endian_stream():
    idx = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 0, 6]])
    word = 1 | 2 << 3 | 3 << 6 | 4 << 9 | 5 << 12 | 6 << 15 | 7 << 18 | 0 << 21  # 8 indices, 3 bits each
    assert ref.pack_indices(idx, 3).tolist() == [[word & 255, word >> 8 & 255, word >> 16 & 255, 6, 0, 0]]
    assert ref.pack_indices(torch.tensor([[1, 15, 7]]), 4).tolist() == [[1 | 15 << 4, 7]]
    assert ref.pack_indices(torch.tensor([[1, 2, 3, 0, 3]]), 2).tolist() == [[1 | 2 << 2 | 3 << 4, 3]]
    assert ref.pack_indices(torch.tensor([[200, 7]]), 8).tolist() == [[200, 7]]
    for bits, k, cols in ((2, 9, 3), (3, 9, 6), (3, 8, 3), (4, 9, 5), (8, 9, 9)):
        assert ref.packed_cols(k, bits) == cols


@pytest.mark.parametrize("bits", BITS)
def test_pack_unpack_round_trip(bits):
    gen = torch.Generator().manual_seed(bits)
    for k in (1, 7, 8, 9, 64, 67):
        idx = torch.randint(0, 1 << bits, (3, k), generator=gen)
        packed = ref.pack_indices(idx, bits)
        assert packed.dtype == torch.uint8 and packed.shape == (3, ref.packed_cols(k, bits))
        assert torch.equal(ref.unpack_indices(packed, bits, k), idx)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("bits", BITS)
def test_codebook_mm(device, dtype, shape, bits, isa):
    require_kernel("codebook_mm", device)
    M, K, N, gs = shape
    gen = torch.Generator().manual_seed(M * 131 + K + N + bits)
    packed, cent, _ = _format(N, K, bits, gs, device, gen)
    x = _x(M, K, dtype, device, noncontig=M % 2 == 1)
    bias = torch.randn(N, device=device, dtype=dtype)
    got = ops.codebook_mm(x, packed, cent, bias, gs)
    assert got.dtype == dtype and got.shape == (M, N)
    w64 = ref.codebook_dequantize(packed, cent, K, gs).double()
    if dtype == torch.float32:  # vs fp64 of the same maths, relative to the sum of |terms|
        want = x.double() @ w64.T + bias.double()
        mag = (x.double().abs() @ w64.abs().T + bias.double().abs()).max().item() if want.numel() else 0
        assert_close(got, want, rtol=1e-5, atol=1e-6 * mag, what=f"codebook_mm {bits}-bit fp32")
    else:
        ref32 = ref.codebook_mm(x.float(), packed, cent, bias.float(), gs)
        lowp = torch.nn.functional.linear(x, w64.to(dtype), bias)
        check_16bit(got, ref32, lowp, f"codebook_mm {bits}-bit {dtype}")


# The CPU lookup tiles forced at every M up to 17 (the engine off): 4-row tiles and, at 8 bits, 8-row
# tiles with a last tile of 1 .. 7 rows (codebook_cpu_kernels.h's over_x_tiles); K with vector and
# scalar tails, groups inside a row tile.
@pytest.mark.parametrize("bits", BITS)
def test_codebook_mm_lookup_tiles_at_every_m(bits, monkeypatch):
    require_kernel("codebook_mm", "cpu")
    monkeypatch.setenv("BIGKERNELS_PANEL_MIN_ROWS", "1000000")
    gen = torch.Generator().manual_seed(bits)
    for K, N, gs in ((131, 11, 11), (64, 9, 4)):
        packed, cent, _ = _format(N, K, bits, gs, "cpu", gen)
        w64 = ref.codebook_dequantize(packed, cent, K, gs).double()
        bias = torch.randn(N)
        for M in range(1, 18):
            x = _x(M, K, torch.float32, "cpu", noncontig=M % 2 == 1)
            got = ops.codebook_mm(x, packed, cent, bias, gs)
            want = x.double() @ w64.T + bias.double()
            mag = (x.double().abs() @ w64.abs().T).max().item()
            assert_close(got, want, rtol=1e-5, atol=1e-6 * mag, what=f"lookup {bits}-bit M={M} K={K} gs={gs}")


# The CPU panel engine (csrc/codebook/codebook_cpu_panels.h) forced from M = 1 on: strips of 16
# rows (N = 1, 5, 16, 33: partial strips), 256-wide K blocks with vector and scalar tails (K = 8,
# 64: the 3-bit last unit read exactly; 123, 600, 777; 0 and 1: bias only, scalar tail only), groups
# inside a strip (3, 7) or per layer.
ENGINE_SHAPES = [(1, 123, 123, 123), (5, 123, 123, 7), (0, 64, 16, 16), (7, 64, 5, 5), (12, 777, 33, 3),
                 (6, 8, 1, 1), (19, 600, 16, 16), (13, 0, 5, 5), (12, 1, 17, 17)]


@pytest.mark.parametrize("shape", ENGINE_SHAPES, ids=str)
@pytest.mark.parametrize("bits", BITS)
def test_codebook_mm_panel_engine_at_every_m(shape, bits, monkeypatch):
    require_kernel("codebook_mm", "cpu")
    monkeypatch.setenv("BIGKERNELS_PANEL_MIN_ROWS", "1")
    M, K, N, gs = shape
    gen = torch.Generator().manual_seed(M * 7 + K + N + bits)
    packed, cent, _ = _format(N, K, bits, gs, "cpu", gen)
    x = _x(M, K, torch.float32, "cpu", noncontig=M % 2 == 1)
    bias = torch.randn(N) if M % 2 else None
    got = ops.codebook_mm(x, packed, cent, bias, gs)
    w64 = ref.codebook_dequantize(packed, cent, K, gs).double()
    want = x.double() @ w64.T + (bias.double() if bias is not None else 0)
    mag = (x.double().abs() @ w64.abs().T).max().item() if want.numel() else 0
    assert_close(got, want, rtol=1e-5, atol=1e-6 * mag, what=f"engine {bits}-bit {shape}")
    if M:  # bf16 x and output: packed from the fp32 copy, stored rounded
        got16 = ops.codebook_mm(x.bfloat16(), packed, cent, bias, gs)
        check_16bit(got16, ref.codebook_mm(x.bfloat16().float(), packed, cent, bias, gs),
                    torch.nn.functional.linear(x.bfloat16(), w64.bfloat16(), None if bias is None else bias.bfloat16()),
                    f"engine {bits}-bit bf16")


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("bits", BITS)
def test_codebook_mm_without_bias_and_large_values(device, bits, isa):
    require_kernel("codebook_mm", device)
    gen = torch.Generator().manual_seed(7)
    packed, cent, _ = _format(11, 300, bits, 11, device, gen)
    cent = cent * 1e3
    x = torch.randn(4, 300, device=device) * 1e3
    got = ops.codebook_mm(x, packed, cent, None, 11)
    want = x.double() @ ref.codebook_dequantize(packed, cent, 300, 11).double().T
    assert_close(got, want, rtol=1e-5, atol=1e-6 * want.abs().max().item() * 300 ** 0.5, what="no bias")


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bits", BITS)
def test_dequantize_is_exact(device, dtype, bits, isa):
    require_kernel("codebook_dequantize", device)
    for n, k, gs in ((37, 131, 10), (1, 1, 1), (5, 64, 5), (3, 0, 3), (0, 9, 4)):
        packed, cent, idx = _format(n, k, bits, gs, device)
        cent = cent.to(dtype)
        got = ops.codebook_dequantize(packed, cent, k, gs)
        assert got.dtype == dtype and got.shape == (n, k)
        want = cent[torch.arange(n, device=device) // gs][:, None, :].expand(n, k, -1).gather(2, idx[..., None])[..., 0] \
            if n and k else torch.empty(n, k, dtype=dtype, device=device)
        assert torch.equal(got, want), f"{bits}-bit dequantize of [{n}, {k}] groups of {gs}"


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("bits", BITS)
def test_quantize_maps_each_weight_to_its_nearest_centroid(device, bits, isa):
    require_kernel("codebook_quantize", device)
    gen = torch.Generator().manual_seed(bits)
    n, k, gs = 29, 203, 7
    _, cent, _ = _format(n, k, bits, gs, device, gen)
    w = torch.randn(n, 2 * k, generator=gen).to(device)[:, ::2]  # non-contiguous
    c0 = min(k, cent.shape[1])
    w[0, :c0] = cent[0, :c0]  # exactly on a centroid
    w[1, 3] = float("nan")
    got = ops.codebook_quantize(w, cent, gs)
    assert torch.equal(got, ref.codebook_quantize(w, cent, gs))
    idx = ref.unpack_indices(got, bits, k)
    rows = cent[torch.arange(n, device=device) // gs]
    dist = (w.unsqueeze(-1) - rows.unsqueeze(1)).abs()
    chosen = dist.gather(2, idx.unsqueeze(-1)).squeeze(-1)
    ok = torch.isnan(w) | (chosen <= dist.min(dim=2).values * (1 + 1e-6) + 1e-7)
    assert bool(ok.all()), "a weight was not mapped to its nearest centroid"
    assert idx[1, 3].item() == (1 << bits) - 1, "NaN sorts above every midpoint, as torch.searchsorted has it"


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("bits", BITS)
def test_centroid_grad_sums_over_tied_weights(device, bits, isa):
    require_kernel("codebook_centroid_grad", device)
    gen = torch.Generator().manual_seed(11 + bits)
    for n, k, gs in ((23, 77, 5), (4, 300, 4), (9, 1, 2)):
        packed, cent, idx = _format(n, k, bits, gs, device, gen)
        gw = torch.randn(n, k, generator=gen).to(device)
        got = ops.codebook_centroid_grad(gw, packed, cent, gs)
        slot = idx + (torch.arange(n, device=device) // gs * (1 << bits)).unsqueeze(1)
        want = torch.zeros(cent.numel(), dtype=torch.float64, device=device).index_add_(
            0, slot.reshape(-1), gw.double().reshape(-1)).reshape(cent.shape)
        assert got.dtype == cent.dtype and got.shape == cent.shape
        assert_close(got, want, rtol=1e-6, atol=1e-5, what="centroid sums")
        assert torch.equal(got, ops.codebook_centroid_grad(gw, packed, cent, gs)), "not deterministic"


@pytest.mark.parametrize("bits", BITS)
def test_codebook_linear_gradients(bits):
    gen = torch.Generator().manual_seed(3)
    n, k, gs = 12, 37, 5
    packed, cent, _ = _format(n, k, bits, gs, "cpu", gen)
    x = torch.randn(6, k, generator=gen, requires_grad=True)
    c = cent.clone().requires_grad_()
    b = torch.randn(n, generator=gen, requires_grad=True)
    g = torch.randn(6, n, generator=gen)
    ops.codebook_linear(x, packed, c, b, gs).backward(g)
    x2, c2, b2 = (t.detach().clone().requires_grad_() for t in (x, cent, b))
    torch.nn.functional.linear(x2, ref.codebook_dequantize(packed, c2, k, gs), b2).backward(g)
    assert_close(x.grad, x2.grad, rtol=1e-5, atol=1e-5, what="grad x")
    assert_close(c.grad, c2.grad, rtol=1e-5, atol=1e-4, what="grad centroids")
    assert_close(b.grad, b2.grad, rtol=1e-6, atol=1e-6, what="grad bias")


def test_opcheck():
    gen = torch.Generator().manual_seed(5)
    packed, cent, _ = _format(10, 70, 3, 4, "cpu", gen)
    x = torch.randn(3, 70, generator=gen)
    bias = torch.randn(10, generator=gen)
    torch.library.opcheck(ops.codebook_mm, (x, packed, cent, bias, 4))
    torch.library.opcheck(ops.codebook_dequantize, (packed, cent, 70, 4))
    torch.library.opcheck(ops.codebook_quantize, (torch.randn(10, 70, generator=gen), cent, 4))
    torch.library.opcheck(ops.codebook_centroid_grad, (torch.randn(10, 70, generator=gen), packed, cent, 4))
    torch.library.opcheck(ops.codebook_linear, (x.requires_grad_(), packed, cent.requires_grad_(), bias, 4))


def test_compiles_fullgraph_with_gradients():
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(6)
    packed, cent, _ = _format(20, 48, 4, 8, "cpu", gen)
    c = cent.clone().requires_grad_()

    def f(x, c):
        y = cb_ops.codebook_linear(x, packed, c, None, 8)
        return torch.nn.functional.gelu(y).sum()

    x = torch.randn(2, 3, 48, generator=gen)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    out = compiled(x, c)
    out.backward()
    want_c = c.detach().clone().requires_grad_()
    f(x, want_c).backward()
    assert_close(out, f(x, cent), rtol=1e-5, atol=1e-5, what="compiled value")
    assert_close(c.grad, want_c.grad, rtol=1e-5, atol=1e-5, what="compiled grad")


def test_kernel_output_is_fully_written():
    packed, cent, _ = _format(33, 65, 4, 33, "cpu")
    x = torch.randn(7, 65)
    want = ref.codebook_mm(x, packed, cent, None, 33)
    out = poison_(torch.empty(7, 33))
    out.copy_(ops.codebook_mm(x, packed, cent, None, 33))
    assert not torch.isnan(out).any() and torch.allclose(out, want, rtol=1e-5, atol=1e-4)


def test_rejected_input_names_the_argument():
    require_kernel("codebook_mm", "cpu")
    packed, cent, _ = _format(8, 16, 4, 8, "cpu")
    x = torch.randn(2, 16)
    with pytest.raises(RuntimeError, match="indices"):
        ops.codebook_mm(x, packed[:, :3], cent, None, 8)
    with pytest.raises(RuntimeError, match="codebooks"):
        ops.codebook_mm(x, packed, cent, None, 3)
    with pytest.raises(RuntimeError, match="centroids"):
        ops.codebook_mm(x, packed, cent[:, :5], None, 8)
    with pytest.raises(RuntimeError, match="bias"):
        ops.codebook_mm(x, packed, cent, torch.randn(3), 8)
    with pytest.raises(RuntimeError, match="group_size"):
        ops.codebook_mm(x, packed, cent, None, 0)
    with pytest.raises(RuntimeError, match="indices of 13"):
        ops.codebook_mm(torch.randn(2, 13), packed, cent, None, 8)
    with pytest.raises(RuntimeError, match="x of dtype"):
        ops.codebook_mm(torch.ones(2, 16, dtype=torch.int64), packed, cent, None, 8)
    with pytest.raises(RuntimeError, match="sorted ascending"):
        ops.codebook_quantize(torch.randn(8, 16), cent.flip(1), 8)
    with pytest.raises(ValueError, match="bits"):
        ref.packed_cols(16, 5)
