"""Weight sharing: 1-D k-means codebooks for linear weights, and ``share_weights_()``, which swaps a
model's linear-like layers for :class:`bigkernels.nn.CodebookLinear`.

k-means in one dimension has structure a generic k-means does not use: clusters are intervals of
the sorted values, separated by the midpoints between consecutive centroids. :func:`kmeans_1d`
runs Lloyd's algorithm on a fine histogram of each group's weights (per bin: total weight and
weighted sum; ~64 weights per bin, up to 65,536 bins between the group's min and max, built from at most ~4M weights
-- a fixed random subset of the input columns for larger layers), where an iteration costs
O(centroids x log bins) through prefix sums instead of a pass over the weights. It starts from
the quantiles of density^(1/3) (the asymptotically optimal centroid density for squared error,
Panter & Dite 1951), re-seeds a cluster left empty at the bin with the largest weighted squared
error, and stops when the centroids stop moving. Then one exact Lloyd step runs on every weight
(the ``codebook_quantize`` encoder assigns each weight to its nearest centroid; the
``codebook_centroid_grad`` kernel sums each cluster), and the final assignment is to the final
centroids: every weight maps to its nearest centroid, and every centroid is the (weighted) mean
of the weights that mapped to it one step earlier. A 4096 x 4096 layer takes about 1 s of CPU time
(``benchmarks/bench_codebook.py`` times it). On N(0, 1) weights the mean squared error is within
0.3% of the Lloyd-Max optimum (Max, 1960) at 2, 3 and 4 bits.

Weighted k-means (``sample_weight``): the error that matters is the layer's output error
``sum_m (sum_k x[m, k] dW[n, k])^2``, whose diagonal approximation weights ``dW[n, k]^2`` by
``E[x_k^2]`` (the diagonal of XᵀX / T; SqueezeLLM's sensitivity weighting with activation
statistics instead of the Fisher information). :func:`share_weights_` collects those statistics
from ``calibration_data``.
"""
from __future__ import annotations

import math
from typing import Callable, Dict, Iterable, Optional, Tuple

import torch
from torch import Tensor, nn

from bigkernels.nn import _layers
from bigkernels.nn._checks import KERNEL_DTYPES
from bigkernels.nn.codebook_linear import CodebookLinear
from bigkernels.ops import codebook as codebook_ops
from bigkernels.reference import codebook as ref


METHODS = ("kmeans", "uniform")
BITS = ref.BITS
FilterFn = Callable[[nn.Module, str], bool]
_CHUNK = 1 << 22  # elements per pass over a large weight (bounds the int64 temporaries)
_SAMPLE = 1 << 22  # weights in the histogram at most (a fixed random subset of columns beyond)
_MAX_BINS = 1 << 16
_MAX_HIST = 1 << 23  # total histogram entries over all groups


def check_bits(bits, owner: str) -> int:
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in BITS:
        raise ValueError(f"{owner}: bits must be one of {BITS}, got {bits!r}")
    return bits


def check_group_size(group_size, owner: str) -> Optional[int]:
    if group_size is None:
        return None
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size <= 0:
        raise ValueError(f"{owner}: group_size must be None (one codebook per layer) or a positive number of "
                         f"output rows, got {group_size!r}")
    return group_size


def _check_method(method, iters, owner: str) -> None:
    if method not in METHODS:
        raise ValueError(f"{owner}: method must be one of {METHODS}, got {method!r}")
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 0:
        raise ValueError(f"{owner}: iters must be a non-negative integer, got {iters!r}")


