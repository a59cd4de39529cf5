"""Knowledge-distillation ops: schemas, fake implementations, autograd and the choice of kernel.
Definitions: ``bigkernels/reference/distill.py``.

Kernel op (CPU C++ / Triton / reference; no autograd):
``kd_loss_fwd(student [N, V], teacher [N, V], labels [N]?, grad_scale (0-d fp32), temperature, alpha,
ignore_index?, grad_student, grad_teacher) -> (loss_rows fp32 [N], grad_student, grad_teacher)``
    One fused pass per row over the vocabulary: the per-row loss and, when asked, the gradients
    already multiplied by ``grad_scale`` (the batchmean divisor), written once. No [N, V]
    probability tensor is ever made.

Differentiable ops (what ``bigkernels.nn.functional`` calls):
``kd_loss(student [N, V], teacher [N, V], labels?, temperature, alpha, ignore_index?, reduction,
grad_student, grad_teacher) -> (loss, grad_student, grad_teacher)``
    The loss (``reduction`` "batchmean" | "sum" | "none") and the gradients computed in the
    forward; the backward only scales them by the incoming gradient (returned as they are when
    that is exactly 1, checked in eager mode). The gradient outputs are not differentiable:
    callers use the loss.
``fused_linear_kd_loss(student_hidden [N, H], student_weight [V, H], teacher_hidden [N, Ht],
teacher_weight [V, Ht], labels?, temperature, alpha, ignore_index?, reduction, chunk_rows,
needs: bool x4) -> (loss, d student_hidden, d student_weight, d teacher_hidden, d teacher_weight)``
    The same loss on ``hidden @ weight.T``, chunk by chunk of ``chunk_rows`` tokens: per chunk the
    two logit blocks, ``kd_loss_fwd`` on them, and the products that turn the logit gradients into
    hidden and weight gradients; the (N x V) logits never exist at once. ``reduction``:
    "batchmean" | "sum". Gradients go to every input that needs one (``needs``), the teacher's
    included (usually frozen: then nothing is computed for it).
"""
from __future__ import annotations

from typing import List, Optional

import torch
from torch import Tensor

from bigkernels.ops import _registry
from bigkernels.reference import distill as ref

KD_FWD_SCHEMA = ("(Tensor student, Tensor teacher, Tensor? labels, Tensor grad_scale, float temperature, "
                 "float alpha, int? ignore_index, bool grad_student, bool grad_teacher) -> (Tensor, Tensor, Tensor)")
KD_SCHEMA = ("(Tensor student, Tensor teacher, Tensor? labels, float temperature, float alpha, int? ignore_index, "
             "str reduction, bool grad_student, bool grad_teacher) -> (Tensor, Tensor, Tensor)")
FUSED_LINEAR_SCHEMA = ("(Tensor student_hidden, Tensor student_weight, Tensor teacher_hidden, Tensor teacher_weight, "
                       "Tensor? labels, float temperature, float alpha, int? ignore_index, str reduction, "
                       "int chunk_rows, bool grad_student_hidden, bool grad_student_weight, bool grad_teacher_hidden, "
                       "bool grad_teacher_weight) -> (Tensor, Tensor, Tensor, Tensor, Tensor)")
NS = _registry.NAMESPACE


# ----- shared checks (torch._check: they also run on fake tensors) -------------------------------
def _check_logits(op: str, student: Tensor, teacher: Tensor, labels: Optional[Tensor]) -> None:
    torch._check(student.dim() == 2, lambda: f"{op}: expected 2-D student logits [N, V], got {student.dim()}-D")
    torch._check(teacher.shape == student.shape,
                 lambda: f"{op}: teacher logits {tuple(teacher.shape)} must match student {tuple(student.shape)}")
    if labels is not None:
        torch._check(labels.dim() == 1 and labels.shape[0] == student.shape[0],
                     lambda: f"{op}: expected labels of shape ({student.shape[0]},), got {tuple(labels.shape)}")


