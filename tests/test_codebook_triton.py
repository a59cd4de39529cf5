"""Triton codebook kernels (codebook_mm_triton, codebook_dequantize_triton) vs
bigkernels.reference.codebook: each bit width, odd shapes (M = 0 and 1, K and N off the tiles,
split-K), groups, non-contiguous x, bias or none, opcheck, rejected input, and the list of
ahead-of-time compile cases.

Runs under the Triton interpreter on CPU tensors (its own pytest process, with TRITON_INTERPRET=1
set before triton is imported) or on a CUDA GPU; skipped otherwise.
"""
from __future__ import annotations

import pytest
import torch

from conftest import DT_IDS, TRITON_DEVICE, TRITON_FLOAT_DTYPES, skip_module_without_triton_runtime

skip_module_without_triton_runtime()

import bigkernels.ops.codebook  # noqa: E402,F401  (defines the main schemas)
from bigkernels.reference import codebook as ref  # noqa: E402
from bigkernels.triton import codebook as tri  # noqa: E402  (registers the *_triton ops)

pytestmark = [pytest.mark.triton_interpret,
              pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.runtime.interpreter")]

DEVICE = TRITON_DEVICE
OPS = torch.ops.bigkernels
# (M, K, N, group_size): M = 0 / 1, K off the 16-wide interpreter tiles and split across two K
# slices (M <= 16), M > 16 (no split), a group boundary inside a tile, a last group shorter.
SHAPES = [(1, 37, 21, 21), (5, 50, 33, 8), (17, 40, 9, 9), (0, 8, 4, 4), (3, 19, 18, 5)]


def _format(n, k, bits, gs, seed, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    c = 1 << bits
    cent = torch.randn(ref.num_groups(n, gs), c, generator=gen).sort(dim=1).values
    packed = ref.pack_indices(torch.randint(0, c, (n, k), generator=gen), bits)
    return packed.to(DEVICE), cent.to(device=DEVICE, dtype=dtype), gen


@pytest.mark.parametrize("dtype", TRITON_FLOAT_DTYPES, ids=DT_IDS.get)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_codebook_mm(bits, shape, dtype):
    M, K, N, gs = shape
    packed, cent, gen = _format(N, K, bits, gs, seed=M * 7 + K + bits)
    x = torch.randn(M, 2 * K, generator=gen)[:, ::2].to(device=DEVICE, dtype=dtype)  # non-contiguous
    bias = torch.randn(N, generator=gen).to(DEVICE) if M % 2 else None
    got = OPS.codebook_mm_triton(x, packed, cent, bias, gs)
    assert got.dtype == dtype and got.shape == (M, N)
    w = ref.codebook_dequantize(packed.cpu(), cent.cpu(), K, gs).double()
    want = x.cpu().double() @ w.T + (bias.cpu().double() if bias is not None else 0)
    if not want.numel():
        return
    mag = (x.cpu().double().abs() @ w.abs().T).max().item()
    tol = 1e-5 if dtype == torch.float32 else 1e-2  # 16-bit x: its own rounding, fp32 accumulation
    err = (got.cpu().double() - want).abs().max().item()
    assert err <= tol * mag + 1e-6, f"{bits}-bit {dtype}: max error {err:.3g} vs magnitude {mag:.3g}"


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_dequantize_is_exact(bits):
    for n, k, gs in ((21, 37, 8), (3, 16, 3), (0, 5, 4), (4, 0, 4)):
        for dtype in TRITON_FLOAT_DTYPES:
            packed, cent, _ = _format(n, k, bits, gs, seed=n + k + bits, dtype=dtype)
            got = OPS.codebook_dequantize_triton(packed, cent, k, gs)
            assert got.dtype == dtype and got.shape == (n, k)
            assert torch.equal(got.cpu(), ref.codebook_dequantize(packed.cpu(), cent.cpu(), k, gs))


def test_opcheck_and_bad_input():
    packed, cent, gen = _format(10, 40, 4, 4, seed=1)
    x = torch.randn(3, 40, generator=gen).to(DEVICE)
    torch.library.opcheck(OPS.codebook_mm_triton, (x, packed, cent, None, 4),
                          test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(OPS.codebook_dequantize_triton, (packed, cent, 40, 4),
                          test_utils=("test_schema", "test_faketensor"))
    with pytest.raises(ValueError, match="indices of 41"):
        OPS.codebook_mm_triton(torch.randn(3, 41).to(DEVICE), packed, cent, None, 4)
    with pytest.raises(ValueError, match="codebooks"):
        OPS.codebook_mm_triton(x, packed, cent, None, 3)
    with pytest.raises(ValueError, match="dtype"):
        OPS.codebook_mm_triton(x, packed.to(torch.int32), cent, None, 4)
    with pytest.raises(ValueError, match="bias"):
        OPS.codebook_mm_triton(x, packed, cent, torch.randn(3).to(DEVICE), 4)
