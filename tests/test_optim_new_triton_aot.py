"""Ahead-of-time compile of the RMSprop / Lion / Adafactor Triton kernels for sm_80 and sm_90 (no
GPU needed: Triton's compiler and ptxas run on the CPU), from bigkernels.triton.optim_more.AOT_CASES:
every case compiles, and the hot loads are 16-byte vector loads (ld.global.v4) in the PTX — for
the elementwise kernels on both launch paths (the table path vectorises only through its run-time
alignment check and tl.multiple_of, which a helper's return value would silently lose)."""
from __future__ import annotations

import re

import pytest

from conftest import TRITON_INTERPRET

triton = pytest.importorskip("triton")
if TRITON_INTERPRET:
    pytest.skip("ahead-of-time compiles need the real Triton compiler (TRITON_INTERPRET is set)",
                allow_module_level=True)

from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from bigkernels.triton import optim_more  # noqa: E402


def _compile(kernel, signature, constexprs, cc):
    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(kernel.arg_names)
             if signature[name].startswith("*") or name in optim_more.AOT_DIVISIBLE_INTS}
    return triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=GPUTarget("cuda", cc, 32))


def _case_id(case):
    kernel, sig, cexpr = case
    ptr = next(v for k, v in sig.items() if k in ("p_ptr", "g_ptr", "cv_ptr"))
    path = {True: "-table", False: "-direct"}.get(cexpr.get("USE_TABLE"), "")
    return f"{kernel.fn.__name__}-{ptr[1:]}{path}"


# Every case for sm_90; the elementwise table-path ones also for sm_80 (the rest compile the same
# way there; the CI-wide compile test takes every kernel for both).
CASES = [(case, 90) for case in optim_more.AOT_CASES] + [
    (case, 80) for case in optim_more.AOT_CASES if case[2].get("USE_TABLE")]


def test_cases_cover_every_kernel():
    names = {case[0].fn.__name__ for case in optim_more.AOT_CASES}
    jitted = {name for name, obj in vars(optim_more).items()
              if isinstance(obj, triton.runtime.jit.JITFunction) and name.endswith("_kernel")
              and obj.__module__ == optim_more.__name__}
    assert jitted <= names, f"kernels without an AOT case: {sorted(jitted - names)}"


@pytest.mark.slow
@pytest.mark.parametrize("case,cc", CASES, ids=[f"{_case_id(c)}-sm{cc}" for c, cc in CASES])
def test_compiles_with_vector_loads(case, cc):
    kernel, sig, cexpr = case
    compiled = _compile(kernel, sig, cexpr, cc)
    ptx = compiled.asm["ptx"]
    assert re.search(r"ld\.global(\.[a-z]+)*\.v4\.b32", ptx), f"{_case_id(case)} sm_{cc}: no 16-byte vector loads"
    if kernel.fn.__name__ in ("_rmsprop_kernel", "_lion_kernel"):
        assert re.search(r"st\.global(\.[a-z]+)*\.v4\.b32", ptx), f"{_case_id(case)}: no 16-byte vector stores"
    smem = {80: 163 * 1024, 90: 227 * 1024}[cc]
    assert compiled.metadata.shared <= smem