def _kd_fwd_fake(student, teacher, labels, grad_scale, temperature, alpha, ignore_index, grad_student, grad_teacher):
    _check_logits("kd_loss_fwd", student, teacher, labels)
    rows = student.new_empty((student.shape[0],), dtype=torch.float32)
    gs = student.new_empty(student.shape if grad_student else (0,))
    gt = teacher.new_empty(teacher.shape if grad_teacher else (0,))
    return rows, gs, gt


_registry.register(_registry.OpInfo("kd_loss_fwd", KD_FWD_SCHEMA, ref.kd_loss_fwd, triton_name="kd_loss_fwd_triton",
                                    preference={"cpu": ("cpu-c++", "reference"), "cuda": ("triton", "reference")}))
torch.library.define(f"{NS}::kd_loss_fwd", KD_FWD_SCHEMA)
torch.library.register_fake(f"{NS}::kd_loss_fwd")(_kd_fwd_fake)
torch.library.impl(f"{NS}::kd_loss_fwd", "CompositeExplicitAutograd")(ref.kd_loss_fwd)


KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def kd_loss_fwd(student, teacher, labels, grad_scale, temperature, alpha, ignore_index, grad_student, grad_teacher):
    """The kernel op on the backend chosen for the device (the reference for float64)."""
    backend = _registry.choose("kd_loss_fwd", student.device.type)
    if student.dtype not in KERNEL_DTYPES or teacher.dtype not in KERNEL_DTYPES:
        backend = "reference"
    return _registry.call_backend("kd_loss_fwd", backend, student, teacher, labels, grad_scale, temperature, alpha,
                                  ignore_index, grad_student, grad_teacher)


# ----- reductions ---------------------------------------------------------------------------------
def _counted(labels: Optional[Tensor], ignore_index: Optional[int], n: int, device) -> Tensor:
    """Rows that count (fp32, 0-d): those whose label is not ignore_index."""
    if labels is None or ignore_index is None:
        return torch.full((), float(n), dtype=torch.float32, device=device)
    return (labels != ignore_index).sum().to(torch.float32)


def _grad_scale(reduction: str, count: Tensor) -> Tensor:
    return count.reciprocal() if reduction == "batchmean" else torch.ones_like(count)


def _reduce(rows: Tensor, reduction: str, count: Tensor, dtype: torch.dtype) -> Tensor:
    if reduction == "none":
        return rows.to(dtype)
    total = rows.sum()
    return (total if reduction == "sum" else total / count).to(dtype)


# ----- kd_loss (differentiable) ---------------------------------------------------------------------
def _kd_fake(student, teacher, labels, temperature, alpha, ignore_index, reduction, grad_student, grad_teacher):
    _check_logits("kd_loss", student, teacher, labels)
    loss = student.new_empty((student.shape[0],) if reduction == "none" else ())
    gs = student.new_empty(student.shape if grad_student else (0,))
    gt = teacher.new_empty(teacher.shape if grad_teacher else (0,))
    return loss, gs, gt


def _kd_impl(student, teacher, labels, temperature, alpha, ignore_index, reduction, grad_student, grad_teacher):
    count = _counted(labels, ignore_index, student.shape[0], student.device)
    rows, gs, gt = kd_loss_fwd(student, teacher, labels, _grad_scale(reduction, count), temperature, alpha,
                               ignore_index, grad_student, grad_teacher)
    return _reduce(rows, reduction, count, student.dtype), gs, gt


def _concrete_one(t: Tensor) -> bool:
    """t is a real scalar equal to 1 — checked in eager mode only (never while tracing or during
    CUDA graph capture). On a GPU this reads one value (a device sync per backward, as Liger-Kernel
    does): multiplying a (tokens x V) gradient by 1 would cost a pass and a second copy of it."""
    if type(t) is not torch.Tensor or t.numel() != 1 or torch.compiler.is_compiling():
        return False
    if t.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return False
    return t.item() == 1.0


