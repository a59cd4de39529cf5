"""Host-side helpers shared by the Triton kernel modules: the interpreter switch, a traceable
launcher, absent-pointer stand-ins, input checks, the autotune M bucket and the launch of 2-D
tiled GEMM kernels (one fixed config under the interpreter, autotuned small/large-M on a GPU)."""
from __future__ import annotations

import os
from typing import Optional

import torch
import triton
from torch import Tensor
from torch.library import wrap_triton

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def _traced(kernel):
    """``wrap_triton(kernel)`` for the per-tensor (traced) path.

    Under TRITON_INTERPRET=1, ``wrap_triton`` hands back the bare interpreted kernel, which
    cannot see fake/functional tensors; the traceable wrapper it would build on a GPU works with
    interpreted kernels too, so tests can trace (opcheck, torch.compile) the same code path.
    """
    if _INTERPRET:
        from torch._higher_order_ops.triton_kernel_wrap import TraceableTritonKernelWrapper

        return TraceableTritonKernelWrapper(_interpreted_jit(kernel), None, None)
    return wrap_triton(kernel)


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
        _traced(interp_kernel)[grid](*args, **flags, **interp_meta, num_warps=4)
        return

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]), splits)

    _traced(tuned_kernel)[grid](*args, **flags)
