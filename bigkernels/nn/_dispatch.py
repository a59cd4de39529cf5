"""Shape dispatch of the compressed linear layers, by measurement on the running machine.

A compressed layer (SparseLinear, QuantLinear, CodebookLinear) has one or more kernel paths and dense fallbacks:

* ``"decompress"``: ``F.linear`` with the weight decompressed for the call (no memory kept), for
  shapes where the product dwarfs the decompression (large batches on a slow kernel);
* ``"dense"``: the same with the decompressed weight cached, offered only where that copy costs
  little: layers whose dense weight is at most ``BIGKERNELS_DENSE_CACHE_BYTES`` (default 1 MiB:
  up to 512 x 512 in fp32), where per-call overheads decide, and layers whose compressed format
  is not smaller than the dense weight anyway (CSR below ~50% sparsity). 0 disables it: the
  dispatcher then never keeps more memory than the compressed layer;
* ``"dense_mm"``: the cached weight multiplied by ``bigkernels::dense_mm`` (the CPU C++ tiles of
  the w8a16 kernel with a float weight), timed beside ``"dense"`` on the CPU for up to
  ``DENSE_MM_MAX_ROWS`` rows: on the AVX2 (Zen 3) VM measured, MKL's product behind ``F.linear``
  ran 1.9-3.6x slower than these tiles at 1-4 rows of a 1024 x 1024 layer. It must beat
  ``"dense"`` by 5% (tiny layers tie within timing noise, and the op call costs more there).

Where "dense" is offered, "decompress" is not timed: it is the same product plus building the
weight, and timing it (a fresh 4 MB tensor per call at 1024 x 1024) slowed the path timed after
it ~2x on a 2-core VM, which then lost to a kernel 1.5x slower than it in steady state.

On AVX2 CPUs the kernel paths themselves already run the dense product on decompressed panels
where the format's own kernel would lose (csrc/common/cpu_gemm_avx2.h: int8 weights, BSR blocks
and dense-enough CSR are decoded per k-block into a cache-sized dense panel and multiplied by a
register-blocked micro-kernel, which runs at ~80% of the FMA peak where MKL's sgemm reaches ~50-60%
on such CPUs), so for layers over the cache limit the kernel path is the fast fallback and
``"decompress"`` rarely wins.

Which is fastest depends on the machine, the layer's shape and batch size and its density: small
layers and low sparsity lose to dense BLAS on the CPU, kernel launch overheads differ between GPUs.
Rather than a crossover table measured on one machine, the first call for a key (device, dtype,
layer shape and format, batch size bucket) times every path on the real input and later calls
reuse the winner: within the memory rule above, the layer runs at least as fast as the dense
product it replaced, as measured on that machine (once, best of three timed calls per path, up to
seven for calls that take under a few milliseconds; ``"decompress"``, which builds a whole dense
weight per call, wins only when it is 5% faster than every other path. A decision taken while the
machine was disturbed can still be off: ``clear()`` measures again).

Dispatched: calls that want no gradient (inference: grad mode off, or neither the input nor the
layer's stored weight requires one). ``torch.compile`` / CUDA-graph capture and training run the
layer's differentiable kernel op. Every path computes the same product up to float rounding (for
w8a8, the dense paths quantise the activations as the int8 kernel does), so a decision changes
speed, not results. ``BIGKERNELS_LINEAR_DISPATCH`` forces one path everywhere (``kernel`` or
``dense``; default ``measure``). Both variables are read again by :func:`clear`. Layers keep their own decisions in a :class:`Routes` (one dict lookup per
call: these layers also run at sizes where a microsecond of Python is a tenth of the product).
"""
from __future__ import annotations

import math
import os
import time
from typing import Callable, Dict, Hashable

import torch
from torch import Tensor

from bigkernels.ops import _registry

_CHOICES: Dict[Hashable, str] = {}
_MODES = ("measure", "kernel", "dense")
FAST_ENOUGH = 2.0  # after one timed round, a path this many times faster than the rest wins
MAX_ROUNDS, MORE_ROUNDS_S = 7, 0.05  # best of 3 timed rounds, of up to 7 while they take < 50 ms in all
KERNEL_MARGIN = 0.95  # "decompress" must beat the other paths, "dense_mm" F.linear, by 5% (else noise decides)
_generation = 0  # bumped by clear(): layers' own route caches then start over
_mode = None
_cache_bytes = None
CACHED_PATHS = ("dense", "dense_mm")  # the paths that multiply the layer's kept dense copy
DENSE_PATHS = CACHED_PATHS + ("decompress",)
DENSE_MM_MAX_ROWS = 32  # dense_mm's tiles lose to F.linear well before this on every CPU measured


def mode() -> str:
    global _mode
    if _mode is None:
        value = os.environ.get("BIGKERNELS_LINEAR_DISPATCH", "measure")
        if value not in _MODES:
            raise ValueError(f"BIGKERNELS_LINEAR_DISPATCH must be one of {_MODES}, got {value!r}")
        _mode = value
    return _mode


