"""Pure-PyTorch references of the knowledge-distillation losses.

The definition (``kd_loss``; what every kernel is tested against, value and gradient)
------------------------------------------------------------------------------------
Logits ``student`` and ``teacher`` of shape ``(..., V)``; every leading position is a *row*
(``(B, T, V)`` has ``B * T`` rows). Per row, with temperature ``T``::

    kd_row = T² · KL(softmax(teacher / T) ‖ softmax(student / T))
           = T² · Σ_j p_t[j] · (log p_t[j] − log p_s[j])
    ce_row = logsumexp(student) − student[label]          (raw student logits, T = 1)
    row    = (1 − alpha) · kd_row + alpha · ce_row        (alpha > 0 needs labels)

Rows whose label equals ``ignore_index`` (only when both ``labels`` and ``ignore_index`` are
given) do not count: their loss is 0 and they get no gradient. Reductions:

``"batchmean"`` (default) Σ rows / (number of rows that count) — note that ``F.kl_div``'s
    ``batchmean`` divides by the first dimension only, which for ``(B, T, V)`` logits is B;
``"sum"``   Σ rows;
``"none"``  the rows, shaped like the leading dimensions (ignored rows are 0).

``"mean"`` is not accepted: ``F.kl_div``'s ``"mean"`` averages over rows *and* vocabulary entries
(PyTorch documents that it will become ``"batchmean"``); callers are told to pick one explicitly.

The kernel op (``kd_loss_fwd``; the fused forward + backward that the CPU C++ and Triton kernels implement)
---------------------------------------------------------------------------------------------------------
``kd_loss_fwd(student [N, V], teacher [N, V], labels [N] | None, grad_scale (0-d fp32),
temperature, alpha, ignore_index | None, grad_student, grad_teacher) -> (loss_rows, grad_s, grad_t)``

``loss_rows``: fp32 ``[N]``, the ``row`` above (0 for ignored rows).
``grad_s``: ``grad_scale · d row / d student`` in the student's dtype (``[0]`` when not asked):
    ``grad_scale · ((1 − alpha) · T · (p_s − p_t) + alpha · (softmax(student) − onehot(label)))``.
``grad_t``: ``grad_scale · d row / d teacher`` in the teacher's dtype (``[0]`` when not asked):
    ``grad_scale · (1 − alpha) · T · p_t · (log p_t − log p_s − KL_row)``.
Ignored rows get zero gradient rows. All maths in fp32 whatever the storage dtype.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

REDUCTIONS = ("batchmean", "sum", "none")


def kd_loss(student: Tensor, teacher: Tensor, labels: Optional[Tensor] = None, temperature: float = 1.0,
            ignore_index: Optional[int] = None, alpha: float = 0.0, reduction: str = "batchmean") -> Tensor:
    """The pure-torch definition, differentiable by autograd, computed in the inputs' dtype."""
    V = student.shape[-1]
    lead = student.shape[:-1]
    s, t = student.reshape(-1, V), teacher.reshape(-1, V)
    T = float(temperature)
    kd = F.kl_div(F.log_softmax(s / T, dim=-1), F.log_softmax(t / T, dim=-1), log_target=True,
                  reduction="none").sum(-1) * (T * T)
    rows = kd
    keep = None
    if labels is not None:
        lab = labels.reshape(-1)
        if ignore_index is not None:
            keep = lab != ignore_index
        if alpha != 0.0:
            safe = lab if keep is None else torch.where(keep, lab, torch.zeros_like(lab))
            ce = torch.logsumexp(s, dim=-1) - s.gather(1, safe.long().unsqueeze(1)).squeeze(1)
            rows = (1.0 - alpha) * kd + alpha * ce
    if keep is not None:
        rows = torch.where(keep, rows, torch.zeros_like(rows))
    if reduction == "none":
        return rows.reshape(lead)
    total = rows.sum()
    if reduction == "sum":
        return total
    count = keep.sum() if keep is not None else rows.shape[0]
    return total / count


def fused_linear_kd_loss(student_hidden: Tensor, student_head_weight: Tensor, teacher_hidden: Tensor,
                         teacher_head_weight: Tensor, labels: Optional[Tensor] = None, temperature: float = 1.0,
                         ignore_index: Optional[int] = None, alpha: float = 0.0,
                         reduction: str = "batchmean") -> Tensor:
    """``kd_loss`` on the logits ``hidden @ weight.T`` (materialised: the reference)."""
    return kd_loss(student_hidden @ student_head_weight.T, teacher_hidden @ teacher_head_weight.T, labels,
                   temperature, ignore_index, alpha, reduction)


def kd_loss_fwd(student: Tensor, teacher: Tensor, labels: Optional[Tensor], grad_scale: Tensor, temperature: float,
                alpha: float, ignore_index: Optional[int], grad_student: bool,
                grad_teacher: bool) -> Tuple[Tensor, Tensor, Tensor]:
    """Per-row losses and the scaled gradients, by the explicit formulas (fp32 maths)."""
    N, V = student.shape
    T = float(temperature)
    s, t = student.float(), teacher.float()
    log_ps = torch.log_softmax(s / T, dim=-1)
    log_pt = torch.log_softmax(t / T, dim=-1)
    p_s, p_t = log_ps.exp(), log_pt.exp()
    kl = (p_t * (log_pt - log_ps)).sum(-1)
    rows = (T * T) * kl
    keep = torch.ones(N, dtype=torch.bool, device=student.device)
    onehot = None
    if labels is not None:
        lab = labels.long()
        if ignore_index is not None:
            keep = lab != ignore_index
        if alpha != 0.0:
            safe = torch.where(keep, lab, torch.zeros_like(lab))
            lse1 = torch.logsumexp(s, dim=-1)
            ce = lse1 - s.gather(1, safe.unsqueeze(1)).squeeze(1)
            rows = (1.0 - alpha) * rows + alpha * ce
            onehot = torch.zeros_like(s).scatter_(1, safe.unsqueeze(1), 1.0)
            p1 = (s - lse1.unsqueeze(1)).exp()
    rows = torch.where(keep, rows, torch.zeros_like(rows))
    scale = grad_scale.float().to(student.device)
    k = keep.unsqueeze(1)
    empty = student.new_empty((0,))
    gs, gt = empty, teacher.new_empty((0,))
    if grad_student:
        g = (1.0 - alpha) * T * (p_s - p_t)
        if onehot is not None:
            g = g + alpha * (p1 - onehot)
        gs = torch.where(k, g * scale, torch.zeros_like(g)).to(student.dtype)
    if grad_teacher:
        g = (1.0 - alpha) * T * p_t * (log_pt - log_ps - kl.unsqueeze(1))
        gt = torch.where(k, g * scale, torch.zeros_like(g)).to(teacher.dtype)
    return rows, gs, gt
