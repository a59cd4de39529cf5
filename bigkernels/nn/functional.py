"""Functional forms of bigkernels' losses: ``kd_loss`` and ``fused_linear_kd_loss``.

Both compute the knowledge-distillation loss defined in :mod:`bigkernels.reference.distill`
(``T² · KL(softmax(teacher/T) ‖ softmax(student/T))`` per row, optionally mixed with cross-entropy
on labels) with a fused kernel that streams over the vocabulary and writes the gradient once,
during the forward; ``backward()`` only scales it. Double backward is not supported.
"""
from __future__ import annotations

import math
import numbers
from typing import Optional

import torch
from torch import Tensor

from bigkernels.reference.distill import REDUCTIONS

__all__ = ["kd_loss", "fused_linear_kd_loss"]

_FLOATS = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _check_tensor(op: str, name: str, t) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{op}: {name} must be a Tensor, got {type(t).__name__}")
    if t.dtype not in _FLOATS:
        raise TypeError(f"{op}: {name} must be float32, bfloat16, float16 or float64, got {t.dtype}")


def check_options(op: str, temperature, alpha, ignore_index, reduction, labels, allowed=REDUCTIONS) -> None:
    """The scalar options shared by kd_loss, KDLoss and fused_linear_kd_loss (raises naming the argument)."""
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real) or not (
            math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"{op}: temperature must be a finite number > 0, got {temperature!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not (0.0 <= alpha <= 1.0):
        raise ValueError(f"{op}: alpha must be a number in [0, 1], got {alpha!r}")
    if ignore_index is not None and (isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral)):
        raise TypeError(f"{op}: ignore_index must be an int or None, got {ignore_index!r}")
    if reduction == "mean":
        raise ValueError(f"{op}: reduction='mean' is not supported: F.kl_div's 'mean' divides by rows x vocabulary "
                         f"entries, which is rarely meant (PyTorch plans to make it 'batchmean'); use one of {allowed}")
    if reduction not in allowed:
        raise ValueError(f"{op}: reduction must be one of {allowed}, got {reduction!r}")
    if labels is None:
        if alpha > 0:
            raise ValueError(f"{op}: alpha={alpha} mixes in cross-entropy on labels, but labels is None")
        if ignore_index is not None:
            raise ValueError(f"{op}: ignore_index={ignore_index} selects rows by their label, but labels is None")


def _flat_labels(op: str, labels: Optional[Tensor], lead: torch.Size, n: int, vocab: int, device, alpha: float,
                 ignore_index: Optional[int]) -> Optional[Tensor]:
    """labels as int64 [N], checked: shape = the logits' leading shape, and (when cross-entropy
    uses them) every counted label in [0, V)."""
    if labels is None:
        return None
    if not isinstance(labels, Tensor):
        raise TypeError(f"{op}: labels must be a Tensor or None, got {type(labels).__name__}")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(f"{op}: labels must be an integer tensor (class indices), got {labels.dtype}")
    if tuple(labels.shape) != tuple(lead) and not (labels.dim() == 1 and labels.numel() == n):
        raise ValueError(f"{op}: labels must have the logits' leading shape {tuple(lead)}, got {tuple(labels.shape)}")
    if labels.device != device:
        raise ValueError(f"{op}: labels are on {labels.device}, the logits on {device}")
    flat = labels.reshape(n).long()
    if alpha > 0 and n > 0:
        bad = (flat < 0) | (flat >= vocab)
        if ignore_index is not None:
            bad &= flat != ignore_index
        if device.type == "cpu" and not torch.compiler.is_compiling():
            if bool(bad.any()):
                i = int(bad.nonzero()[0, 0])
                raise ValueError(f"{op}: labels must be in [0, {vocab}) (the vocabulary) or ignore_index="
                                 f"{ignore_index}, got {int(flat[i])} at row {i}")
        else:  # no device sync: an asynchronous device-side assertion
            torch._assert_async(~bad.any(), f"{op}: labels must be in [0, vocabulary) or ignore_index")
    return flat


def _needs_grad(t: Tensor) -> bool:
    return torch.is_grad_enabled() and t.requires_grad


def kd_loss(student_logits: Tensor, teacher_logits: Tensor, *, temperature: float = 1.0,
            reduction: str = "batchmean", ignore_index: Optional[int] = None, labels: Optional[Tensor] = None,
            alpha: float = 0.0) -> Tensor:
    """Knowledge-distillation loss ``T² · KL(softmax(teacher/T) ‖ softmax(student/T))``.

    Args:
        student_logits, teacher_logits: ``(N, V)`` or ``(B, T, V)`` (any leading shape; every leading
            position is a row), float32 / bfloat16 / float16 (float64 runs the reference).
        temperature: softens both distributions (> 0); the KL term is multiplied by ``T²`` so its
            gradient keeps its scale (Hinton et al.).
        reduction: ``"batchmean"`` (sum over rows / rows that count), ``"sum"`` or ``"none"``
            (per-row losses, shaped like the leading dimensions). ``"mean"`` is rejected (see
            :mod:`bigkernels.reference.distill`). Unlike ``F.kl_div``, ``batchmean`` divides by every
            counted row, B·T for ``(B, T, V)``, not by B.
        ignore_index: rows whose label equals it do not count: loss 0, no gradient (needs ``labels``).
        labels: class indices with the logits' leading shape, for ``ignore_index`` and for ``alpha``.
        alpha: the result is ``(1 − alpha)·KD + alpha·CE``, CE the cross-entropy of the raw student
            logits (T = 1) on ``labels``, averaged the same way.

    Returns the loss in the student's dtype (computed in fp32). Gradients flow to both logits
    (the teacher's only when it requires grad); they are computed during this call in one fused
    pass over the vocabulary (no probability tensor is stored), and ``backward()`` scales them.
    """
    op = "kd_loss"
    _check_tensor(op, "student_logits", student_logits)
    _check_tensor(op, "teacher_logits", teacher_logits)
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"{op}: teacher_logits {tuple(teacher_logits.shape)} must have the shape of student_logits "
                         f"{tuple(student_logits.shape)}")
    if student_logits.dim() < 1 or student_logits.shape[-1] == 0:
        raise ValueError(f"{op}: logits need a non-empty last (vocabulary) dimension, got shape "
                         f"{tuple(student_logits.shape)}")
    if teacher_logits.device != student_logits.device:
        raise ValueError(f"{op}: teacher_logits are on {teacher_logits.device}, student_logits on "
                         f"{student_logits.device}")
    check_options(op, temperature, alpha, ignore_index, reduction, labels)
    vocab = student_logits.shape[-1]
    lead = student_logits.shape[:-1]
    n = math.prod(lead)
    flat = _flat_labels(op, labels, lead, n, vocab, student_logits.device, alpha, ignore_index)
    s, t = student_logits.reshape(n, vocab), teacher_logits.reshape(n, vocab)
    loss, _, _ = torch.ops.bigkernels.kd_loss(s, t, flat, float(temperature), float(alpha), ignore_index, reduction,
                                              _needs_grad(student_logits), _needs_grad(teacher_logits))
    return loss.reshape(lead) if reduction == "none" else loss


