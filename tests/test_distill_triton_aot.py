"""Ahead-of-time compile of the Triton distillation kernel for sm_80 and sm_90 (no GPU needed):
every autotune config compiles, fits shared memory, and its loops keep 16-byte vector loads
and stores of the logits / gradients (the cases in bigkernels.triton.distill.AOT_CASES)."""
from __future__ import annotations

import os
import re

import pytest

triton = pytest.importorskip("triton")
if os.environ.get("TRITON_INTERPRET") == "1":
    pytest.skip("compiles for a GPU target; run outside the interpreter process", allow_module_level=True)

from triton.backends.compiler import GPUTarget  # noqa: E402

from bigkernels.triton import distill as tri  # noqa: E402

# sm_80: 164 KB of shared memory per block at most; sm_90: 227 KB
SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
# bf16 (the GPU training dtype) with every feature on (the most live registers), each config; the
# full list (all dtypes and flag sets) is for the project-wide AOT compile test
CASES = [c for c in tri.AOT_CASES if c[2]["GRAD_T"] and c[1]["s_ptr"] == "*bf16"]


def test_aot_cases_cover_every_config():
    configs = {(c[2]["BLOCK_V"], c.options["num_warps"]) for c in tri.AOT_CASES}
    assert configs == {(cfg.kwargs["BLOCK_V"], cfg.num_warps) for cfg in tri.CONFIGS}
    assert {c[1]["s_ptr"] for c in tri.AOT_CASES} == {"*fp32", "*bf16", "*fp16"}
    for fn, sig, cx in tri.AOT_CASES:  # unpacks as (kernel, signature, constexprs)
        assert set(sig) == set(fn.arg_names) and all(sig[k] == "constexpr" for k in cx)


@pytest.mark.parametrize("cc", [80, 90])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"B{c[2]['BLOCK_V']}-w{c.options['num_warps']}")
def test_compiles_with_vector_access(cc, case):
    k = triton.compile(case.source(), target=GPUTarget("cuda", cc, 32), options=case.options)
    assert k.metadata.shared <= SHARED_LIMIT[cc]
    ptx = k.asm["ptx"]
    assert re.search(r"ld\.global(\.nc)?\.v4\.b32", ptx), "the logits loads lost their 16-byte vectors"
    assert re.search(r"st\.global\.v4\.b32", ptx), "the gradient stores lost their 16-byte vectors"