def cache_bytes() -> int:
    """Largest dense weight (bytes) a layer may keep cached for the ``"dense"`` path."""
    global _cache_bytes
    if _cache_bytes is None:
        raw = os.environ.get("BIGKERNELS_DENSE_CACHE_BYTES", str(1 << 20))
        try:
            _cache_bytes = int(raw)
        except ValueError:
            raise ValueError(f"BIGKERNELS_DENSE_CACHE_BYTES must be an integer number of bytes, got {raw!r}") from None
    return _cache_bytes


def rows_bucket(m: int) -> int:
    """Batch sizes sharing one decision: powers of two (1, 2, 4, ..., then 2048, 4096, ...)."""
    return 1 << max(0, (m - 1).bit_length())


def can_dispatch(x: Tensor, values: Tensor) -> bool:
    """Inference (no gradient to ``x`` or the layer's stored ``values``) outside tracing and
    CUDA-graph capture, on a non-empty input: the case this module decides."""
    if torch.is_grad_enabled() and (x.requires_grad or values.requires_grad):
        return False
    if torch.compiler.is_compiling() or x.shape[0] == 0:
        return False
    return not (x.is_cuda and torch.cuda.is_current_stream_capturing())


def _synchronizer(devices) -> Callable[[], None]:
    """Waits for the work queued on every CUDA device among ``devices`` (each by its own index:
    ``torch.cuda.synchronize()`` alone waits for the current device only, and a layer placed on
    another GPU would be timed by its launch overhead)."""
    cuda = sorted({torch.device(d) for d in devices if torch.device(d).type == "cuda"}, key=str)
    if not cuda:
        return lambda: None

    def sync() -> None:
        for d in cuda:
            torch.cuda.synchronize(d)

    return sync


def _time(paths: Dict[str, Callable[[], Tensor]], device) -> Dict[str, float]:
    """Best-of wall time per path, paths alternating; one warm-up call each. ``device`` (one or a
    collection): where the paths run; every CUDA device among them is synchronised around each
    timed call."""
    sync = _synchronizer([device] if isinstance(device, (torch.device, str)) else device)
    for fn in paths.values():
        fn()
    best = {name: math.inf for name in paths}
    start = time.perf_counter()
    for round_ in range(MAX_ROUNDS):
        for name, fn in paths.items():
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            best[name] = min(best[name], time.perf_counter() - t0)
        ranked = sorted(best.values())
        if round_ == 0 and len(ranked) > 1 and ranked[1] > FAST_ENOUGH * ranked[0]:
            break  # clear winner: big layers are not timed three times
        if round_ >= 2 and time.perf_counter() - start > MORE_ROUNDS_S:
            break  # three rounds; cheap calls get more (a best-of filters out a busy machine)
    return best


def choose(key: Hashable, paths: Dict[str, Callable[[], Tensor]], device) -> str:
    """The fastest of ``paths`` (name -> zero-argument call) for ``key``, measured on first use on
    ``device`` (a device or a collection of them: the devices the paths' tensors are on, each
    synchronised when timing). Names other than those of DENSE_PATHS are kernel paths; a forced
    mode picks the first kernel path, or the first dense one."""
    forced = mode()
    if forced != "measure" or len(paths) == 1:
        want_dense = forced == "dense"
        return next(name for name in paths if (name in DENSE_PATHS) == want_dense)
    hit = _CHOICES.get(key)
    if hit is None or hit not in paths:
        with torch.no_grad():
            times = _time(paths, device)
        hit = min(times, key=times.get)
        others = [name for name in times if name != "decompress"]
        if hit == "decompress" and others:  # a whole dense weight per call: only when clearly faster
            runner_up = min(others, key=times.get)
            if times[hit] > KERNEL_MARGIN * times[runner_up]:
                hit = runner_up
        if hit == "dense_mm" and "dense" in times and times[hit] > KERNEL_MARGIN * times["dense"]:
            hit = "dense"  # a tie (tiny layers, within timing noise) goes to the user's own F.linear
        _CHOICES[key] = hit
    return hit


