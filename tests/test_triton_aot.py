"""Every Triton kernel compiled ahead of time for sm_80 and sm_90, without a GPU.

The convention (bigkernels/triton/_common.py): every module under bigkernels/triton declares its
AOT compile cases in ``aot_cases()`` -- every autotune config its pruner keeps, per dtype and M
bucket the host code dispatches to, and the memory-bound kernels' vectorisation expectations.
This file compiles them all with Triton's own compiler for ``GPUTarget("cuda", cc, 32)`` (ptxas
included), in a process pool, and checks what a GPU run would otherwise be the first to see:

- a kernel or config that does not compile for an architecture (e.g. Triton 3.8 cannot lower
  boolean selects on dot operands for sm_8x);
- a config the pruner keeps that does not fit the architecture's shared memory, and a dispatch
  group (kernel, dtype, M bucket) with no fitting config on sm_80, sm_86/89 or sm_90 (Triton's
  autotuner launches a config that does not fit when it is the only one or the best left);
- hot loads of memory-bound kernels (optimizer steps, w8a16 GEMV, quantize) that are not
  vectorised (``ld.global.v2/.v4`` or 8/16-byte ``cp.async``) where the tensors are aligned;
- a ``@triton.jit`` function that no case compiles (a new kernel without cases fails here).

Runs in the main (non-interpreter) pytest process; ~2 minutes of 2 CPUs, most of it in Triton's
LLVM and ptxas stages.
"""
from __future__ import annotations

import collections
import importlib
import importlib.util
import sys
import textwrap

import pytest

from conftest import TRITON_INTERPRET

triton = pytest.importorskip("triton")

from bigkernels.triton import _aot, _common  # noqa: E402

pytestmark = [
    pytest.mark.skipif(TRITON_INTERPRET, reason="AOT compiles need the real Triton compiler (not TRITON_INTERPRET=1)"),
    pytest.mark.slow,
]


@pytest.fixture(scope="module")
def compiled():
    cases, problems = _aot.collect()
    results = _aot.compile_all(cases)
    return cases, problems, results


def _fmt(results, limit=12):
    lines = [f"  {r.case.describe()} [{r.case.group}]: shared {r.shared} / {r.case.shared_limit} "
             f"(estimate {r.case.estimate}), ld.v {r.vector_loads} / ld.s {r.scalar_loads}"
             + (f"\n    {r.error}" if r.error else "") for r in results[:limit]]
    more = len(results) - limit
    return "\n".join(lines) + (f"\n  ... and {more} more" if more > 0 else "")


def test_every_triton_jit_function_has_aot_cases(compiled):
    _, problems, _ = compiled
    assert not problems, "\n".join(problems)


def test_every_module_declares_cases_for_every_target(compiled):
    cases, _, _ = compiled
    assert set(cases) >= {"bigkernels.triton.optim", "bigkernels.triton.quant", "bigkernels.triton.sparse"}
    for module, cs in cases.items():
        archs = {c.arch for c in cs}
        assert set(_common.AOT_TARGETS) <= archs, f"{module}: cases for {sorted(archs)}, expected {_common.AOT_TARGETS}"


def test_every_case_compiles(compiled):
    _, _, results = compiled
    failed = [r for r in results if not r.ok]
    assert not failed, f"{len(failed)} of {len(results)} AOT cases do not compile:\n{_fmt(failed)}"


def test_every_kept_config_fits_shared_memory(compiled):
    """The pruner keeps a config only if it fits: Triton's allocation must not exceed the limit
    (else the pruner's estimate is too low and the autotuner could launch it: OutOfResources)."""
    _, _, results = compiled
    over = [r for r in results if r.ok and r.shared > r.case.shared_limit]
    assert not over, f"{len(over)} kept configs exceed their architecture's shared memory:\n{_fmt(over)}"
    low = [r for r in results if r.ok and r.case.estimate is not None and r.shared > r.case.estimate]
    assert not low, f"the pruner's shared-memory estimate is below Triton's allocation:\n{_fmt(low)}"


def test_every_dispatch_group_keeps_a_fitting_config_on_every_target(compiled):
    _, _, results = compiled
    fits = collections.defaultdict(bool)
    for r in results:
        fits[(r.case.group, r.case.arch)] |= r.ok and r.shared <= r.case.shared_limit
    groups = {g for g, _ in fits}
    tuned = {r.case.group for r in results if r.case.estimate is not None}
    missing = [f"{g} on sm_{a}" for g in sorted(groups) for a in sorted(_common.SMEM_LIMITS)
               if (g in tuned or a in _common.AOT_TARGETS) and not fits[(g, a)]]
    assert not missing, "no compiled config that fits for:\n  " + "\n  ".join(missing)


