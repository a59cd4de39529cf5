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

Autotuned on a GPU over BLOCK_V / warps per vocabulary size (``_common.autotune``: configs that
cannot fit the device's shared memory are pruned); under ``TRITON_INTERPRET=1`` one small fixed
BLOCK_V so that tiny test rows span several chunks and a partial one. Launched through
``_common.launcher`` (the tensors' device and stream). ``aot_cases()`` lists what the ahead-of-time
compile test (tests/test_triton_aot.py) builds for sm_80 / sm_90.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import triton_op

from bigkernels.triton._common import _INTERPRET, _check_runnable, _dummy, autotune, launcher

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


def _kd_smem(config, named_args, kwargs) -> int:
    """Shared memory of a config (bytes), an upper bound: the kernel has no tiles in shared memory,
    only the cross-warp reductions' scratch (one fp32 per warp; Triton 3.8 allocates 4 bytes per
    warp in all), counted here for four reductions in flight."""
    return 16 * config.num_warps


_kd_tuned = autotune(CONFIGS, key=["V", "GRAD_S", "GRAD_T", "CE_SEP"], estimate=_kd_smem)(_kd_loss_fwd_kernel)


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
        launcher(_kd_loss_fwd_kernel)[(n,)](*args, **flags, BLOCK_V=_INTERPRET_BLOCK_V, num_warps=4)
    else:
        launcher(_kd_tuned)[(n,)](*args, **flags)
    return loss, gs, gt


def aot_cases():
    """The AOT compile cases of this module's kernel (convention: bigkernels/triton/_common.py).

    Every autotune config the pruner keeps, per logits dtype (fp32 / bf16 / fp16; mixed
    student/teacher dtypes compile the same code), with every feature on (labels, ignore_index,
    cross-entropy at T != 1, both gradients: the most live registers); the usual training call
    (ignore_index, student gradient only) and the loss alone compile once per target and dtype
    with the widest config. Pointers, V and the row strides are 16-divisible (what the JIT
    specialises to for vocabularies such as 32,000 or 128,256; other V compile the same code with
    scalar accesses): then the logits are read in 16-byte vectors in both passes (student and
    teacher, twice) and the gradients written in 16-byte vectors (``vector_bytes=16``)."""
    import dataclasses

    from bigkernels.triton._common import AOT_TARGETS, tuned_cases

    everything = dict(HAS_LABELS=True, HAS_IGNORE=True, CE=True, CE_SEP=True, GRAD_S=True, GRAD_T=True)
    training = dict(HAS_LABELS=True, HAS_IGNORE=True, CE=False, CE_SEP=False, GRAD_S=True, GRAD_T=False)
    loss_only = dict(HAS_LABELS=False, HAS_IGNORE=False, CE=False, CE_SEP=False, GRAD_S=False, GRAD_T=False)
    aligned = ("s_ptr", "t_ptr", "labels_ptr", "scale_ptr", "loss_ptr", "gs_ptr", "gt_ptr", "V", "stride_s",
               "stride_t")

    def vectors(case, size: int, streams: int) -> int:
        """16-byte accesses of ``streams`` passes over a row chunk of BLOCK_V elements."""
        per_thread = case.constexprs["BLOCK_V"] // (32 * case.num_warps)
        return streams * max(1, per_thread * size // 16)

    cases = []
    for dt, size in (("fp32", 4), ("bf16", 2), ("fp16", 2)):
        sig = dict(s_ptr=f"*{dt}", t_ptr=f"*{dt}", labels_ptr="*i64", scale_ptr="*fp32", loss_ptr="*fp32",
                   gs_ptr=f"*{dt}", gt_ptr=f"*{dt}", V="i32", stride_s="i64", stride_t="i64", temperature="fp32",
                   inv_t="fp32", alpha="fp32", ignore_index="i64")
        tuned = tuned_cases(_kd_tuned, sig, everything, f"kd_loss/{dt}", aligned=aligned, vector_bytes=16)
        # loads: student and teacher in both passes; stores: both gradients (pass 2, and the zeros of
        # ignored rows)
        cases += [dataclasses.replace(c, vector_loads=vectors(c, size, 4), vector_stores=vectors(c, size, 4))
                  for c in tuned]
        for arch in AOT_TARGETS:
            widest = max((c for c in tuned if c.arch == arch), key=lambda c: c.constexprs["BLOCK_V"])
            for flags, loads, stores, note in ((training, 4, 2, "training call"), (loss_only, 2, 0, "loss only")):
                c = dataclasses.replace(widest, constexprs=dict(widest.constexprs, **flags), note=note)
                cases.append(dataclasses.replace(c, vector_loads=vectors(c, size, loads),
                                                 vector_stores=vectors(c, size, stores)))
    return cases
