"""One place that knows every bigkernels op, its backends, and which backend runs where.

Backends, by name:
  ``cpu-c++``   a C++ kernel registered for the CPU dispatch key by ``bigkernels._C``
  ``cuda-c++``  a CUDA C++ kernel registered for the CUDA dispatch key by ``bigkernels._C``
  ``triton``    a Triton kernel registered with ``torch.library.triton_op`` as ``<op>_triton``
  ``reference`` the pure-PyTorch implementation in ``bigkernels/reference/``

``BIGKERNELS_IMPL`` overrides the choice: either one backend name for every op
(``BIGKERNELS_IMPL=reference``) or a comma list of ``op=backend`` (``fused_adam_=triton``).
A backend asked for but not available falls through to the next preferred one, with a warning.
"""
from __future__ import annotations

import functools
import os
import warnings
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import torch

NAMESPACE = "bigkernels"
BACKENDS = ("cpu-c++", "cuda-c++", "triton", "reference")

# Measured preference order per device type; the first available backend wins. Families may
# override it per op (see OpInfo.preference) when a benchmark shows another crossover.
DEFAULT_PREFERENCE: Dict[str, tuple] = {
    "cpu": ("cpu-c++", "reference"),
    "cuda": ("cuda-c++", "triton", "reference"),
}


@dataclass
class OpInfo:
    name: str  # without namespace, e.g. "fused_adam_"
    schema: str  # "(Tensor x, ...) -> Tensor", as given to torch.library.define
    reference: Callable
    triton_name: Optional[str] = None  # op name of the Triton version, when one exists
    # Maps the op's keyword arguments to the Triton op's, where their schemas must differ
    # (triton_op infers its schema from Python types and cannot express e.g. ``Tensor[]? x=None``).
    triton_kwargs: Optional[Callable[[dict], dict]] = None
    preference: Dict[str, tuple] = field(default_factory=lambda: dict(DEFAULT_PREFERENCE))

    @property
    def qualname(self) -> str:
        return f"{NAMESPACE}::{self.name}"


OPS: Dict[str, OpInfo] = {}


def register(info: OpInfo) -> OpInfo:
    OPS[info.name] = info
    return info


def cpp_schema_registrations() -> str:
    """C++ source defining every op's schema with TORCH_LIBRARY, for libtorch users of the CMake
    build (Python users get the schemas from torch.library.define on import)."""
    lines = ["// Generated from bigkernels/ops by CMake; do not edit.", "#include <torch/library.h>", "",
             f"TORCH_LIBRARY({NAMESPACE}, m) {{"]
    lines += [f'  m.def("{info.name}{info.schema}");' for info in OPS.values()]
    return "\n".join(lines + ["}", ""])


def has_kernel(qualname: str, dispatch_key: str) -> bool:
    """Whether the dispatcher holds a kernel registered for exactly this key (not a fallback)."""
    try:
        dump = torch._C._dispatch_dump(qualname)
    except RuntimeError:
        return False
    return any(line.startswith(f"{dispatch_key}:") for line in dump.splitlines())


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


@functools.lru_cache(maxsize=None)
def available(op: str, backend: str) -> bool:
    info = OPS[op]
    if backend == "reference":
        return True
    if backend == "cpu-c++":
        return has_kernel(info.qualname, "CPU")
    if backend == "cuda-c++":
        return has_kernel(info.qualname, "CUDA")
    if backend == "triton":
        return info.triton_name is not None and triton_available() and _triton_op(info) is not None
    raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")


def _triton_op(info: OpInfo):
    if info.triton_name is None:
        return None
    from bigkernels import triton as _bk_triton  # registers the Triton ops on import

    _bk_triton.load()
    return getattr(getattr(torch.ops, NAMESPACE), info.triton_name, None)


@functools.lru_cache(maxsize=None)
def _overrides() -> Dict[str, str]:
    raw = os.environ.get("BIGKERNELS_IMPL", "").strip()
    if not raw:
        return {}
    if "=" not in raw:
        if raw not in BACKENDS:
            raise ValueError(f"BIGKERNELS_IMPL={raw!r}: expected one of {BACKENDS} or op=backend pairs")
        return {"*": raw}
    out = {}
    for item in raw.split(","):
        op, _, backend = item.partition("=")
        op, backend = op.strip(), backend.strip()
        if backend not in BACKENDS:
            raise ValueError(f"BIGKERNELS_IMPL: backend {backend!r} for {op!r}: expected one of {BACKENDS}")
        out[op] = backend
    return out


def forced_backend(op: str) -> Optional[str]:
    """The backend BIGKERNELS_IMPL names for ``op``, if any."""
    return _overrides().get(op) or _overrides().get("*")


def _device_type(device) -> str:
    # (a torch.device as is: building one costs ~1.5 us, on every op call)
    return device.type if isinstance(device, torch.device) else torch.device(device).type


@functools.lru_cache(maxsize=None)
def choose(op: str, device_type: str) -> str:
    """The backend ``op`` runs with on ``device_type`` (cached: the set of kernels is fixed after import)."""
    info = OPS[op]
    prefs = list(info.preference.get(device_type, ("reference",)))
    forced = forced_backend(op)
    if forced is not None:
        # Triton runs CPU tensors only under its interpreter; C++ backends only on their device.
        usable = forced == "reference" or forced in prefs or (
            forced == "triton" and (device_type != "cpu" or os.environ.get("TRITON_INTERPRET") == "1"))
        if usable and available(op, forced):
            return forced
        warnings.warn(f"bigkernels: BIGKERNELS_IMPL asks {forced} for {op} on {device_type}; not available here")
    for backend in prefs:
        if available(op, backend):
            return backend
    return "reference"


def call(op: str, device, *args, **kwargs):
    """Run ``op`` on the backend chosen for ``device``."""
    return resolve(op, _device_type(device))(*args, **kwargs)


@functools.lru_cache(maxsize=None)
def resolve(op: str, device_type: str) -> Callable:
    """The callable :func:`call` runs ``op`` with on ``device_type``: the chosen backend's op or
    function, looked up once (the layers call ops at sizes where the few microseconds of choosing
    again per call are several percent of the product)."""
    backend = choose(op, device_type)
    info = OPS[op]
    if backend == "reference":
        return info.reference
    if backend == "triton":
        return functools.partial(call_backend, op, "triton")
    return getattr(getattr(torch.ops, NAMESPACE), op)


def call_backend(op: str, backend: str, *args, **kwargs):
    """Run ``op`` on a given backend (callers that choose by shape use this)."""
    info = OPS[op]
    if backend == "reference":
        return info.reference(*args, **kwargs)
    if backend == "triton":
        if info.triton_kwargs is not None:
            kwargs = info.triton_kwargs(kwargs)
        return _triton_op(info)(*args, **kwargs)
    return getattr(getattr(torch.ops, NAMESPACE), op)(*args, **kwargs)


def backend_table() -> Dict[str, Dict[str, object]]:
    """For ``bigkernels.info()``: per op, the backends available and the one each device uses."""
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    table = {}
    for name in OPS:
        table[name] = {
            "available": [b for b in BACKENDS if available(name, b)],
            "uses": {d: choose(name, d) for d in devices},
        }
    return table


def clear_choice_cache() -> None:
    """Forget cached choices (tests that change BIGKERNELS_IMPL call this)."""
    choose.cache_clear()
    resolve.cache_clear()
    available.cache_clear()
    _overrides.cache_clear()
