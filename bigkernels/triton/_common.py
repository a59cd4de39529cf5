"""Host-side helpers shared by the Triton kernel modules, and the ahead-of-time (AOT) compile
convention every Triton kernel module follows.

Launching
---------
:func:`launcher` is THE way a module launches a kernel (``launcher(kernel)[grid](*args, **meta)``):
it wraps the kernel for tracing (``wrap_triton``; under ``TRITON_INTERPRET=1`` a traceable wrapper
of the interpreted kernel) and runs every eager launch under a device guard for the device of the
first tensor argument, so the kernel runs on the tensors' device and on *that* device's current
stream (Triton launches on the current device's current stream), whatever device is current.
:func:`launch_tiled` launches 2-D tiled GEMM kernels (one fixed config under the interpreter,
autotuned small/large-M on a GPU). :func:`autotune` is ``triton.autotune`` with a shared-memory
pruner (:func:`smem_pruner`): configs whose estimated shared memory exceeds the device's opt-in
limit are dropped before the autotuner benchmarks or launches any, so a config that cannot run
on the device present is never launched (Triton raises ``OutOfResources`` when the only or best
remaining config does not fit).

AOT compile cases (the convention)
----------------------------------
CI has no GPU, yet it must see kernels that do not compile for a GPU architecture, configs that do
not fit its shared memory and hot loads that are not vectorised. So every module under
``bigkernels/triton`` that defines ``@triton.jit`` kernels also defines, at module level::

    def aot_cases() -> list[AOTCase]: ...

returning one :class:`AOTCase` per (kernel, specialisation, config, GPU target) that the module's
host code can launch: every autotune config the pruner keeps (:func:`tuned_cases` builds these from
the autotuner itself, for each of :data:`AOT_TARGETS`), every constexpr variant that changes the
code substantially (dtypes, paths), and the cases whose hot loads must be vectorised
(``vector_loads``). ``tests/test_triton_aot.py`` compiles every case with Triton's own compiler for
its target (``triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))``: TTIR -> TTGIR ->
LLVM -> PTX -> cubin with ptxas, no GPU needed) and asserts that

- every case compiles;
- every case fits its target's shared memory (``shared_limit``) — the cases of a tuned kernel
  are exactly the configs the pruner keeps, so this checks the pruner's estimate is not too low;
- every ``group`` (kernel, dtype, M bucket reachable from the dispatch) keeps at least one case on
  every target (:data:`SMEM_LIMITS`: sm_80, sm_86/89 with sm_80's code, sm_90);
- cases with ``vector_loads = n`` have at least n vectorised global loads (``ld.global*.v2``/``.v4``;
  with ``vector_bytes = 16`` only 16-byte ones count) and at most ``max_scalar_loads`` scalar ones
  in the PTX, and cases with ``vector_stores = n`` at least n vectorised global stores;
- every ``@triton.jit`` function of every module is a case's kernel or called (transitively) by
  one: a new kernel without a case fails the test, naming it.

Keep cases to what the dispatch can reach (the pruner's configs, the dtypes the host code
passes): the test compiles each once per target, in a process pool, and must stay fast in CI.
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import os
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import triton
from torch import Tensor
from torch.library import wrap_triton

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


# --------------------------------------------------------------------------------------------
# Launching
# --------------------------------------------------------------------------------------------


def _interpreted_traceable(kernel):
    """Under TRITON_INTERPRET=1, ``wrap_triton`` hands back the bare interpreted kernel, which
    cannot see fake/functional tensors; the traceable wrapper it would build on a GPU works with
    interpreted kernels too, so tests can trace (opcheck, torch.compile) the same code path."""
    from torch._higher_order_ops.triton_kernel_wrap import TraceableTritonKernelWrapper

    return TraceableTritonKernelWrapper(_interpreted_jit(kernel), None, None)


_INTERPRETED_JIT: dict = {}


def _interpreted_jit(kernel):
    """A JITFunction (what torch's tracing expects) whose launches run the interpreted kernel."""
    if kernel not in _INTERPRETED_JIT:
        from triton.runtime.jit import JITFunction

        class _InterpretedJIT(JITFunction):
            cache_key = f"bigkernels-interpreted-{kernel.fn.__qualname__}"

            def __hash__(self):
                return id(self)

            def run(self, *args, grid, warmup, **kwargs):
                return kernel.run(*args, grid=grid, warmup=warmup, **kwargs)

        _INTERPRETED_JIT[kernel] = _InterpretedJIT(kernel.fn)
    return _INTERPRETED_JIT[kernel]


def _first_device(args) -> Optional[torch.device]:
    for a in args:
        if isinstance(a, Tensor):
            return a.device
    return None


class _Launcher:
    """``launcher(kernel)[grid](*args, **meta)``: the launch under a guard for the device of the
    first tensor argument (its current stream is then the one Triton launches on)."""

    __slots__ = ("_wrapped",)

    def __init__(self, wrapped):
        self._wrapped = wrapped

    def __getitem__(self, grid):
        run = self._wrapped[grid]

        def launch(*args, **kwargs):
            device = _first_device(args)
            if device is None or device.type != "cuda":
                return run(*args, **kwargs)
            with torch.cuda.device(device):
                return run(*args, **kwargs)

        return launch


def launcher(kernel, traced: bool = True) -> _Launcher:
    """The launcher of ``kernel`` (a ``@triton.jit`` function or an autotuner of one).

    ``traced=True``: wrapped with ``wrap_triton`` so torch.compile / export / fake tensors see a
    user-defined Triton kernel (under the interpreter: a traceable wrapper of the interpreted
    kernel). ``traced=False``: the plain kernel, for launches that only ever run eagerly (the
    optimizers' address-table path, whose arguments are raw addresses). Built per launch, not
    cached: a traced wrapper holds an index into torch's kernel side table, which
    ``torch._dynamo.reset()`` clears."""
    if traced:
        wrapped = _interpreted_traceable(kernel) if _INTERPRET else wrap_triton(kernel)
    else:
        wrapped = wrap_triton(kernel)  # the bare kernel under the interpreter, a traceable wrapper otherwise
    return _Launcher(wrapped)


def _traced(kernel) -> _Launcher:
    """``launcher(kernel)`` (the traced launcher; kept for the modules' existing call sites)."""
    return launcher(kernel)


def is_real_tensor(t) -> bool:
    """A tensor with real storage outside any tracing: plain tensors and ``nn.Parameter`` (and other
    subclasses without their own ``__torch_dispatch__``), not fake / functional / proxy tensors."""
    return (isinstance(t, Tensor) and type(t).__torch_dispatch__ is Tensor.__torch_dispatch__
            and not torch.compiler.is_compiling())


def _m_bucket(m: int) -> int:
    """Autotune key of M: powers of two from 16 to 4096 (so decode and prefill tune apart)."""
    return min(triton.next_power_of_2(max(int(m), 16)), 4096)


def _dummy(device: torch.device) -> Tensor:
    """Stand-in for an absent pointer argument. Never an output: when traced under the interpreter
    every kernel argument counts as written, and an output passed twice would be overwritten by
    the copy of its other slot."""
    return torch.empty(1, device=device, dtype=torch.float32)


def _check_runnable(op: str, device: torch.device) -> None:
    if device.type == "cpu" and not _INTERPRET:
        raise RuntimeError(f"{op}: Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors), "
                           f"got tensors on {device}")


def _check_tensor(op: str, name: str, t, dim: int, dtypes, device: Optional[torch.device] = None) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{op}: {name} must be a Tensor, got {type(t).__name__}")
    if t.dim() != dim:
        raise ValueError(f"{op}: {name} must be {dim}-D, got {t.dim()}-D with shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        want = dtypes[0] if len(dtypes) == 1 else f"one of {tuple(dtypes)}"
        raise ValueError(f"{op}: {name} must have dtype {want}, got {t.dtype}")
    if device is not None and t.device != device:
        raise ValueError(f"{op}: {name} is on {t.device}, expected {device} (the device of the first input)")


def _check_vector(op: str, name: str, t, n: int, device: torch.device, what: str) -> Tensor:
    """A floating 1-D tensor of n elements, made contiguous (the kernels read any float dtype as fp32)."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{op}: {name} must be a Tensor, got {type(t).__name__}")
    if not t.dtype.is_floating_point:
        raise ValueError(f"{op}: {name} must be floating point, got {t.dtype}")
    if tuple(t.shape) != (n,):
        raise ValueError(f"{op}: {name} must have shape ({n},) ({what}), got {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{op}: {name} is on {t.device}, expected {device} (the device of the first input)")
    return t.contiguous()


def launch_tiled(interp_kernel, tuned_kernel, interp_meta: dict, M: int, N: int, args, flags,
                 splits: int = 1) -> None:
    """Launch a GEMM-shaped kernel over a grid of (BLOCK_M x BLOCK_N output tiles, ``splits``):
    under the interpreter ``interp_kernel`` with the fixed ``interp_meta``; on a GPU the autotuned
    ``tuned_kernel`` (the caller picks its small- or large-M variant)."""
    if _INTERPRET:
        grid = (triton.cdiv(M, interp_meta["BLOCK_M"]) * triton.cdiv(N, interp_meta["BLOCK_N"]), splits)
        launcher(interp_kernel)[grid](*args, **flags, **interp_meta, num_warps=4)
        return

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]), splits)

    launcher(tuned_kernel)[grid](*args, **flags)


@functools.lru_cache(maxsize=None)
def _num_sms(index: int) -> int:
    """Streaming multiprocessors of CUDA device ``index``."""
    return torch.cuda.get_device_properties(index).multi_processor_count


def split_k(N: int, K: int, kdiv: int, device: torch.device) -> Tuple[int, int]:
    """(splits, k_per_split) of a split-K GEMV-like launch (small M: the weight is read once, so
    enough programs must stream it to keep every SM busy): about two waves of 64-wide N tiles, each
    K slice a multiple of ``kdiv`` (the configs' largest BLOCK_K) and at least one; 16 slices at
    most. Under the interpreter two slices whenever K spans more than one ``kdiv`` (tests cover the
    split path)."""
    split = 1
    if _INTERPRET:
        split = 2 if K > kdiv else 1
    elif K >= 2 * kdiv:
        tiles = triton.cdiv(N, 64)
        split = max(1, min(triton.cdiv(2 * _num_sms(device.index or 0), tiles), K // kdiv, 16))
    if split == 1:
        return 1, K
    k_per_split = triton.cdiv(triton.cdiv(K, split), kdiv) * kdiv
    split = triton.cdiv(K, k_per_split)
    return (split, k_per_split) if split > 1 else (1, K)


# --------------------------------------------------------------------------------------------
# Shared memory: the device's limit and the autotuners' pruning
# --------------------------------------------------------------------------------------------

# Opt-in shared memory per block (bytes; cudaDevAttrMaxSharedMemoryPerBlockOptin, what Triton checks
# a kernel against) of the architectures the AOT test covers. sm_86 / sm_89 get sm_80's code from
# Triton (mma v2, cp.async) with less shared memory: the test checks them with sm_80's compile.
SMEM_LIMITS: Dict[int, int] = {80: 166912, 86: 101376, 90: 232448}
AOT_TARGETS: Tuple[int, ...] = (80, 90)  # architectures the AOT test compiles for

_SMEM_LIMIT_OVERRIDE: contextvars.ContextVar = contextvars.ContextVar("bigkernels_smem_limit", default=None)


@functools.lru_cache(maxsize=None)
def _device_smem_limit(index: int) -> int:
    props = torch.cuda.get_device_properties(index)
    limit = getattr(props, "shared_memory_per_block_optin", 0)
    if not limit:  # older torch: ask Triton's driver
        limit = triton.runtime.driver.active.utils.get_device_properties(index)["max_shared_mem"]
    return int(limit)


def shared_memory_limit(device: Optional[torch.device]) -> int:
    """Opt-in shared memory per block of ``device`` (bytes), or the limit set by
    :func:`shared_memory_limit_as` (the AOT test and CPU tests prune for a given architecture)."""
    override = _SMEM_LIMIT_OVERRIDE.get()
    if override is not None:
        return override
    if device is None or device.type != "cuda":
        return SMEM_LIMITS[80]  # interpreter / meta tensors: prune as for an A100
    return _device_smem_limit(device.index if device.index is not None else torch.cuda.current_device())


@contextlib.contextmanager
def shared_memory_limit_as(limit: int):
    """Within the block, :func:`shared_memory_limit` returns ``limit`` for every device."""
    token = _SMEM_LIMIT_OVERRIDE.set(int(limit))
    try:
        yield
    finally:
        _SMEM_LIMIT_OVERRIDE.reset(token)


def dtype_size(t) -> int:
    """Bytes per element of a tensor (or dtype)."""
    return (t if isinstance(t, torch.dtype) else t.dtype).itemsize


Estimate = Callable[[Any, Mapping[str, Any], Mapping[str, Any]], int]


def smem_pruner(estimate: Estimate):
    """An ``early_config_prune`` for ``triton.autotune``: keeps the configs whose
    ``estimate(config, named_args, kwargs)`` (shared memory in bytes) fits the device of the first
    tensor argument; when none does, the one with the smallest estimate (its launch then fails with
    Triton's OutOfResources naming the limit, rather than an autotuner error)."""

    def prune(configs, named_args, **kwargs):
        limit = shared_memory_limit(_first_device(named_args.values()))
        sized = [(estimate(c, named_args, kwargs), i, c) for i, c in enumerate(configs)]
        kept = [c for est, _, c in sized if est <= limit]
        return kept or [min(sized, key=lambda s: (s[0], s[1]))[2]]

    prune.estimate = estimate
    return prune


AUTOTUNERS: List[Any] = []  # every autotuner made by autotune() (the AOT test checks their configs are compiled)


def autotune(configs, key, estimate: Estimate):
    """``triton.autotune(configs, key)`` whose configs are pruned by :func:`smem_pruner(estimate)`."""
    decorate = triton.autotune(configs=configs, key=key,
                               prune_configs_by={"early_config_prune": smem_pruner(estimate)})

    def register(fn):
        tuner = decorate(fn)
        AUTOTUNERS.append(tuner)
        return tuner

    return register


class _Tuned:
    """An autotuned kernel (:func:`autotune`: configs pruned by shared memory) and, for K-looping
    kernels, the K multiple (largest BLOCK_K of its configs) that lets every config run its K loop
    without masks (1 where no config has a BLOCK_K)."""

    def __init__(self, kernel, configs, key, estimate: Estimate):
        self.kernel = autotune(configs, key, estimate)(kernel)
        self.kdiv = max((c.kwargs.get("BLOCK_K", 1) for c in configs), default=1)


def tile_smem(config, stages: Optional[int] = None, **tiles: Tuple[Tuple[str, str], int]) -> int:
    """Bytes of ``stages`` (default: the config's num_stages) pipeline buffers of the given tiles:
    each keyword is ``((dim, dim), bytes per element)`` with dims named by config keys or given as
    ints (``a=(("BLOCK_M", "BLOCK_K"), 2)``)."""
    total = 0
    for (d0, d1), size in tiles.values():
        r = config.kwargs[d0] if isinstance(d0, str) else d0
        c = config.kwargs[d1] if isinstance(d1, str) else d1
        total += r * c * size
    return total * (config.num_stages if stages is None else stages)


# --------------------------------------------------------------------------------------------
# AOT compile cases
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class AOTCase:
    """One ahead-of-time compile of ``kernel`` (see the module docstring for what is checked).

    ``signature``: the Triton type of every non-constexpr argument (``"*fp16"``, ``"*i64"``,
    ``"i32"``, ``"fp32"``); arguments not named there and not in ``constexprs`` are ``"i32"``.
    ``aligned``: arguments specialised as 16-divisible (Triton's runtime does so for pointers whose
    address and ints whose value are multiples of 16); default: every pointer argument.
    ``group``: the dispatch class (e.g. ``"w8a16/bf16/M<=16"``) that must keep a fitting case on
    every target. ``vector_loads`` / ``max_scalar_loads`` / ``vector_stores``: PTX access counts
    (0 / None: unchecked); ``vector_bytes``: the width a vector access must have to count (0: any
    ``.v2``/``.v4``; 16: 16-byte vectors only, e.g. ``ld.global.v4.b32``).
    """

    kernel: Any
    constexprs: Mapping[str, Any]
    signature: Mapping[str, str] = dataclasses.field(default_factory=dict)
    num_warps: int = 4
    num_stages: int = 3
    arch: int = 90
    aligned: Optional[Tuple[str, ...]] = None
    group: str = ""
    vector_loads: int = 0
    max_scalar_loads: Optional[int] = None
    vector_stores: int = 0
    vector_bytes: int = 0
    estimate: Optional[int] = None  # the pruner's shared-memory estimate (bytes), for tuned cases
    note: str = ""

    @property
    def shared_limit(self) -> int:
        return SMEM_LIMITS[self.arch]

    @property
    def compile_arch(self) -> int:
        """The architecture compiled for: sm_86/89 share sm_80's code."""
        return 80 if 80 <= self.arch < 90 else self.arch

    def full_signature(self) -> Dict[str, str]:
        sig = {}
        for name in self.kernel.arg_names:
            if name in self.constexprs:
                sig[name] = "constexpr"
            else:
                sig[name] = self.signature.get(name, "i32")
        unknown = (set(self.signature) | set(self.constexprs)) - set(self.kernel.arg_names)
        if unknown:
            raise ValueError(f"AOT case of {self.kernel.__name__}: no argument(s) {sorted(unknown)}")
        return sig

    def attrs(self) -> Dict[Tuple[int, ...], list]:
        sig = self.full_signature()
        aligned = self.aligned if self.aligned is not None else tuple(n for n, t in sig.items() if t.startswith("*"))
        return {(i,): [["tt.divisibility", 16]] for i, n in enumerate(self.kernel.arg_names) if n in aligned}

    def describe(self) -> str:
        meta = ", ".join(f"{k}={v}" for k, v in self.constexprs.items())
        types = ",".join(sorted({t for t in self.signature.values() if t.startswith("*")}))
        return (f"{self.kernel.__name__}[sm_{self.arch}, {types}, warps={self.num_warps}, "
                f"stages={self.num_stages}, {meta}]{' ' + self.note if self.note else ''}")


_TORCH_TYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "fp64": torch.float64,
                "i8": torch.int8, "u8": torch.uint8, "i32": torch.int32, "i64": torch.int64, "i1": torch.bool}


def meta_args(kernel, signature: Mapping[str, str]) -> Dict[str, Any]:
    """Named arguments like the autotuner's ``named_args``: an empty meta tensor of the pointee
    dtype for each pointer argument, 0 for the other non-constexpr arguments named in ``signature``."""
    args = {}
    for name in kernel.arg_names:
        t = signature.get(name, "i32")
        args[name] = torch.empty(0, dtype=_TORCH_TYPES[t[1:]], device="meta") if t.startswith("*") else 0
    return args


def tuned_cases(tuner, signature: Mapping[str, str], flags: Mapping[str, Any], group: str,
                archs: Sequence[int] = tuple(SMEM_LIMITS), **case_kw) -> List[AOTCase]:
    """The AOT cases of autotuner ``tuner`` launched with ``flags``: for each architecture in
    ``archs``, the configs its pruner keeps at that architecture's shared-memory limit."""
    prune = tuner.early_config_prune
    if prune is None or not hasattr(prune, "estimate"):
        raise ValueError(f"autotuner of {tuner.fn.__name__} has no smem_pruner (use _common.autotune)")
    named = meta_args(tuner.fn, signature)
    cases = []
    for arch in archs:
        with shared_memory_limit_as(SMEM_LIMITS[arch]):
            kept = prune(tuner.configs, named, **flags)
        for c in kept:
            cases.append(AOTCase(tuner.fn, {**flags, **c.kwargs}, signature, num_warps=c.num_warps,
                                 num_stages=c.num_stages, arch=arch, group=group,
                                 estimate=prune.estimate(c, named, flags), **case_kw))
    return cases
