"""Triton kernel of the distillation loss, registered with ``torch.library.triton_op``.

Op (``bigkernels`` namespace; same schema and semantics as ``kd_loss_fwd`` of
``bigkernels.ops.distill``, definitions in ``bigkernels.reference.distill``):

``kd_loss_fwd_triton(student, teacher, labels, grad_scale, temperature, alpha, ignore_index,
grad_student, grad_teacher) -> (loss_rows fp32 [N], grad_student, grad_teacher)``
    One program per row walks the vocabulary in ``BLOCK_V`` chunks twice. Pass 1 keeps online
    softmax statistics (running max and rescaled sum) of the student and the teacher at
    temperature T, the running ``Σ e^(t/T − m_t)·((t/T − m_t) − (s/T − m_s))`` for the KL term
    (rescaled and shifted when a maximum moves) and, for
    cross-entropy at T != 1, the student's statistics at T = 1; it writes the row's loss. Pass 2
    (only when a gradient is asked) recomputes the probabilities chunk by chunk from the final
    statistics and writes each gradient once, in its tensor's dtype. Nothing of size V is kept
    between the passes (a row of 128K logits does not fit on chip): the logits are read twice, the
    gradients written once — no probability tensor in memory. All maths in fp32.

Labels are clamped into [0, V) before the student's label logit is read, so a bad label never
reads out of bounds; ``bigkernels.nn.functional`` asserts their range (asynchronously on a GPU),
and this op checks it on CPU tensors (interpreter).

Autotuned on a GPU over BLOCK_V / warps per vocabulary size; under ``TRITON_INTERPRET=1`` one small
fixed BLOCK_V so that tiny test rows span several chunks and a partial one.
``AOT_CASES`` lists the (kernel, signature, constexprs) combinations the ahead-of-time compile
test builds for sm_80 / sm_90 (every autotune config x fp32 / bf16 / fp16 x the bounding flag
sets), each with its divisibility hints and compile options (``AotCase``).
"""
from __future__ import annotations

import itertools
from typing import List, Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import triton_op