def fused_linear_kd_loss(student_hidden: Tensor, student_head_weight: Tensor, teacher_hidden: Tensor,
                         teacher_head_weight: Tensor, *, temperature: float = 1.0, labels: Optional[Tensor] = None,
                         ignore_index: Optional[int] = None, alpha: float = 0.0, reduction: str = "batchmean",
                         chunk_size: Optional[int] = None) -> Tensor:
    """:func:`kd_loss` on the logits ``student_hidden @ student_head_weight.T`` and
    ``teacher_hidden @ teacher_head_weight.T``, without ever holding the (tokens x V) logits.

    Args:
        student_hidden: ``(N, H)`` or ``(B, T, H)`` final hidden states of the student.
        student_head_weight: ``(V, H)``, the student's output projection (``lm_head.weight``; no bias).
        teacher_hidden: ``(N, Ht)`` or ``(B, T, Ht)``; ``teacher_head_weight``: ``(V, Ht)`` (the
            teacher may be wider than the student; the vocabulary must match).
        temperature, labels, ignore_index, alpha: as in :func:`kd_loss`.
        reduction: ``"batchmean"`` or ``"sum"`` (per-row losses would need per-row gradients, which
            the fused backward does not keep).
        chunk_size: tokens per chunk (default: about N / ceil(V / H), and at least ~8M logits per
            chunk; see ``bigkernels.ops.distill.default_chunk_rows``).

    Tokens are processed ``chunk_size`` at a time: both logit blocks, the fused loss kernel, then
    the gradients of the hidden states and head weights (accumulated in fp32) — all during this
    call. Gradients go to every argument that requires grad: the student's hidden states and head
    weight, and the teacher's only if they require grad (a frozen teacher costs nothing extra).
    """
    op = "fused_linear_kd_loss"
    names = ("student_hidden", "student_head_weight", "teacher_hidden", "teacher_head_weight")
    args = (student_hidden, student_head_weight, teacher_hidden, teacher_head_weight)
    for name, t in zip(names, args):
        _check_tensor(op, name, t)
        if t.device != student_hidden.device:
            raise ValueError(f"{op}: {name} is on {t.device}, student_hidden on {student_hidden.device}")
    for name, w in zip(names[1::2], args[1::2]):
        if w.dim() != 2:
            raise ValueError(f"{op}: {name} must be 2-D (V, H), got shape {tuple(w.shape)}")
    hs, ws, ht, wt = args
    if ws.shape[0] != wt.shape[0] or ws.shape[0] == 0:
        raise ValueError(f"{op}: the head weights must share a non-empty vocabulary, got student {tuple(ws.shape)} "
                         f"and teacher {tuple(wt.shape)}")
    for name, h, w in (("student", hs, ws), ("teacher", ht, wt)):
        if h.dim() < 1 or h.shape[-1] != w.shape[1]:
            raise ValueError(f"{op}: {name}_hidden {tuple(h.shape)} must end in {w.shape[1]} features (the "
                             f"{name}_head_weight's H)")
        if h.dtype != w.dtype:
            raise TypeError(f"{op}: {name}_hidden is {h.dtype} but {name}_head_weight is {w.dtype}")
    if hs.shape[:-1] != ht.shape[:-1]:
        raise ValueError(f"{op}: teacher_hidden {tuple(ht.shape)} and student_hidden {tuple(hs.shape)} must have the "
                         f"same tokens (leading shape)")
    check_options(op, temperature, alpha, ignore_index, reduction, labels, allowed=("batchmean", "sum"))
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, numbers.Integral)
                                   or chunk_size <= 0):
        raise ValueError(f"{op}: chunk_size must be a positive int or None, got {chunk_size!r}")
    lead = hs.shape[:-1]
    n = math.prod(lead)
    flat = _flat_labels(op, labels, lead, n, ws.shape[0], hs.device, alpha, ignore_index)
    loss, *_ = torch.ops.bigkernels.fused_linear_kd_loss(
        hs.reshape(n, hs.shape[-1]), ws, ht.reshape(n, ht.shape[-1]), wt, flat, float(temperature), float(alpha),
        ignore_index, reduction, int(chunk_size or 0), *(_needs_grad(t) for t in args))
    return loss