def _row_chunks(n_rows: int, k: int):
    step = max(1, _CHUNK // max(k, 1))
    for r0 in range(0, n_rows, step):
        yield r0, min(n_rows, r0 + step)


def _group_ranges(w: Tensor, gid: Tensor, groups: int) -> Tuple[Tensor, Tensor]:
    """Per-group min and max of the rows of ``w`` (row n in group gid[n])."""
    lo = torch.full((groups,), math.inf, dtype=torch.float32, device=w.device)
    hi = torch.full((groups,), -math.inf, dtype=torch.float32, device=w.device)
    lo.scatter_reduce_(0, gid, w.amin(dim=1), "amin")
    hi.scatter_reduce_(0, gid, w.amax(dim=1), "amax")
    return lo, hi


def _weighted_sums(slots: Tensor, v: Tensor, sw: Optional[Tensor], n: int) -> Tuple[Tensor, Tensor]:
    """Per slot: total weight and weighted sum of ``v`` (float64; slots flattened like ``v``)."""
    slots = slots.reshape(-1)
    vals = v.reshape(-1).double()
    if sw is None:
        return torch.bincount(slots, minlength=n).double(), torch.bincount(slots, weights=vals, minlength=n)
    wts = sw.expand_as(v).reshape(-1).double()
    return torch.bincount(slots, weights=wts, minlength=n), torch.bincount(slots, weights=vals * wts, minlength=n)


def _cluster_means(w: Tensor, packed: Tensor, sw: Optional[Tensor], old: Tensor, gs: int) -> Tensor:
    """(Weighted) mean of the weights assigned to each centroid (the sums of the centroid-gradient
    kernel, which accumulates in double on the CPU); empty clusters keep ``old``."""
    weights = torch.ones((), device=w.device).expand_as(w) if sw is None else sw.expand_as(w)
    wsum = codebook_ops.centroid_grad(weights, packed, old, gs).double()
    tot = codebook_ops.centroid_grad(w if sw is None else w * sw, packed, old, gs).double()
    mean = torch.where(wsum > 0, tot / wsum.clamp(min=1e-300), old.double())
    return mean.float().sort(dim=1).values


def _histogram(w: Tensor, gid: Tensor, sw: Optional[Tensor], lo: Tensor, width: Tensor, groups: int, bins: int):
    """Per (group, bin): total weight and weighted sum of the values (float64)."""
    n = groups * bins
    wb = torch.zeros(n, dtype=torch.float64, device=w.device)
    sb = torch.zeros_like(wb)
    for r0, r1 in _row_chunks(w.shape[0], w.shape[1]):
        g = gid[r0:r1].unsqueeze(1)
        v = w[r0:r1]
        b = ((v - lo[g]) / width[g]).floor_().clamp_(0, bins - 1).long() + g * bins
        a, s_ = _weighted_sums(b, v, None if sw is None else sw[r0:r1], n)
        wb += a
        sb += s_
    return wb.reshape(groups, bins), sb.reshape(groups, bins)


def _histogram_lloyd(wb: Tensor, sb: Tensor, lo: Tensor, width: Tensor, c: int, iters: int) -> Tensor:
    """Lloyd's algorithm on the binned data (bins are intervals in increasing order, so clusters
    are runs of bins and their sums are differences of prefix sums). Returns [G, c] float64."""
    groups, bins = wb.shape
    centers = lo.double().unsqueeze(1) + (torch.arange(bins, dtype=torch.float64, device=wb.device) + 0.5) \
        * width.double().unsqueeze(1)
    rep = torch.where(wb > 0, sb / wb.clamp(min=1e-300), centers)  # bin means: increasing along bins
    zero = torch.zeros(groups, 1, dtype=torch.float64, device=wb.device)
    cw = torch.cat([zero, wb.cumsum(1)], dim=1)
    cs = torch.cat([zero, sb.cumsum(1)], dim=1)
    total = cw[:, -1:]
    # First centroids: quantiles (j + 1/2) / c of the density^(1/3), the high-resolution optimum
    # of the centroid density for squared error (Panter & Dite, 1951), so few iterations remain.
    dens = wb.clamp(min=0).pow(1.0 / 3.0).cumsum(1)
    targets = dens[:, -1:] * (torch.arange(c, dtype=torch.float64, device=wb.device) + 0.5) / c
    first = torch.searchsorted(dens.contiguous(), targets.contiguous()).clamp_(max=bins - 1)
    cent = torch.gather(rep, 1, first)
    last = torch.full((groups, 1), bins, dtype=torch.long, device=wb.device)
    for _ in range(iters):
        mids = (cent[:, 1:] + cent[:, :-1]) * 0.5
        pos = torch.cat([torch.zeros_like(last), torch.searchsorted(rep, mids.contiguous()), last], dim=1)
        wj = cw.gather(1, pos[:, 1:]) - cw.gather(1, pos[:, :-1])
        sj = cs.gather(1, pos[:, 1:]) - cs.gather(1, pos[:, :-1])
        new = torch.where(wj > 0, sj / wj.clamp(min=1e-300), cent)
        empty = (wj <= 0) & (total > 0)
        if bool(empty.any()):
            # re-seed the first empty cluster of each group at its worst bin (largest weighted error)
            owner = torch.searchsorted(mids.contiguous(), rep.contiguous())
            err = wb * (rep - new.gather(1, owner)) ** 2
            worst = rep.gather(1, err.argmax(dim=1, keepdim=True))
            j = empty.float().argmax(dim=1, keepdim=True)
            has = empty.any(dim=1, keepdim=True)
            new = torch.where(has, new.scatter(1, j, worst), new)
        new = new.sort(dim=1).values
        moved = (new - cent).abs().max().item()
        cent = new
        if moved <= 1e-9 * float(width.max().item()):
            break
    return cent


def _sample_columns(w: Tensor, sw: Optional[Tensor]) -> Tuple[Tensor, Optional[Tensor]]:
    """At most ~_SAMPLE weights for the histogram: a fixed random subset of the input columns
    (every output row, hence every group, keeps its rows)."""
    n, k = w.shape
    keep = max(1, min(k, -(-_SAMPLE // max(n, 1))))
    if keep >= k:
        return w, sw
    gen = torch.Generator().manual_seed(0)
    cols = torch.randperm(k, generator=gen)[:keep].sort().values.to(w.device)
    return w.index_select(1, cols), (None if sw is None else sw.index_select(1, cols))


def _fit(weight: Tensor, bits: int, group_size: Optional[int], iters: int, sample_weight: Optional[Tensor],
         method: str, owner: str) -> Tuple[Tensor, Tensor]:
    check_bits(bits, owner)
    check_group_size(group_size, owner)
    _check_method(method, iters, owner)
    if weight.dim() != 2:
        raise ValueError(f"{owner}: expected a 2-D weight [out_features, in_features], got shape {tuple(weight.shape)}")
    w = weight.detach().float()
    if not bool(torch.isfinite(w).all()):
        raise ValueError(f"{owner}: the weight has NaN or infinite values; cannot build a codebook")
    n, k = w.shape
    gs = max(n, 1) if group_size is None else group_size
    groups = ref.num_groups(n, gs)
    c = 1 << bits
    sw = None
    if sample_weight is not None:
        sw = torch.as_tensor(sample_weight, device=w.device).detach().float()
        try:
            shape = torch.broadcast_shapes(sw.shape, w.shape)
        except RuntimeError:
            shape = None
        if shape != w.shape:
            raise ValueError(f"{owner}: sample_weight of shape {tuple(sample_weight.shape)} does not broadcast to the "
                             f"weight's {tuple(w.shape)}")
        if bool((sw < 0).any()) or not bool(torch.isfinite(sw).all()):
            raise ValueError(f"{owner}: sample_weight must be finite and non-negative")
        sw = sw.expand(n, k)
    if n == 0 or k == 0:
        cent = torch.zeros((groups, c), device=w.device)
        return codebook_ops.quantize(w, cent, gs), cent
    gid = ref.group_of_rows(n, gs, w.device)
    lo, hi = _group_ranges(w, gid, groups)
    if method == "uniform":
        step = (hi - lo) / c
        cent = lo.unsqueeze(1) + (torch.arange(c, device=w.device, dtype=torch.float32) + 0.5) * step.unsqueeze(1)
        return codebook_ops.quantize(w, cent, gs), cent
    ws, sws = _sample_columns(w, sw)
    per_group = max(1, ws.numel() // groups)
    # ~64 weights per bin (a smooth density for the first centroids; measured: 4 per bin leaves
    # 8-bit codebooks 1.7x above the optimum after 20 iterations, 64 per bin within 15%), at
    # least 16 bins per centroid
    bins = int(min(_MAX_BINS, max(16 * c, per_group // 64), max(16 * c, _MAX_HIST // groups)))
    width = torch.where(hi > lo, (hi - lo) / bins, torch.ones_like(hi))
    wb, sb = _histogram(ws, gid, sws, lo, width, groups, bins)
    cent = _histogram_lloyd(wb, sb, lo, width, c, iters).float().sort(dim=1).values
    # One exact Lloyd step on every weight: centroids = (weighted) means of their clusters, then
    # every weight to its nearest centroid.
    if iters > 0:
        cent = _cluster_means(w, codebook_ops.quantize(w, cent, gs), sw, cent, gs)
    return codebook_ops.quantize(w, cent, gs), cent


def kmeans_1d(weight: Tensor, bits: int, group_size: Optional[int] = None, iters: int = 20,
              sample_weight: Optional[Tensor] = None, method: str = "kmeans") -> Tuple[Tensor, Tensor]:
    """Cluster each group of output rows of ``weight [N, K]`` to 2**bits values.

    Returns ``(idx, centroids)``: int64 indices [N, K] into ``centroids [G, 2**bits]`` (fp32,
    ascending per group; G = ceil(N / group_size), one group when ``group_size`` is None), with
    every weight mapped to its nearest centroid. ``iters``: Lloyd iterations on the histogram
    (each costs O(2**bits log bins), so they are cheap; the loop stops early once the centroids
    stop moving); 0 keeps the initial centroids. ``sample_weight`` (broadcastable to [N, K],
    non-negative, e.g. per-input-channel activation energy [K]) weights each weight's squared
    error. ``method="uniform"`` places the centroids evenly between each group's min and max
    (plain uniform quantisation, the baseline k-means is measured against).
    """
    packed, cent = _fit(weight, bits, group_size, iters, sample_weight, method, "kmeans_1d")
    return ref.unpack_indices(packed, bits, weight.shape[1]), cent


def fit_codebook(weight: Tensor, bits: int, group_size: Optional[int] = None, iters: int = 20,
                 sample_weight: Optional[Tensor] = None, method: str = "kmeans") -> Tuple[Tensor, Tensor]:
    """:func:`kmeans_1d` in CodebookLinear's storage: ``(indices [N, packed] uint8, centroids [G, 2**bits] fp32)``."""
    return _fit(weight, bits, group_size, iters, sample_weight, method, "CodebookLinear.from_linear")


# ----------------------------------------------------------------------------- share_weights_
def _importance(energy: Optional[Tensor]) -> Optional[Tensor]:
    """Activation energy as k-means weights, floored at 1e-3 of its mean: an input channel that
    calibration never excited still counts a little (its weights then are not arbitrary)."""
    if energy is None:
        return None
    floor = 1e-3 * energy.mean().clamp(min=1e-12)
    return energy.clamp(min=0) + floor


def share_weights_(model: nn.Module, bits: int = 4, group_size: Optional[int] = None,
                   filter_fn: Optional[FilterFn] = None, method: str = "kmeans", iters: int = 20,
                   calibration_data: Optional[Iterable] = None) -> nn.Module:
    """Replace, in place, the linear-like layers of ``model`` (``nn.Linear`` and subclasses,
    Hugging Face ``Conv1D``) by :class:`bigkernels.nn.CodebookLinear`; returns ``model``.

    Every weight becomes a ``bits``-bit index (bits in {2, 3, 4, 8}) into a codebook of
    ``2**bits`` centroids found by 1-D k-means (``method="kmeans"``, ``iters`` Lloyd iterations
    on a histogram, then one exact one) or evenly spaced (``method="uniform"``); one codebook per
    layer, or per ``group_size`` output rows. With ``calibration_data`` (an iterable of model
    inputs: a tensor, a tuple of positional arguments or a dict of keyword arguments per batch;
    a single tensor is one batch), the k-means is weighted by each input channel's mean squared
    activation, so the codebook spends its resolution where the layer's output is sensitive.

    Which layers (``bigkernels.nn._layers``, as :func:`bigkernels.quantize_`): those
    ``filter_fn(module, fqn)`` accepts; by default every linear-like layer but tied ones (a
    layer whose weight is shared, such as a tied ``lm_head``: replacing it would untie it and
    keep both copies — never done, even when ``filter_fn`` picks it) and
    ``nn.MultiheadAttention``'s ``out_proj``; an untied output head is converted like the other
    layers (leave it out with ``filter_fn``). One INFO line on the ``bigkernels`` logger says
    what was converted and what was left alone; a warning says when nothing was. A Hugging Face
    model records the new layers in its config, so ``save_pretrained`` / ``from_pretrained``
    keep them.

    The centroids are trainable: fine-tuning them (with the model's other parameters, e.g. with
    ``bigkernels.optim.FusedAdamW``) keeps the sharing. Raises before changing anything: a bad
    argument; a model that is itself a linear layer (use ``CodebookLinear.from_linear``); chosen
    layers with weights on the meta device, with NaN/inf weights or in a dtype the kernels do not
    take (float64); a calibration batch that does not fit the layers (the error names the layer).
    """
    owner = "share_weights_"
    if not isinstance(model, nn.Module):
        raise TypeError(f"{owner}: expected an nn.Module, got {type(model).__name__}")
    check_bits(bits, owner)
    check_group_size(group_size, owner)
    _check_method(method, iters, owner)
    sel = _layers.select(model, filter_fn, call=owner, skip_heads=False, replace=True)
    already = {fqn: f"already {type(m).__name__}" for fqn, m in sel.converted.items()}
    problems = {"on the meta device (load the weights first)": [], "with NaN or infinite weights": [],
                "in float64 (cast the model first, e.g. model.float())": []}
    for fqn, m in sel.targets.items():
        w = _layers.linear_weight(m).detach()
        if w.is_meta:
            problems["on the meta device (load the weights first)"].append(fqn)
        elif w.dtype not in KERNEL_DTYPES:
            problems["in float64 (cast the model first, e.g. model.float())"].append(fqn)
        elif not bool(torch.isfinite(w).all()):
            problems["with NaN or infinite weights"].append(fqn)
    bad = "; ".join(f"{_layers.names(fqns)} ({why})" for why, fqns in problems.items() if fqns)
    if bad:
        raise ValueError(f"{owner}: cannot share the weights of layers {bad}; or leave them out with filter_fn")
    energy: Dict[str, Tensor] = {}
    weighted = ""
    if calibration_data is not None and sel.targets:
        from bigkernels.quant.quantize import run_calibration

        sums: Dict[str, Tensor] = {}
        counts: Dict[str, int] = {}

        def record(fqn, x):
            sq = x.square().sum(dim=0)
            sums[fqn] = sq if fqn not in sums else sums[fqn] + sq
            counts[fqn] = counts.get(fqn, 0) + x.shape[0]

        run_calibration(owner, model, sel.targets, calibration_data, record)
        energy = {fqn: s / max(counts[fqn], 1) for fqn, s in sums.items()}
        missed = [fqn for fqn in sel.targets if fqn not in energy]
        weighted = ", weighted by calibration" + (
            f" except {_layers.names(missed)} (not reached by calibration_data)" if missed else "")

    def convert(fqn, layer):
        return CodebookLinear.from_linear(layer, bits=bits, group_size=group_size, method=method, iters=iters,
                                          sample_weight=_importance(energy.get(fqn)))

    done = _layers.replace_each(owner, model, sel.targets, convert)
    groups = "per layer" if group_size is None else f"per {group_size} rows"
    _layers.report(owner, f"CodebookLinear({bits}-bit, {method}, codebook {groups}{weighted})", done, sel,
                   extra_skipped=already, model=model)
    return model