def _scaled(saved: Tensor, grad: Optional[Tensor], dtype: torch.dtype) -> Optional[Tensor]:
    """saved * grad (grad a scalar, or one value per row of saved); saved itself when grad is 1."""
    if grad is None:
        return None
    if grad.dim() == 1:
        grad = grad.reshape(-1, *([1] * (saved.dim() - 1)))
    if _concrete_one(grad) and saved.dtype == dtype:
        return saved
    return (saved * grad).to(dtype)


def _setup_saved_grads(first_grad: int):
    """setup_context for ops whose outputs [first_grad:] are gradients computed in the forward."""

    def setup_context(ctx, inputs, output):
        ctx.set_materialize_grads(False)  # the unused gradient outputs get no zero-filled gradients
        ctx.mark_non_differentiable(*output[first_grad:])
        ctx.save_for_backward(*output[first_grad:])
        ctx.dtypes = [t.dtype if isinstance(t, Tensor) else None for t in inputs]

    return setup_context


def _kd_backward(ctx, grad_loss, _gs, _gt):
    gs, gt = ctx.saved_tensors
    return (_scaled(gs, grad_loss, ctx.dtypes[0]) if ctx.needs_input_grad[0] else None,
            _scaled(gt, grad_loss, ctx.dtypes[1]) if ctx.needs_input_grad[1] else None,
            None, None, None, None, None, None, None)


torch.library.define(f"{NS}::kd_loss", KD_SCHEMA)
torch.library.register_fake(f"{NS}::kd_loss")(_kd_fake)
torch.library.impl(f"{NS}::kd_loss", "CompositeExplicitAutograd")(_kd_impl)
torch.library.register_autograd(f"{NS}::kd_loss", _kd_backward, setup_context=_setup_saved_grads(1))


# ----- fused_linear_kd_loss (differentiable) ----------------------------------------------------------
CHUNK_MIN_LOGITS = 1 << 23  # 32 MB of fp32 logits per chunk at least