def pick(layer, x: Tensor, key: tuple, kernels: Dict[str, Callable[[], Tensor]], stored: Tensor) -> str:
    """:func:`choose` among a layer's ``kernels`` and its dense paths for the 2-D input ``x``
    (``key`` gets the rows bucket appended). The layer provides ``_dense`` (a DenseCache),
    ``_routes`` (Routes), ``_dense_weight()`` and ``_dense_input(x)`` (the float weight and input
    whose product equals its kernels' up to rounding) and ``in_features`` / ``out_features``; the
    answer is remembered in its routes, and its cached dense weight dropped unless "dense" won."""
    paths = dict(kernels)
    dense_bytes = layer.in_features * layer.out_features * x.element_size()
    budget = cache_bytes()
    if budget > 0 and (dense_bytes <= budget or stored_bytes(layer) >= dense_bytes):
        paths["dense"] = lambda: dense_linear(layer, "dense", x, stored)
        if dense_mm_applies(x):
            paths["dense_mm"] = lambda: dense_linear(layer, "dense_mm", x, stored)
    else:  # the same product plus building the weight: never faster than "dense", so not timed beside it
        paths["decompress"] = lambda: dense_linear(layer, "decompress", x, stored)
    # timed on the devices of the input and of the layer's stored weight (the same, for a layer
    # that runs): both are synchronised, whichever device is current
    path = choose(key + (rows_bucket(x.shape[0]),), paths, (x.device, stored.device))
    layer._routes.put(x, path)
    if path not in CACHED_PATHS:
        layer._dense.drop()
    return path


def dense_mm_applies(x: Tensor) -> bool:
    """Whether the cached dense weight may also be timed with ``bigkernels::dense_mm`` (its CPU
    C++ tiles; on CUDA it is the reference, i.e. ``F.linear``): CPU inputs of few rows."""
    return x.device.type == "cpu" and x.shape[0] <= DENSE_MM_MAX_ROWS and _registry.choose("dense_mm", "cpu") == "cpu-c++"


def stored_bytes(layer) -> int:
    """Bytes of the layer's compressed weight: its own parameters and buffers but the bias."""
    tensors = [t for name, t in layer.named_parameters(recurse=False) if name != "bias"]
    tensors += list(layer.buffers(recurse=False))
    return sum(t.numel() * t.element_size() for t in tensors)


def dense_linear(layer, path: str, x: Tensor, stored: Tensor) -> Tensor:
    """``F.linear`` of the layer's dense input and decompressed weight (cached for ``"dense"``,
    built for this call for ``"decompress"``) plus its bias, in x's dtype."""
    bias = layer._parameters.get("bias")
    if bias is not None and bias.dtype != x.dtype:
        bias = bias.to(x.dtype)
    xd = layer._dense_input(x)
    if path in CACHED_PATHS:
        return layer._dense.linear(xd, stored, layer._dense_weight, bias, path == "dense_mm")
    return torch.nn.functional.linear(xd, layer._dense_weight().to(device=x.device, dtype=x.dtype), bias)


def choices() -> Dict[Hashable, str]:
    """The decisions taken so far (key -> path), e.g. for ``bigkernels.info()`` or a log."""
    return dict(_CHOICES)


def clear() -> None:
    """Forget every decision (the next inference call of each shape measures again) and read
    ``BIGKERNELS_LINEAR_DISPATCH`` and ``BIGKERNELS_DENSE_CACHE_BYTES`` again."""
    global _generation, _mode, _cache_bytes
    _CHOICES.clear()
    _generation += 1
    _mode = _cache_bytes = None


class Routes:
    """One layer's decisions: (dtype, device, rows) -> path name, valid until clear(). Keyed by
    the exact row count (one dict lookup); rows of one bucket share the global decision."""

    __slots__ = ("generation", "table")

    def __init__(self):
        self.generation, self.table = _generation, {}

    def get(self, x: Tensor):
        if self.generation != _generation:
            self.generation, self.table = _generation, {}
        return self.table.get((x.dtype, x.device, x.shape[0]))

    def put(self, x: Tensor, path: str) -> None:
        self.table[(x.dtype, x.device, x.shape[0])] = path


def version(t: Tensor) -> int:
    """``t._version``, or -1 for an inference tensor (it has no version counter: a layer built
    under ``torch.inference_mode`` is not updated in place afterwards)."""
    try:
        return t._version
    except RuntimeError:
        return -1


class DenseCache:
    """A layer's decompressed weight in the input's dtype, rebuilt when the stored tensor changes
    (in-place version, storage) or the input's dtype/device does, and dropped when the dense path
    is not chosen."""

    __slots__ = ("key", "weight")

    def __init__(self):
        self.key = self.weight = None

    def linear(self, x: Tensor, stored: Tensor, build_weight: Callable[[], Tensor], bias, tiles: bool = False) -> Tensor:
        """``F.linear(x, W, bias)`` with W = build_weight() in x's dtype (cached); ``tiles``: by
        ``bigkernels::dense_mm`` instead (the same product, fp32 sums)."""
        key = (version(stored), stored.data_ptr(), x.dtype, x.device)
        if self.key != key:
            with torch.inference_mode(False), torch.no_grad():  # a normal tensor, usable with autograd later
                self.weight = build_weight().to(device=x.device, dtype=x.dtype)
            self.key = key
        if tiles:
            return _registry.resolve("dense_mm", "cpu")(x, self.weight, bias)
        return torch.nn.functional.linear(x, self.weight, bias)

    def drop(self) -> None:
        self.key = self.weight = None
