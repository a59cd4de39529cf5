"""``bigkernels.info()``: what this installation has and which kernel each op runs with."""
from __future__ import annotations

import os
import platform
from typing import Any, Dict, List


def cpu_features() -> List[str]:
    """The CPU features bigkernels' kernels care about, as the OS reports them."""
    wanted = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_bf16",
              "avx512_vnni", "avx_vnni", "amx_tile")
    flags: set = set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    return [w for w in wanted if w in flags]


_ISA_LEVELS = ("scalar", "avx2", "avx512", "avx512_bf16")  # narrowest first, as best_kernels() in optim_cpu.cpp
_ISA_NAMES = {"scalar": "scalar", "avx2": "avx2+fma+f16c", "avx512": "avx512f/bw/vl/dq+fma+f16c",
              "avx512_bf16": "avx512f/bw/vl/dq+avx512_bf16+fma+f16c"}


def cpu_kernel_isa() -> str:
    """The instruction set the C++ CPU kernels pick at run time (same rule as best_kernels() in
    csrc/optim/optim_cpu.cpp): the widest the CPU has, capped by BIGKERNELS_CPU_ISA=scalar|avx2|avx512|avx512_bf16."""
    feats = set(cpu_features())
    level = 0
    if {"avx2", "fma", "f16c"} <= feats:
        level = 1
        if {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= feats:
            level = 3 if "avx512_bf16" in feats else 2
    forced = os.environ.get("BIGKERNELS_CPU_ISA")
    if forced in _ISA_LEVELS and _ISA_LEVELS.index(forced) < level:
        return f"{_ISA_NAMES[forced]} (capped by BIGKERNELS_CPU_ISA)"
    return _ISA_NAMES[_ISA_LEVELS[level]]


def _sparse24_status() -> str:
    """How SparseLinear(pattern="2:4") runs on this machine's GPU."""
    import torch

    from bigkernels.ops import _registry, sparse_cuda

    if not torch.cuda.is_available():
        return "no GPU: 2:4 runs on the CPU kernels"
    if not _registry.has_kernel(sparse_cuda.CSLT_MM, "CUDA"):
        return "extension built without cuSPARSELt: 2:4 falls back to the Triton/dense-math kernel"
    if not sparse_cuda.sparse24_supported():
        cap = ".".join(map(str, torch.cuda.get_device_capability()))
        return f"GPU sm_{cap.replace('.', '')} has no sparse tensor cores (needs sm_80+): 2:4 falls back"
    return "cuSPARSELt on the sparse tensor cores (fp16/bf16 inference)"


def info() -> Dict[str, Any]:
    """Versions, CPU features, the extension's state, per op the backends available here and the
    backend each device uses, and the compressed linear layers' shape dispatch so far."""
    import torch

    from bigkernels import __version__
    from bigkernels.ops import _registry
    from bigkernels.ops._extension import extension_error

    try:
        import triton

        triton_version = triton.__version__
    except Exception:
        triton_version = None
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    return {
        "bigkernels": __version__,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": triton_version,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_threads": torch.get_num_threads(),
        "cpu_features": cpu_features(),
        "cpu_kernel_isa": cpu_kernel_isa(),
        "gpus": gpus,
        "sparse24_tensor_cores": _sparse24_status(),
        "extension_loaded": extension_error() is None,
        "extension_error": extension_error(),
        "extension_build": _extension_build(),
        "ops": _registry.backend_table(),
        "linear_dispatch": _linear_dispatch(),
    }


def _extension_build() -> str:
    """How bigkernels._C was built: the LibTorch stable ABI target (the oldest torch it loads on), the
    torch whose headers it was compiled with, and the CUDA kernels' architectures and state."""
    from bigkernels.ops._extension import cuda_kernels_state

    try:
        from bigkernels._build_info import BUILD
    except ImportError:
        return "unknown (no bigkernels/_build_info.py: not built by setup.py)"
    cuda = (f"CUDA {BUILD['cuda']} kernels for {BUILD['cuda_archs']}: {cuda_kernels_state()}" if BUILD["cuda"]
            else "no CUDA kernels in this build")
    return (f"LibTorch stable ABI, abi3 (CPython >= 3.10): loads on torch >= {BUILD['stable_abi_target']} "
            f"(compiled with torch {BUILD['built_with_torch']}); {cuda}")


def _linear_dispatch() -> Dict[str, Any]:
    """QuantLinear / SparseLinear's mode and the per-shape paths measured so far in this process."""
    from bigkernels.nn import _dispatch

    return {"mode": _dispatch.mode(),
            "choices": {" ".join(map(str, key)): path for key, path in _dispatch.choices().items()}}