def test_hot_loads_of_memory_bound_kernels_are_vectorised(compiled):
    _, _, results = compiled
    checked = [r for r in results if r.ok and r.case.vector_loads]
    assert len(checked) >= 10, "expected the optimizer, w8a16 GEMV and quantize cases to check their loads"
    scalar = [r for r in checked if r.vector_loads < r.case.vector_loads
              or (r.case.max_scalar_loads is not None and r.scalar_loads > r.case.max_scalar_loads)]
    assert not scalar, (f"{len(scalar)} memory-bound kernels load scalars where the tensors are aligned "
                        f"(want >= the case's vector_loads):\n{_fmt(scalar)}")
    kernels = {r.case.kernel.__name__ for r in checked}
    for name in ("_adam_kernel", "_sgd_kernel", "_quantize_per_token_kernel", "_w8a16_kernel",
                 "_splitk_epilogue_kernel"):
        assert name in kernels, f"no vectorisation case for {name}"


# ----- the pruner, called directly ---------------------------------------------------------------


def _tuners():
    from bigkernels.triton import quant, sparse

    out = [(f"int8/{'small' if k else 'large'}", t.kernel, {"a_ptr": "*i8", "b_ptr": "*i8"}, {})
           for k, t in quant._INT8_TUNED.items()]
    for (small, fp32), t in quant._W8A16_TUNED.items():
        out.append((f"w8a16/{small}/{fp32}", t.kernel, {"x_ptr": "*fp32" if fp32 else "*bf16", "w_ptr": "*i8"}, {}))
    for (small, fp32), t in sparse._SPARSE24_TUNED.items():
        dt = "*fp32" if fp32 else "*bf16"
        out.append((f"sparse24/{small}/{fp32}", t.kernel, {"x_ptr": dt, "v_ptr": dt, "meta_ptr": "*u8"},
                    dict(TO_FP32=False)))
    for b in sparse.BSR_BLOCK_SIZES:
        for small in (True, False):
            for fp32 in (True, False):
                dt = "*fp32" if fp32 else "*bf16"
                out.append((f"bsr{b}/{small}/{fp32}", sparse._bsr_tuned(b, small, fp32).kernel,
                            {"x_ptr": dt, "blk_ptr": dt}, dict(B=b, TO_FP32=False)))
    return out


@pytest.mark.parametrize("arch", sorted(_common.SMEM_LIMITS), ids=lambda a: f"sm_{a}")
def test_pruner_keeps_only_configs_within_the_limit(arch):
    """Called as the autotuner calls it (``early_config_prune(configs, named_args, **kwargs)``),
    with the device's limit: it keeps exactly the configs whose estimate is within it; when none
    is (some 16-bit lists on sm_86/89's 99 KB), the one with the smallest estimate."""
    limit = _common.SMEM_LIMITS[arch]
    fallbacks = {}
    for name, tuner, sig, flags in _tuners():
        prune = tuner.early_config_prune
        named = _common.meta_args(tuner.fn, sig)
        with _common.shared_memory_limit_as(limit):
            kept = prune(tuner.configs, named, **flags)
        estimates = {id(c): prune.estimate(c, named, flags) for c in tuner.configs}
        fitting = [c for c in tuner.configs if estimates[id(c)] <= limit]
        if fitting:
            assert kept == fitting, f"{name} on sm_{arch}: kept {len(kept)}, {len(fitting)} fit"
        else:  # the smallest (the AOT test checks that Triton's allocation of it fits)
            fallbacks[(name, arch)] = min(estimates.values())
            assert kept == [min(tuner.configs, key=lambda c: estimates[id(c)])], name
    # Estimates are upper bounds; A100 and H100 keep a config by estimate in every list.
    assert not [k for k in fallbacks if k[1] != 86], fallbacks


def test_pruner_falls_back_to_the_smallest_config_when_nothing_fits():
    from bigkernels.triton import sparse

    tuner = sparse._SPARSE24_TUNED[(True, True)].kernel
    named = _common.meta_args(tuner.fn, {"x_ptr": "*fp32", "v_ptr": "*fp32", "meta_ptr": "*u8"})
    with _common.shared_memory_limit_as(1024):
        kept = tuner.early_config_prune(tuner.configs, named, TO_FP32=False)
    est = tuner.early_config_prune.estimate
    assert kept == [min(tuner.configs, key=lambda c: est(c, named, {}))]


