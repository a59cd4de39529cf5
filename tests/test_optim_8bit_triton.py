"""The Triton 8-bit AdamW kernel (bigkernels/triton/optim8bit.py) against bigkernels.reference.optim:
codes and scales bit for bit, params within tolerance; opcheck and torch.compile under the Triton
interpreter (own pytest process, TRITON_INTERPRET=1) or on a GPU; and (main process, no GPU needed)
its sm_90 compile keeps the rounded adds of the state path."""
from __future__ import annotations

import copy
import os
import re

import pytest
import torch

import test_optim_8bit_ops as cases
from conftest import HAS_CUDA, TRITON_DEVICE, TRITON_INTERPRET

DEVICE = TRITON_DEVICE
SHAPES = [(300,), (5, 7), (1,), (0,), (129,), (2, 64)]  # partial tiles / blocks, empty


def _runtime():
    if not (TRITON_INTERPRET or HAS_CUDA):
        pytest.skip("Triton kernels need a CUDA GPU or TRITON_INTERPRET=1")
    pytest.importorskip("triton")
    import logging

    logging.getLogger("torch._higher_order_ops.triton_kernel_wrap").setLevel(logging.ERROR)
    from bigkernels.triton import optim8bit

    return optim8bit


def _op(lists, kw, masks=None):
    torch.ops.bigkernels.adamw8bit_triton_(*lists.values(), [] if masks is None else masks, **kw)


@pytest.mark.triton_interpret
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16] + ([torch.bfloat16] if HAS_CUDA else []), ids=str)
@pytest.mark.parametrize("block_size", [64, 128])
@pytest.mark.parametrize("seed", range(3))
def test_matches_reference(dtype, block_size, seed):
    _runtime()
    lists, kw = cases.make_case(DEVICE, dtype, seed * 7 + block_size, block_size, shapes=SHAPES)
    masks = cases.masks_for(lists["params"], seed) if seed == 2 else None
    want, want32 = copy.deepcopy(lists), cases.upcast(lists)
    ref_kw = dict(kw, masks=masks)
    for step in range(2):
        _op(lists, kw, masks)
        cases.run_reference(want, ref_kw)
        cases.run_reference(want32, ref_kw)
        cases.assert_state_equal(lists, want, f"step {step}: ", block_size)
        cases.assert_params_close(lists["params"], want["params"], want32["params"], dtype, f"step {step}: ")
    assert [s.item() for s in lists["state_steps"]] == [s.item() for s in want["state_steps"]]


@pytest.mark.triton_interpret
def test_non_finite_gradient_poisons_only_its_block():
    """A NaN / inf gradient makes its block's scales NaN / inf exactly as the reference's amax."""
    _runtime()
    lists, kw = cases.make_case(DEVICE, torch.float32, 5, 64, shapes=[(300,)])
    kw.pop("grad_norm", None)
    lists["grads"][0] = lists["grads"][0].contiguous()
    lists["grads"][0][70] = float("nan")  # block 1 of 64
    lists["grads"][0][200] = float("inf")  # block 3
    want = copy.deepcopy(lists)
    _op(lists, kw)
    cases.run_reference(want, kw)
    cases.assert_state_equal(lists, want, "", 64)
    assert lists["exp_avg_scales"][0].isnan()[1] and not lists["exp_avg_scales"][0][[0, 2, 4]].isnan().any()


@pytest.mark.triton_interpret
def test_found_inf_changes_nothing_and_bad_input_is_rejected():
    _runtime()
    lists, kw = cases.make_case(DEVICE, torch.float32, 1, 64, shapes=SHAPES)
    before = copy.deepcopy(lists)
    _op(lists, dict(kw, found_inf=torch.tensor(1.0, device=DEVICE)))
    for bad, message in ((dict(kw, block_size=96), "block_size"),
                         (dict(kw, block_size=32), "block_size")):
        with pytest.raises(ValueError, match=message):
            _op(lists, bad)
    with pytest.raises(ValueError, match="exp_avg_scales"):
        _op(dict(lists, exp_avg_scales=[s[:-1] for s in lists["exp_avg_scales"]]), kw)
    for name in cases.NAMES:
        for a, b in zip(lists[name], before[name]):
            assert torch.equal(a, b), name


@pytest.mark.triton_interpret
def test_opcheck_and_compiled_matches_eager():
    _runtime()
    torch._dynamo.reset()
    lists, kw = cases.make_case(DEVICE, torch.float32, 4, 64, shapes=[(300,), (5, 7)])
    args = tuple(lists.values()) + ([],)
    torch.library.opcheck(torch.ops.bigkernels.adamw8bit_triton_.default, copy.deepcopy(args), kw)
    eager = copy.deepcopy(args)

    @torch.compile(backend="aot_eager", fullgraph=True)
    def step(*a):
        torch.ops.bigkernels.adamw8bit_triton_(*a, **kw)

    step(*args)
    torch.ops.bigkernels.adamw8bit_triton_(*eager, **kw)
    for a, b in zip(args[:7], eager[:7]):
        for x, y in zip(a, b):
            assert torch.equal(x, y)


# ----- ahead-of-time compile for sm_80 / sm_90 (real Triton compiler, no GPU) -----------------------


@pytest.mark.skipif(TRITON_INTERPRET, reason="AOT compiles need the real Triton compiler (not TRITON_INTERPRET=1)")
def test_aot_state_path_keeps_its_rounded_adds():
    """The kernel's compile for sm_90 (one case; every case, both targets and their vectorised
    loads are checked by tests/test_triton_aot.py through optim8bit.aot_cases()) keeps the
    explicitly rounded adds that make the GPU's codes equal the reference's bit for bit."""
    pytest.importorskip("triton")
    from bigkernels.triton import _aot, optim8bit

    case = next(c for c in optim8bit.aot_cases() if c.arch == 90)
    ok, error, _, ptx = _aot.compile_case(case)
    assert ok, error
    # libdevice's add_rn: a separately rounded add (``add.rn.f32``, or ``add.rn.ftz.f32`` where
    # Triton builds libdevice with flush-to-zero), never contracted into an fma with its product
    assert re.search(r"\badd\.rn(\.ftz)?\.f32\b", ptx), "the state path lost its explicitly rounded adds"
    assert _aot.count_loads(ptx)[0] >= case.vector_loads