def default_chunk_rows(n: int, hidden: int, vocab: int) -> int:
    """Tokens per chunk: about as many logits per chunk as the hidden states hold in all
    (Liger-Kernel's rule: N / ceil(V / H), to a power of two), but at least ~8M logits per chunk
    (the largest power of two of rows under CHUNK_MIN_LOGITS / V): smaller chunks make the
    products thin GEMMs and re-read the (V x H) fp32 weight-gradient accumulator once per chunk —
    on the CPU at 4,096 x 32K x H = 256, 64-row chunks took 10.1 s, 256-row ones 6.2 s, one
    4,096-row chunk 8.3 s (single thread, CPU time). Never more than N."""
    per = max(1, -(-vocab // max(1, hidden)))
    liger = 1 << max(0, (-(-n // per) - 1).bit_length())
    floor_rows = 1 << max(0, (max(1, CHUNK_MIN_LOGITS // max(1, vocab))).bit_length() - 1)
    return max(1, min(n, max(liger, floor_rows)))


def _fused_check(hs, ws, ht, wt, labels):
    torch._check(hs.dim() == 2 and ws.dim() == 2 and ht.dim() == 2 and wt.dim() == 2,
                 lambda: "fused_linear_kd_loss: expected 2-D hidden states [N, H] and head weights [V, H]")
    torch._check(hs.shape[1] == ws.shape[1],
                 lambda: f"fused_linear_kd_loss: student_hidden has {hs.shape[1]} features, student_head_weight "
                         f"{tuple(ws.shape)} expects {ws.shape[1]}")
    torch._check(ht.shape[1] == wt.shape[1],
                 lambda: f"fused_linear_kd_loss: teacher_hidden has {ht.shape[1]} features, teacher_head_weight "
                         f"{tuple(wt.shape)} expects {wt.shape[1]}")
    torch._check(ht.shape[0] == hs.shape[0] and wt.shape[0] == ws.shape[0],
                 lambda: f"fused_linear_kd_loss: teacher ({ht.shape[0]} tokens, vocabulary {wt.shape[0]}) must match "
                         f"student ({hs.shape[0]} tokens, vocabulary {ws.shape[0]})")
    if labels is not None:
        torch._check(labels.dim() == 1 and labels.shape[0] == hs.shape[0],
                     lambda: f"fused_linear_kd_loss: expected labels of shape ({hs.shape[0]},), "
                             f"got {tuple(labels.shape)}")


def _fused_fake(hs, ws, ht, wt, labels, temperature, alpha, ignore_index, reduction, chunk_rows, g_hs, g_ws, g_ht,
                g_wt):
    _fused_check(hs, ws, ht, wt, labels)
    return (hs.new_empty(()),) + tuple(t.new_empty(t.shape if need else (0,))
                                       for t, need in ((hs, g_hs), (ws, g_ws), (ht, g_ht), (wt, g_wt)))


def _accumulate_weight_grad(acc: Tensor, g: Tensor, h: Tensor) -> None:
    """acc (fp32) += g.T @ h: in fp32 for 16-bit inputs so chunk sums do not round at every chunk."""
    if g.dtype == torch.float32:
        acc.addmm_(g.T, h)
    elif acc.device.type == "cuda":
        acc.add_(torch.mm(g.T, h, out_dtype=torch.float32))
    else:
        acc.addmm_(g.T.float(), h.float())


def _fused_impl(hs, ws, ht, wt, labels, temperature, alpha, ignore_index, reduction, chunk_rows, g_hs, g_ws, g_ht,
                g_wt):
    n = hs.shape[0]
    count = _counted(labels, ignore_index, n, hs.device)
    scale = _grad_scale(reduction, count)
    chunk = chunk_rows if chunk_rows > 0 else default_chunk_rows(n, hs.shape[1], ws.shape[0])
    rows = hs.new_empty((n,), dtype=torch.float32)
    grads: List[Tensor] = [
        hs.new_empty(hs.shape if g_hs else (0,)),
        torch.zeros(ws.shape, dtype=torch.float32, device=ws.device) if g_ws else ws.new_empty((0,)),
        ht.new_empty(ht.shape if g_ht else (0,)),
        torch.zeros(wt.shape, dtype=torch.float32, device=wt.device) if g_wt else wt.new_empty((0,)),
    ]
    need_s, need_t = g_hs or g_ws, g_ht or g_wt
    for c0 in range(0, n, chunk):
        c1 = min(n, c0 + chunk)
        h_s, h_t = hs[c0:c1], ht[c0:c1]
        logits_s, logits_t = h_s @ ws.T, h_t @ wt.T
        r, d_s, d_t = kd_loss_fwd(logits_s, logits_t, None if labels is None else labels[c0:c1], scale, temperature,
                                  alpha, ignore_index, need_s, need_t)
        del logits_s, logits_t
        rows[c0:c1] = r
        for d, h, w, gh, gw in ((d_s, h_s, ws, g_hs, g_ws), (d_t, h_t, wt, g_ht, g_wt)):
            if gh:
                torch.mm(d.to(w.dtype), w, out=grads[0 if w is ws else 2][c0:c1])
            if gw:
                _accumulate_weight_grad(grads[1 if w is ws else 3], d.to(h.dtype), h)
    for i, w in ((1, ws), (3, wt)):
        grads[i] = grads[i].to(w.dtype)
    return (_reduce(rows, reduction, count, hs.dtype), *grads)


def _fused_backward(ctx, grad_loss, *_unused):
    saved = ctx.saved_tensors
    out = [_scaled(g, grad_loss, ctx.dtypes[i]) if ctx.needs_input_grad[i] else None for i, g in enumerate(saved)]
    return (*out, None, None, None, None, None, None, None, None, None, None)


torch.library.define(f"{NS}::fused_linear_kd_loss", FUSED_LINEAR_SCHEMA)
torch.library.register_fake(f"{NS}::fused_linear_kd_loss")(_fused_fake)
torch.library.impl(f"{NS}::fused_linear_kd_loss", "CompositeExplicitAutograd")(_fused_impl)
torch.library.register_autograd(f"{NS}::fused_linear_kd_loss", _fused_backward, setup_context=_setup_saved_grads(1))