def test_sparse24_fp32_small_m_fits_an_a100():
    """Defect 1: every small-M fp32 config needed 254-483 KB (sm_80 allows 163 KB)."""
    from bigkernels.triton import sparse

    for small in (True, False):
        tuner = sparse._SPARSE24_TUNED[(small, True)].kernel
        named = _common.meta_args(tuner.fn, {"x_ptr": "*fp32", "v_ptr": "*fp32", "meta_ptr": "*u8"})
        for arch in (80, 86):
            with _common.shared_memory_limit_as(_common.SMEM_LIMITS[arch]):
                kept = tuner.early_config_prune(tuner.configs, named, TO_FP32=False)
            assert kept == tuner.configs, f"fp32 sparse24 (small={small}) configs pruned on sm_{arch}"


# ----- discovery -----------------------------------------------------------------------------------


def _fake_module(tmp_path, monkeypatch, name, source):
    path = tmp_path / f"{name}.py"
    path.write_text(textwrap.dedent(source))
    spec = importlib.util.spec_from_file_location(f"bigkernels.triton.{name}", path)
    mod = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, mod)
    spec.loader.exec_module(mod)
    monkeypatch.setattr(_aot, "kernel_modules", lambda: [spec.name])
    return mod


def test_discovery_flags_a_kernel_module_without_cases(tmp_path, monkeypatch):
    _fake_module(tmp_path, monkeypatch, "_fake_nocases", """
        import triton
        import triton.language as tl

        @triton.jit
        def _new_kernel(x_ptr, BLOCK: tl.constexpr):
            tl.store(x_ptr + tl.arange(0, BLOCK), 0.0)
    """)
    _, problems = _aot.collect()
    assert len(problems) == 1 and "_new_kernel" in problems[0] and "aot_cases" in problems[0]


def test_discovery_flags_a_kernel_no_case_reaches(tmp_path, monkeypatch):
    _fake_module(tmp_path, monkeypatch, "_fake_partial", """
        import triton
        import triton.language as tl

        @triton.jit
        def _helper(x):
            return x + 1.0

        @triton.jit
        def _covered(x_ptr, BLOCK: tl.constexpr):
            offs = tl.arange(0, BLOCK)
            tl.store(x_ptr + offs, _helper(tl.load(x_ptr + offs)))

        @triton.jit
        def _forgotten(x_ptr, BLOCK: tl.constexpr):
            tl.store(x_ptr + tl.arange(0, BLOCK), 0.0)

        def aot_cases():
            from bigkernels.triton._common import AOTCase
            return [AOTCase(_covered, dict(BLOCK=128), dict(x_ptr="*fp32"), arch=90)]
    """)
    cases, problems = _aot.collect()
    assert len(cases["bigkernels.triton._fake_partial"]) == 1
    assert len(problems) == 1 and "_forgotten" in problems[0], problems  # _helper is reached through _covered


# ----- launching: one launcher, under the tensors' device ----------------------------------------------


def test_launcher_runs_under_the_first_tensors_device(monkeypatch):
    """Every eager launch enters a guard for its tensors' device (so Triton launches there, on that
    device's current stream), whatever device is current; CPU tensors (interpreter) need none."""
    import contextlib

    import torch

    entered, calls = [], []

    @contextlib.contextmanager
    def device_guard(d):
        entered.append(d)
        yield

    class Wrapped:
        def __getitem__(self, grid):
            return lambda *a, **k: calls.append((grid, a, k))

    monkeypatch.setattr(torch.cuda, "device", device_guard)
    launch = _common._Launcher(Wrapped())
    cpu = torch.zeros(1)
    launch[(4,)](3, cpu, X=1)
    assert entered == [] and calls == [((4,), (3, cpu), {"X": 1})]
    monkeypatch.setattr(_common, "_first_device", lambda args: torch.device("cuda", 1))
    launch[(2, 3)](cpu)
    assert entered == [torch.device("cuda", 1)] and len(calls) == 2


def test_kernel_modules_launch_only_through_the_shared_launcher():
    """No module wraps or runs a kernel itself: the device guard lives in _common.launcher alone."""
    import inspect
    import re

    for name in _aot.kernel_modules():
        if name.endswith("._common"):
            continue
        src = inspect.getsource(importlib.import_module(name))
        assert "wrap_triton" not in src, f"{name} calls wrap_triton: launch through _common.launcher"
        bare = re.findall(r"\b(_\w+_kernel)\[", src)
        assert not bare, f"{name} launches {bare} directly: use _common.launcher(kernel)[grid](...)"


def test_is_real_tensor_accepts_parameters_not_fakes():
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    assert _common.is_real_tensor(torch.zeros(2)) and _common.is_real_tensor(torch.nn.Parameter(torch.zeros(2)))
    with FakeTensorMode() as mode:
        fake = mode.from_tensor(torch.zeros(2))
    assert not _common.is_real_tensor(fake)