from bigkernels.triton._common import _INTERPRET, _check_runnable, _dummy
from bigkernels.triton._common import _traced as _launch

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@triton.jit
def _kd_loss_fwd_kernel(s_ptr, t_ptr, labels_ptr, scale_ptr, loss_ptr, gs_ptr, gt_ptr,
                        V, stride_s, stride_t, temperature, inv_t, alpha, ignore_index,
                        HAS_LABELS: tl.constexpr, HAS_IGNORE: tl.constexpr, CE: tl.constexpr, CE_SEP: tl.constexpr,
                        GRAD_S: tl.constexpr, GRAD_T: tl.constexpr, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    s_row = s_ptr + row * stride_s
    t_row = t_ptr + row * stride_t
    offs = tl.arange(0, BLOCK_V)
    label = 0
    if HAS_LABELS:
        label = tl.load(labels_ptr + row)
    counted = True
    if HAS_IGNORE:
        counted = label != ignore_index
    if counted:
        # pass 1: online statistics
        m_s = float("-inf")
        l_s = 0.0
        m_t = float("-inf")
        l_t = 0.0
        acc = 0.0
        m_1 = float("-inf")
        l_1 = 0.0
        for start in range(0, V, BLOCK_V):
            cols = start + offs
            mask = cols < V
            s_raw = tl.load(s_row + cols, mask=mask, other=float("-inf")).to(tl.float32)
            x = s_raw * inv_t
            y = tl.load(t_row + cols, mask=mask, other=float("-inf")).to(tl.float32) * inv_t
            old_s = m_s
            new_s = tl.maximum(m_s, tl.max(x, axis=0))
            l_s = l_s * tl.exp(m_s - new_s) + tl.sum(tl.exp(x - new_s), axis=0)
            m_s = new_s
            new_t = tl.maximum(m_t, tl.max(y, axis=0))
            rescale = tl.exp(m_t - new_t)
            et = tl.exp(y - new_t)
            # acc = Σ e^(y − m_t)·((y − m_t) − (x − m_s)) over the chunks so far, at the current maxima
            # (differences of shifted values: no cancellation of large logits in the KL)
            shift = tl.where(l_t > 0, l_t * ((new_t - m_t) - (new_s - old_s)), 0.0)
            d = (y - new_t) - (x - new_s)
            acc = (acc - shift) * rescale + tl.sum(tl.where(et > 0, et * d, 0.0), axis=0)
            l_t = l_t * rescale + tl.sum(et, axis=0)
            m_t = new_t
            if CE_SEP:
                new_1 = tl.maximum(m_1, tl.max(s_raw, axis=0))
                l_1 = l_1 * tl.exp(m_1 - new_1) + tl.sum(tl.exp(s_raw - new_1), axis=0)
                m_1 = new_1
        lse_s = m_s + tl.log(l_s)
        lse_t = m_t + tl.log(l_t)
        kl = acc / l_t - tl.log(l_t) + tl.log(l_s)
        loss = (1.0 - alpha) * temperature * temperature * kl
        lse_1 = lse_s
        if CE:
            if CE_SEP:
                lse_1 = m_1 + tl.log(l_1)
            safe = tl.minimum(tl.maximum(label, 0), V - 1)
            loss += alpha * (lse_1 - tl.load(s_row + safe).to(tl.float32))
        tl.store(loss_ptr + row, loss)
        # pass 2: gradients, written once
        if GRAD_S or GRAD_T:
            scale = tl.load(scale_ptr)
            c = (1.0 - alpha) * temperature * scale
            for start in range(0, V, BLOCK_V):
                cols = start + offs
                mask = cols < V
                s_raw = tl.load(s_row + cols, mask=mask, other=0.0).to(tl.float32)
                x = s_raw * inv_t
                y = tl.load(t_row + cols, mask=mask, other=0.0).to(tl.float32) * inv_t
                log_ps = x - lse_s
                log_pt = y - lse_t
                p_t = tl.exp(log_pt)
                if GRAD_S:
                    g = c * (tl.exp(log_ps) - p_t)
                    if CE:
                        if CE_SEP:
                            p_1 = tl.exp(s_raw - lse_1)
                        else:
                            p_1 = tl.exp(log_ps)
                        g += alpha * scale * (p_1 - tl.where(cols == label, 1.0, 0.0))
                    tl.store(gs_ptr + row * V + cols, g.to(gs_ptr.dtype.element_ty), mask=mask)
                if GRAD_T:
                    g_t = tl.where(p_t > 0, c * p_t * (log_pt - log_ps - kl), 0.0)
                    tl.store(gt_ptr + row * V + cols, g_t.to(gt_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(loss_ptr + row, 0.0)
        if GRAD_S or GRAD_T:
            for start in range(0, V, BLOCK_V):
                cols = start + offs
                mask = cols < V
                if GRAD_S:
                    tl.store(gs_ptr + row * V + cols, tl.zeros((BLOCK_V,), gs_ptr.dtype.element_ty), mask=mask)
                if GRAD_T:
                    tl.store(gt_ptr + row * V + cols, tl.zeros((BLOCK_V,), gt_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------------
# Configs: chunks of 1K-8K logits; more warps for the wider chunks. Memory-bound (two reads of
# each logit, one write of each gradient): the wide chunks keep enough loads in flight.
# --------------------------------------------------------------------------------------------
CONFIGS = [triton.Config({"BLOCK_V": bv}, num_warps=w, num_stages=1)
           for bv, w in ((1024, 4), (2048, 4), (2048, 8), (4096, 8), (4096, 16), (8192, 16))]
_INTERPRET_BLOCK_V = 32
_kd_tuned = triton.autotune(configs=CONFIGS, key=["V", "GRAD_S", "GRAD_T", "CE_SEP"])(_kd_loss_fwd_kernel)

_TL_PTR = {torch.float32: "*fp32", torch.bfloat16: "*bf16", torch.float16: "*fp16"}


class AotCase(tuple):
    """One ahead-of-time compile case: unpacks as ``(kernel, signature, constexprs)``; ``attrs``
    (the divisibility-by-16 hints the JIT derives at run time for aligned pointers and sizes) and
    ``options`` (num_warps / num_stages of the autotune config) ride along.
    ``triton.compile(case.source(), target=GPUTarget("cuda", cc, 32), options=case.options)``."""

    def __new__(cls, kernel, signature: dict, constexprs: dict, attrs: dict, options: dict):
        self = super().__new__(cls, (kernel, signature, constexprs))
        self.attrs, self.options = attrs, options
        return self

    def source(self):
        from triton.compiler import ASTSource

        return ASTSource(self[0], self[1], self[2], self.attrs)


def _aot_cases() -> List[AotCase]:
    """Every autotune config x logits dtype, each with the flag sets that bound the kernel's
    variants: everything on (labels, ignore_index, cross-entropy at T != 1, both gradients: the
    most live registers), the usual training call (ignore_index, student gradient) and the loss
    alone; pointers, V and row strides divisible by 16 (what the JIT specialises to for vocabularies
    such as 32,000 or 128,256; other V compile the same code with scalar loads). Mixed
    student/teacher dtypes compile the same code."""
    flag_sets = [dict(HAS_LABELS=True, HAS_IGNORE=True, CE=True, CE_SEP=True, GRAD_S=True, GRAD_T=True),
                 dict(HAS_LABELS=True, HAS_IGNORE=True, CE=False, CE_SEP=False, GRAD_S=True, GRAD_T=False),
                 dict(HAS_LABELS=False, HAS_IGNORE=False, CE=False, CE_SEP=False, GRAD_S=False, GRAD_T=False)]
    names = _kd_loss_fwd_kernel.arg_names
    aligned = ("s_ptr", "t_ptr", "labels_ptr", "scale_ptr", "loss_ptr", "gs_ptr", "gt_ptr", "V", "stride_s", "stride_t")
    attrs = {(names.index(a),): [["tt.divisibility", 16]] for a in aligned}
    cases = []
    for cfg, dtype, flags in itertools.product(CONFIGS, _TL_PTR, flag_sets):
        ptr = _TL_PTR[dtype]
        sig = {"s_ptr": ptr, "t_ptr": ptr, "labels_ptr": "*i64", "scale_ptr": "*fp32", "loss_ptr": "*fp32",
               "gs_ptr": ptr, "gt_ptr": ptr, "V": "i32", "stride_s": "i64", "stride_t": "i64", "temperature": "fp32",
               "inv_t": "fp32", "alpha": "fp32", "ignore_index": "i64"}
        sig.update({k: "constexpr" for k in list(flags) + ["BLOCK_V"]})
        cases.append(AotCase(_kd_loss_fwd_kernel, sig, dict(flags, **cfg.kwargs), attrs,
                             dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages)))
    return cases


# Ahead-of-time compile cases of this module's kernels (see AotCase).
AOT_CASES = _aot_cases()


def _check(op: str, student: Tensor, teacher: Tensor, labels: Optional[Tensor], grad_scale: Tensor,
           temperature: float, alpha: float, ignore_index: Optional[int]) -> None:
    for name, t in (("student", student), ("teacher", teacher)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{op}: {name} must be a Tensor, got {type(t).__name__}")
        if t.dim() != 2:
            raise ValueError(f"{op}: {name} must be 2-D [N, V], got shape {tuple(t.shape)}")
        if t.dtype not in _FLOAT_DTYPES:
            raise ValueError(f"{op}: {name} must be float32, bfloat16 or float16, got {t.dtype}")
        if t.device != student.device:
            raise ValueError(f"{op}: {name} is on {t.device}, student on {student.device}")
    if teacher.shape != student.shape:
        raise ValueError(f"{op}: teacher {tuple(teacher.shape)} must match student {tuple(student.shape)}")
    if student.shape[1] == 0:
        raise ValueError(f"{op}: expected a non-empty vocabulary (V >= 1)")
    if not (temperature > 0 and temperature != float("inf")):
        raise ValueError(f"{op}: expected temperature > 0, got {temperature}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"{op}: expected alpha in [0, 1], got {alpha}")
    if alpha > 0 and labels is None:
        raise ValueError(f"{op}: alpha = {alpha} needs labels")
    if grad_scale.numel() != 1:
        raise ValueError(f"{op}: grad_scale must have one element, got shape {tuple(grad_scale.shape)}")
    if labels is not None:
        if labels.dtype != torch.int64 or labels.dim() != 1 or labels.shape[0] != student.shape[0]:
            raise ValueError(f"{op}: labels must be int64 of shape ({student.shape[0]},), got {labels.dtype} "
                             f"{tuple(labels.shape)}")
        if labels.device != student.device:
            raise ValueError(f"{op}: labels are on {labels.device}, student on {student.device}")
        if alpha > 0 and type(labels) is torch.Tensor and labels.device.type == "cpu":
            bad = (labels < 0) | (labels >= student.shape[1])
            if ignore_index is not None:
                bad &= labels != ignore_index
            if bool(bad.any()):
                raise ValueError(f"{op}: labels must be in [0, {student.shape[1]}) or ignore_index")


def _unit_stride_rows(x: Tensor) -> Tensor:
    return x if x.shape[1] <= 1 or x.stride(1) == 1 else x.contiguous()


@triton_op("bigkernels::kd_loss_fwd_triton", mutates_args=())
def kd_loss_fwd_triton(student: Tensor, teacher: Tensor, labels: Optional[Tensor], grad_scale: Tensor,
                       temperature: float, alpha: float, ignore_index: Optional[int], grad_student: bool,
                       grad_teacher: bool) -> Tuple[Tensor, Tensor, Tensor]:
    op = "kd_loss_fwd_triton"
    _check(op, student, teacher, labels, grad_scale, temperature, alpha, ignore_index)
    _check_runnable(op, student.device)
    student, teacher = _unit_stride_rows(student), _unit_stride_rows(teacher)
    n, vocab = student.shape
    dev = student.device
    loss = torch.empty((n,), dtype=torch.float32, device=dev)
    gs = torch.empty((n, vocab) if grad_student else (0,), dtype=student.dtype, device=dev)
    gt = torch.empty((n, vocab) if grad_teacher else (0,), dtype=teacher.dtype, device=dev)
    if n == 0:
        return loss, gs, gt
    scale = grad_scale.reshape(1).to(device=dev, dtype=torch.float32)
    ce = alpha > 0
    flags = dict(HAS_LABELS=labels is not None, HAS_IGNORE=labels is not None and ignore_index is not None, CE=ce,
                 CE_SEP=ce and float(temperature) != 1.0, GRAD_S=grad_student, GRAD_T=grad_teacher)
    args = (student, teacher, labels if labels is not None else _dummy(dev), scale, loss,
            gs if grad_student else _dummy(dev), gt if grad_teacher else _dummy(dev), vocab, student.stride(0),
            teacher.stride(0), float(temperature), 1.0 / float(temperature), float(alpha),
            int(ignore_index) if ignore_index is not None else 0)
    if _INTERPRET:
        _launch(_kd_loss_fwd_kernel)[(n,)](*args, **flags, BLOCK_V=_INTERPRET_BLOCK_V, num_warps=4)
    else:
        _launch(_kd_tuned)[(n,)](*args, **flags)
    return loss, gs, gt
