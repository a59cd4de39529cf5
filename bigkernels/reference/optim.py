"""Pure-PyTorch references of the fused optimizer ops.

These define the semantics every kernel (CPU C++, CUDA C++, Triton) must reproduce, and they
are the fallback implementation when no compiled kernel exists for a device (and the path for
float64 and non-contiguous parameters). They follow torch.optim's own fused kernels: maths in fp32
for 16-bit and fp32 parameters (in fp64 for fp64 ones), the step counters incremented in place,
and nothing changed at all when ``found_inf`` is non-zero.

They never read a tensor back to Python (no ``.item()``): bias corrections are computed from the
step tensors and ``found_inf`` selects between old and new values, so there is no device sync
and ``torch.compile`` traces them without a graph break.

Gradient multiplier, shared by every op (see :func:`grad_multiplier`):
``g_eff = g / grad_scale * clip`` where ``clip = min(1, max_grad_norm / (grad_norm / grad_scale + 1e-6))``
when ``grad_norm`` is given and ``max_grad_norm > 0`` (torch.nn.utils.clip_grad_norm_'s rule);
``grad_norm`` is the global L2 norm of the (still scaled) gradients.

Flat state (``fused_adam_flat_`` / ``fused_adamw_flat_``): the state of every param of the call
in one 1-D buffer per state name, param ``i`` at elements ``[offsets[i], offsets[i] + numel_i)``
with :func:`flat_offsets` (each piece starts on a 64-byte boundary), and the step counters in one
1-D fp32 tensor (``state_steps[i]`` is param ``i``'s). Same maths as the list form.

Pruning masks: ``masks`` (optional) holds one bool tensor per param, shaped like it. After the
update, every param element whose mask is False is set to exactly zero (a select, so even a
NaN update leaves a pruned weight at zero); optimizer states are updated as without masks. This
is what bigkernels.prune_'s post-step hook does for any optimizer, done inside the step.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor

CLIP_EPS = 1e-6  # torch.nn.utils.clip_grad_norm_ adds this to the norm
FLAT_ALIGN_BYTES = 64  # each param's piece of a flat state buffer starts on this boundary


def grad_multiplier(
    grad_scale: Optional[Tensor], grad_norm: Optional[Tensor], max_grad_norm: float
) -> Tensor | float:
    """The factor every gradient is multiplied by: unscaling and norm clipping in one number."""
    mult: Tensor | float = 1.0
    if grad_scale is not None:
        mult = 1.0 / grad_scale.double()
    if grad_norm is not None and max_grad_norm > 0:
        norm = grad_norm.double() * mult
        mult = mult * torch.clamp(max_grad_norm / (norm + CLIP_EPS), max=1.0)
    return mult


def _skip(found_inf: Optional[Tensor]) -> Optional[Tensor]:
    """A 0-d bool tensor, True when the step must change nothing (GradScaler found inf/NaN)."""
    return None if found_inf is None else (found_inf != 0).reshape(())


def _commit(dst: Tensor, new: Tensor, skip: Optional[Tensor]) -> None:
    """dst = new, unless ``skip`` (then dst keeps its value bit for bit)."""
    dst.copy_(new if skip is None else torch.where(skip, dst, new))


def _math_dtype(t: Tensor) -> torch.dtype:
    """fp32 maths for 16-bit and fp32 tensors, fp64 for fp64 ones."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def check_masks(op: str, params: Sequence[Tensor], masks: Optional[Sequence[Tensor]]) -> None:
    """masks: None, or one bool tensor per param with its shape and device."""
    if masks is None:
        return
    if len(masks) != len(params):
        raise ValueError(f"{op}: expected {len(params)} masks (one per param), got {len(masks)}")
    for i, (m, p) in enumerate(zip(masks, params)):
        if not isinstance(m, Tensor) or m.dtype != torch.bool:
            raise ValueError(f"{op}: expected masks[{i}] to be a bool tensor, got "
                             f"{m.dtype if isinstance(m, Tensor) else type(m).__name__}")
        if m.shape != p.shape or m.device != p.device:
            raise ValueError(f"{op}: expected masks[{i}] of shape {tuple(p.shape)} on {p.device} like params[{i}], "
                             f"got shape {tuple(m.shape)} on {m.device}")


def check_lengths(op: str, params: Sequence[Tensor], **lists: Sequence[Tensor]) -> None:
    """Every list holds one tensor per param."""
    for name, ts in lists.items():
        if len(ts) != len(params):
            raise ValueError(f"{op}: expected {len(params)} {name} (one per param), got {len(ts)}")


def _masked(pf: Tensor, masks: Optional[Sequence[Tensor]], i: int) -> Tensor:
    """The updated param (maths dtype) with its pruned elements (mask False) set to zero."""
    return pf if masks is None else torch.where(masks[i], pf, 0.0)


def fused_adam_(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    exp_avg_sqs: Sequence[Tensor],
    max_exp_avg_sqs: Sequence[Tensor],
    state_steps: Sequence[Tensor],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    weight_decay: float,
    eps: float,
    amsgrad: bool,
    maximize: bool,
    decoupled_weight_decay: bool,
    grad_scale: Optional[Tensor] = None,
    found_inf: Optional[Tensor] = None,
    grad_norm: Optional[Tensor] = None,
    max_grad_norm: float = 0.0,
    masks: Optional[Sequence[Tensor]] = None,
) -> None:
    """Adam / AdamW step over lists of tensors (torch.optim.Adam(W) semantics)."""
    op = "fused_adamw_" if decoupled_weight_decay else "fused_adam_"
    check_lengths(op, params, grads=grads, exp_avgs=exp_avgs, exp_avg_sqs=exp_avg_sqs, state_steps=state_steps,
                  **(dict(max_exp_avg_sqs=max_exp_avg_sqs) if amsgrad else {}))
    check_masks(op, params, masks)
    skip = _skip(found_inf)
    mult = grad_multiplier(grad_scale, grad_norm, max_grad_norm)
    for i, p in enumerate(params):
        acc = _math_dtype(p)
        step = state_steps[i].double() + 1.0
        g = grads[i].to(acc) * mult
        if maximize:
            g = -g
        pf = p.to(acc)
        if weight_decay != 0:
            if decoupled_weight_decay:
                pf = pf * (1.0 - lr * weight_decay)
            else:
                g = g + weight_decay * pf
        m = exp_avgs[i].to(acc) * beta1 + (1.0 - beta1) * g
        v = exp_avg_sqs[i].to(acc) * beta2 + (1.0 - beta2) * g * g
        bias_correction1 = 1.0 - beta1**step
        bias_correction2_sqrt = (1.0 - beta2**step).sqrt()
        if amsgrad:
            vmax = torch.maximum(max_exp_avg_sqs[i].to(acc), v)
            _commit(max_exp_avg_sqs[i], vmax, skip)
            denom = vmax.sqrt() / bias_correction2_sqrt + eps
        else:
            denom = v.sqrt() / bias_correction2_sqrt + eps
        pf = pf - (lr / bias_correction1) * m / denom
        _commit(p, _masked(pf, masks, i), skip)
        _commit(exp_avgs[i], m, skip)
        _commit(exp_avg_sqs[i], v, skip)
        _commit(state_steps[i], state_steps[i] + 1, skip)


def flat_offsets(numels: Sequence[int], element_size: int) -> list:
    """Where each param's piece starts in a flat state buffer (elements), followed by the
    buffer's length: pieces in param order, each starting on a ``FLAT_ALIGN_BYTES`` boundary
    (relative to the buffer's start), no padding after the last one."""
    align = max(1, FLAT_ALIGN_BYTES // element_size)
    out, pos = [], 0
    for n in numels:
        out.append(pos)
        pos += -(-int(n) // align) * align
    last = out[-1] + int(numels[-1]) if out else 0
    return out + [last]


def check_flat(op: str, name: str, buffer: Tensor, params: Sequence[Tensor], steps: bool = False) -> None:
    """A flat buffer of ``params``' state: 1-D, contiguous, on their device, of their dtype (fp32
    step counters with ``steps``) and long enough."""
    if not params:
        return
    p0 = params[0]
    dtype = torch.float32 if steps else p0.dtype
    need = len(params) if steps else flat_offsets([p.numel() for p in params], p0.element_size())[-1]
    if (not isinstance(buffer, Tensor) or buffer.dim() != 1 or not buffer.is_contiguous()
            or buffer.dtype != dtype or buffer.device != p0.device or buffer.numel() < need):
        got = (f"{buffer.dtype} of shape {tuple(buffer.shape)} on {buffer.device}"
               + ("" if buffer.is_contiguous() else ", not contiguous")) if isinstance(buffer, Tensor) else type(buffer).__name__
        raise ValueError(f"{op}: expected {name} to be a contiguous 1-D {dtype} tensor of >= {need} elements on "
                         f"{p0.device} (flat state of {len(params)} params), got {got}")


def flat_views(buffer: Tensor, params: Sequence[Tensor], steps: bool = False) -> list:
    """The per-param pieces of a flat buffer (shaped like each param; 0-d for step counters)."""
    if steps:
        return [buffer[i] for i in range(len(params))]
    offsets = flat_offsets([p.numel() for p in params], buffer.element_size())
    return [buffer[o:o + p.numel()].view(p.shape) for o, p in zip(offsets, params)]


def fused_adam_flat_(params: Sequence[Tensor], grads: Sequence[Tensor], exp_avg: Tensor, exp_avg_sq: Tensor,
                     max_exp_avg_sq: Optional[Tensor], state_steps: Tensor, *, amsgrad: bool,
                     decoupled_weight_decay: bool, **kwargs) -> None:
    """:func:`fused_adam_` on flat state buffers (see the module docstring)."""
    op = "fused_adamw_flat_" if decoupled_weight_decay else "fused_adam_flat_"
    check_flat(op, "exp_avg", exp_avg, params)
    check_flat(op, "exp_avg_sq", exp_avg_sq, params)
    if amsgrad:
        if max_exp_avg_sq is None:
            raise ValueError(f"{op}: amsgrad=True needs max_exp_avg_sq")
        check_flat(op, "max_exp_avg_sq", max_exp_avg_sq, params)
    check_flat(op, "state_steps", state_steps, params, steps=True)
    fused_adam_(params, grads, flat_views(exp_avg, params), flat_views(exp_avg_sq, params),
                flat_views(max_exp_avg_sq, params) if amsgrad else [], flat_views(state_steps, params, steps=True),
                amsgrad=amsgrad, decoupled_weight_decay=decoupled_weight_decay, **kwargs)


def fused_sgd_(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    momentum_buffers: Sequence[Tensor],
    *,
    lr: float,
    momentum: float,
    dampening: float,
    weight_decay: float,
    nesterov: bool,
    maximize: bool,
    is_first_step: bool,
    grad_scale: Optional[Tensor] = None,
    found_inf: Optional[Tensor] = None,
    grad_norm: Optional[Tensor] = None,
    max_grad_norm: float = 0.0,
    masks: Optional[Sequence[Tensor]] = None,
) -> None:
    """SGD step over lists of tensors (torch.optim.SGD semantics).

    ``momentum_buffers`` is empty when ``momentum == 0``; with ``is_first_step`` the buffers are
    written with the (decayed) gradient instead of being blended, as torch does on the first step.
    """
    check_lengths("fused_sgd_", params, grads=grads, **(dict(momentum_buffers=momentum_buffers) if momentum != 0 else {}))
    check_masks("fused_sgd_", params, masks)
    skip = _skip(found_inf)
    mult = grad_multiplier(grad_scale, grad_norm, max_grad_norm)
    for i, p in enumerate(params):
        acc = _math_dtype(p)
        g = grads[i].to(acc) * mult
        if maximize:
            g = -g
        pf = p.to(acc)
        if weight_decay != 0:
            g = g + weight_decay * pf
        if momentum != 0:
            if is_first_step:
                buf = g
            else:
                buf = momentum_buffers[i].to(acc) * momentum + (1.0 - dampening) * g
            _commit(momentum_buffers[i], buf, skip)
            g = g + momentum * buf if nesterov else buf
        _commit(p, _masked(pf - lr * g, masks, i), skip)


def apply_masks_(tensors: Sequence[Tensor], masks: Sequence[Tensor]) -> None:
    """Every element of ``tensors[i]`` whose ``masks[i]`` entry is False set to +0 (NaN included):
    what bigkernels.prune_'s post-step hook does after a torch.optim step."""
    check_masks("apply_masks_", tensors, masks)
    for t, m in zip(tensors, masks):
        t.copy_(torch.where(m, t, 0.0))


def sum_of_squares(tensors: Sequence[Tensor]) -> Tensor:
    """Sum of the squares of every element of every tensor, as a 0-d fp32 tensor (fp64 inside)."""
    total = torch.zeros((), dtype=torch.float64, device=tensors[0].device)
    for t in tensors:
        total += t.double().square().sum()
    return total.float()


# ==============================================================================================
# RMSprop, Adafactor, Lion (issue 12): the references of fused_rmsprop_, fused_adafactor_ and
# fused_lion_, plus a plain Lion optimizer (the formula FusedLion must match; torch has none).
# ==============================================================================================


def _grad(grad: Tensor, acc: torch.dtype, mult, maximize: bool) -> Tensor:
    """The gradient the maths uses: in ``acc``, unscaled and clipped (``mult``, which must not
    promote a 0-d gradient to fp64), negated for maximize."""
    g = (grad.to(acc) * mult).to(acc)
    return -g if maximize else g


def _lerp(start: Tensor, end: Tensor, weight) -> Tensor:
    """torch.lerp's formula (weight < 0.5: start + w (end - start), else end - (end - start)(1 - w))."""
    if not isinstance(weight, Tensor):
        weight = torch.tensor(float(weight), dtype=start.dtype, device=start.device)
    return torch.lerp(start, end, weight.to(device=start.device, dtype=start.dtype))


def fused_rmsprop_(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    square_avgs: Sequence[Tensor],
    grad_avgs: Sequence[Tensor],
    momentum_buffers: Sequence[Tensor],
    state_steps: Sequence[Tensor],
    *,
    lr: float,
    alpha: float,
    eps: float,
    weight_decay: float,
    momentum: float,
    centered: bool,
    maximize: bool,
    grad_scale: Optional[Tensor] = None,
    found_inf: Optional[Tensor] = None,
    grad_norm: Optional[Tensor] = None,
    max_grad_norm: float = 0.0,
    masks: Optional[Sequence[Tensor]] = None,
) -> None:
    """RMSprop step over lists of tensors (torch.optim.RMSprop semantics). ``grad_avgs`` is empty
    unless ``centered``; ``momentum_buffers`` is empty unless ``momentum > 0``."""
    check_masks("fused_rmsprop_", params, masks)
    skip = _skip(found_inf)
    mult = grad_multiplier(grad_scale, grad_norm, max_grad_norm)
    for i, p in enumerate(params):
        acc = _math_dtype(p)
        g = _grad(grads[i], acc, mult, maximize)
        pf = p.to(acc)
        if weight_decay != 0:
            g = g + weight_decay * pf
        sq = square_avgs[i].to(acc) * alpha + (1.0 - alpha) * g * g
        if centered:
            ga = _lerp(grad_avgs[i].to(acc), g, 1.0 - alpha)
            _commit(grad_avgs[i], ga, skip)
            avg = (sq - ga * ga).sqrt() + eps
        else:
            avg = sq.sqrt() + eps
        if momentum > 0:
            buf = momentum_buffers[i].to(acc) * momentum + g / avg
            _commit(momentum_buffers[i], buf, skip)
            pf = pf - lr * buf
        else:
            pf = pf - lr * (g / avg)
        _commit(square_avgs[i], sq, skip)
        _commit(p, _masked(pf, masks, i), skip)
        _commit(state_steps[i], state_steps[i] + 1, skip)


def lion_sign(c: Tensor) -> Tensor:
    """sign with sign(0) = 0 and NaN kept NaN (torch.sign maps NaN to 0, which would hide a NaN
    gradient by freezing the weight; the fused kernels propagate it, as Adam's do)."""
    return torch.where(torch.isnan(c), c, torch.sign(c))


def fused_lion_(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    weight_decay: float,
    maximize: bool,
    grad_scale: Optional[Tensor] = None,
    found_inf: Optional[Tensor] = None,
    grad_norm: Optional[Tensor] = None,
    max_grad_norm: float = 0.0,
    masks: Optional[Sequence[Tensor]] = None,
) -> None:
    """Lion step (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms") over lists:
    ``c = beta1 m + (1 - beta1) g; p = p (1 - lr wd) - lr sign(c); m = beta2 m + (1 - beta2) g``."""
    check_masks("fused_lion_", params, masks)
    skip = _skip(found_inf)
    mult = grad_multiplier(grad_scale, grad_norm, max_grad_norm)
    for i, p in enumerate(params):
        acc = _math_dtype(p)
        g = _grad(grads[i], acc, mult, maximize)
        m = exp_avgs[i].to(acc)
        c = m * beta1 + (1.0 - beta1) * g
        pf = p.to(acc)
        if weight_decay != 0:
            pf = pf * (1.0 - lr * weight_decay)
        pf = pf - lr * lion_sign(c)
        _commit(exp_avgs[i], m * beta2 + (1.0 - beta2) * g, skip)
        _commit(p, _masked(pf, masks, i), skip)


def adafactor_factored(p: Tensor) -> bool:
    """Adafactor keeps factored (row_var, col_var) second moments for params of >= 2 dims, over
    their last two dims (leading dims are a batch of matrices), a full ``variance`` otherwise."""
    return p.dim() >= 2


def check_adafactor_lists(op: str, params, row_vars, col_vars, variances) -> bool:
    """A call is all factored params (row_vars, col_vars one per param, variances empty) or all
    vector params (variances one per param, row_vars / col_vars empty); returns which. Raises
    ValueError naming the first list that does not fit."""
    if not params:
        return False
    factored = adafactor_factored(params[0])
    for i, p in enumerate(params):
        if adafactor_factored(p) != factored:
            raise ValueError(f"{op}: params mixes >= 2-D (factored) and < 2-D params: params[0] is {params[0].dim()}-D, "
                             f"params[{i}] is {p.dim()}-D (call once per kind)")
    want = {"row_vars": len(params) if factored else 0, "col_vars": len(params) if factored else 0,
            "variances": 0 if factored else len(params)}
    for name, lst in (("row_vars", row_vars), ("col_vars", col_vars), ("variances", variances)):
        if len(lst) != want[name]:
            raise ValueError(f"{op}: expected {want[name]} {name} for {'factored' if factored else 'vector'} params, "
                             f"got {len(lst)}")
    for i, p in enumerate(params):
        if factored:
            shapes = (("row_vars", row_vars[i], p.shape[:-1] + (1,)), ("col_vars", col_vars[i], p.shape[:-2] + (1, p.shape[-1])))
        else:
            shapes = (("variances", variances[i], p.shape),)
        for name, t, shape in shapes:
            if tuple(t.shape) != tuple(shape):
                raise ValueError(f"{op}: expected {name}[{i}] of shape {tuple(shape)} for params[{i}] of shape "
                                 f"{tuple(p.shape)}, got {tuple(t.shape)}")
    return factored


def fused_adafactor_(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    row_vars: Sequence[Tensor],
    col_vars: Sequence[Tensor],
    variances: Sequence[Tensor],
    state_steps: Sequence[Tensor],
    *,
    lr: float,
    beta2_decay: float,
    eps1: float,
    eps2: float,
    d: float,
    weight_decay: float,
    maximize: bool,
    grad_scale: Optional[Tensor] = None,
    found_inf: Optional[Tensor] = None,
    grad_norm: Optional[Tensor] = None,
    max_grad_norm: float = 0.0,
    masks: Optional[Sequence[Tensor]] = None,
) -> None:
    """Adafactor step over lists (torch.optim.Adafactor semantics; ``eps1`` already resolved from
    None to the dtype's machine epsilon by the caller). Per param, with t = step + 1:
    ``alpha = max(eps2, RMS(p)) * min(lr, t^-1/2)`` (RMS of p before weight decay);
    ``p *= 1 - lr wd``; factored (>= 2-D, over the last two dims): row/col means of g^2 lerped
    into row_var / col_var with weight ``t^beta2_decay``, ``V = row_var col_var / max(mean of
    row_var over rows, eps1)``; vectors: ``variance`` lerped to g^2, ``V = variance``;
    ``U = g / sqrt(max(V, eps1^2))``; ``p -= alpha / max(1, RMS(U) / d) * U``.
    Params without elements only count the step (torch's own step divides by their zero size)."""
    factored = check_adafactor_lists("fused_adafactor_", params, row_vars, col_vars, variances)
    check_masks("fused_adafactor_", params, masks)
    skip = _skip(found_inf)
    mult = grad_multiplier(grad_scale, grad_norm, max_grad_norm)
    for i, p in enumerate(params):
        acc = _math_dtype(p)
        if p.numel() == 0:
            _commit(state_steps[i], state_steps[i] + 1, skip)
            continue
        step = state_steps[i].double() + 1.0
        w = step ** beta2_decay  # 1 - beta2_t
        lr_t = torch.as_tensor(lr, dtype=torch.float64, device=step.device)
        rho = torch.minimum(lr_t, step.rsqrt())
        pf = p.to(acc)
        rms_p = pf.double().square().sum().sqrt() / p.numel() ** 0.5
        alpha = torch.clamp(rms_p.to(step.device), min=eps2) * rho
        g = _grad(grads[i], acc, mult, maximize)
        if weight_decay != 0:
            pf = pf * (1.0 - lr * weight_decay)
        g2 = g * g
        if factored:
            rows, cols = p.shape[-2], p.shape[-1]
            rv = _lerp(row_vars[i].to(acc), g2.sum(dim=-1, keepdim=True) / cols, w)
            cv = _lerp(col_vars[i].to(acc), g2.sum(dim=-2, keepdim=True) / rows, w)
            _commit(row_vars[i], rv, skip)
            _commit(col_vars[i], cv, skip)
            var = (rv * cv) / torch.clamp(rv.mean(dim=-2, keepdim=True), min=eps1)
        else:
            var = _lerp(variances[i].to(acc), g2, w)
            _commit(variances[i], var, skip)
        u = g * torch.clamp(var, min=eps1 * eps1).rsqrt()
        rms_u = u.double().square().sum().sqrt() / p.numel() ** 0.5
        denom = torch.clamp(rms_u.to(step.device) / d, min=1.0)
        pf = pf - (alpha / denom).to(device=p.device, dtype=acc) * u
        _commit(p, _masked(pf, masks, i), skip)
        _commit(state_steps[i], state_steps[i] + 1, skip)


class Lion(torch.optim.Optimizer):
    """Plain-PyTorch Lion (Chen et al. 2023) as its authors' code writes it, one state
    ``exp_avg`` per param: the formula :class:`bigkernels.optim.FusedLion` must reproduce and the
    baseline it is timed against (``foreach=True``: torch's ``_foreach`` ops; else a for-loop).
    Its sign is torch.sign (sign(0) = 0; NaN gives 0 here, where the fused op keeps NaN)."""

    def __init__(self, params, lr: float = 1e-4, betas=(0.9, 0.99), weight_decay: float = 0.0, *,
                 maximize: bool = False, foreach: bool = False):
        super().__init__(params, dict(lr=lr, betas=betas, weight_decay=weight_decay, maximize=maximize,
                                      foreach=foreach))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, wd = group["lr"], group["weight_decay"]
            beta1, beta2 = group["betas"]
            params = [p for p in group["params"] if p.grad is not None]
            grads = [-p.grad if group["maximize"] else p.grad for p in params]
            for p in params:
                if "exp_avg" not in self.state[p]:
                    self.state[p]["exp_avg"] = torch.zeros_like(p)
            avgs = [self.state[p]["exp_avg"] for p in params]
            if not params:
                continue
            if group.get("foreach", False):
                if wd != 0:
                    torch._foreach_mul_(params, 1 - lr * wd)
                c = torch._foreach_mul(avgs, beta1)
                torch._foreach_add_(c, grads, alpha=1 - beta1)
                torch._foreach_sign_(c)
                torch._foreach_add_(params, c, alpha=-lr)
                torch._foreach_mul_(avgs, beta2)
                torch._foreach_add_(avgs, grads, alpha=1 - beta2)
                continue
            for p, g, m in zip(params, grads, avgs):
                if wd != 0:
                    p.mul_(1 - lr * wd)
                p.add_(m.mul(beta1).add_(g, alpha=1 - beta1).sign_(), alpha=-lr)
                m.mul_(beta2).add_(g, alpha=1 - beta2)
        return loss


# ------------------------------------------------------------------------------------------------
# AdamW8bit (bigkernels.optim.AdamW8bit): AdamW with both moments stored in 8 bits
# ------------------------------------------------------------------------------------------------
# Block-wise quantisation: every ``block_size`` consecutive elements of a state (in the param's
# flat order; the last block may be shorter) share one fp32 scale, the block's absolute maximum,
# and each element is stored as an 8-bit code of its value divided by that scale.
#
# The codes are small floating-point formats, so encoding and decoding are a few integer
# operations on the fp32 bits (vectorised on every CPU ISA, no table lookups):
#
# * magnitude code ``c >= 1`` decodes to the fp32 whose bits are
#   ``((c - 1) << (23 - mant)) + bits(2**-binades)``: a float with ``mant`` mantissa bits on
#   [2**-binades, 1], 2**mant values per binade; ``c = 0`` is 0.0.
# * encoding is round to nearest on the magnitude, ties away from zero (adding half a step to
#   the fp32 bits and shifting: within a binade the bits are linear in the value, so this is the
#   nearest of the two neighbours), saturating at 1.0.
# * exp_avg (signed): bit 7 is the sign (set only for a non-zero magnitude), bits 0-6 the
#   magnitude code with EXP_AVG_MANT / EXP_AVG_BINADES (codes 0..121). Magnitudes below half the
#   smallest non-zero value become 0.
# * exp_avg_sq is stored as its square root (the Adam denominator's own quantity, which needs half
#   the dynamic range): an unsigned code with SQRT_MANT / SQRT_BINADES (codes 0..241), i.e.
#   exp_avg_sq relative to its block maximum down to 2**-30. A non-zero root never encodes to 0
#   (it saturates at the smallest non-zero value): a second moment rounded to zero under a
#   non-zero first moment would make the update ~exp_avg / eps (the "zero-point" failure of
#   8-bit Adam).
#
# The step, elementwise in fp32 with every operation rounded as written (no fused multiply-add),
# so every backend produces the same codes and scales bit for bit:
#   g   = fp32(grad) * mult (grad_multiplier, as fp32), negated when maximize
#   m   = decode(exp_avg) * exp_avg_scale;   r = decode(exp_avg_sq) * exp_avg_sq_scale
#   m   = beta1 * m + (1 - beta1) * g;       v = beta2 * (r * r) + ((1 - beta2) * g) * g
#   r   = sqrt(v)  (correctly rounded)
#   p   = p * (1 - lr * weight_decay) - lr / bc1 * m / (r / sqrt(bc2) + eps)   (within 1e-5 relative)
#   scale = max |m| (resp. r) over the block;  code = encode(m * (1 / scale)) (0 where scale is 0)
# The constants (1 - beta1), (1 - beta2), (1 - lr * weight_decay) are computed in double and
# rounded to fp32, as for the other Adam ops. Non-finite values make their whole block non-finite.

ADAMW8BIT_MIN_NUMEL = 4096  # params with fewer elements keep fp32 state (as bitsandbytes does)
EXP_AVG_MANT, EXP_AVG_BINADES = 3, 15
SQRT_MANT, SQRT_BINADES = 4, 15


def _min_bits(binades: int) -> int:
    return (127 - binades) << 23  # fp32 bits of 2**-binades


def _encode_magnitude(a: Tensor, mant: int, binades: int) -> Tensor:
    """int32 magnitude code (1.. binades << mant + 1) of the non-negative fp32 bit patterns ``a``
    (values >= 2**-binades round to nearest, ties up; smaller ones give 1, larger ones saturate)."""
    shift = 23 - mant
    q = (a - _min_bits(binades) + (1 << (shift - 1))) >> shift
    return q.clamp(0, binades << mant) + 1


def _decode_magnitude(code: Tensor, mant: int, binades: int) -> Tensor:
    """fp32 values of int32 magnitude codes (0 -> 0.0)."""
    bits = ((code - 1).clamp(min=0) << (23 - mant)) + _min_bits(binades)
    return torch.where(code > 0, bits.view(torch.float32), 0.0)


def encode_exp_avg(x: Tensor) -> Tensor:
    """uint8 codes of fp32 ``x`` in [-1, 1] (the first moment over its block scale)."""
    bits = x.contiguous().view(torch.int32)
    a = bits & 0x7FFFFFFF
    mag = _encode_magnitude(a, EXP_AVG_MANT, EXP_AVG_BINADES)
    mag = torch.where(a < _min_bits(EXP_AVG_BINADES + 1), 0, mag)  # nearer to 0 than to 2**-binades
    sign = torch.where((bits < 0) & (mag > 0), 128, 0)
    return (mag | sign).to(torch.uint8)


def decode_exp_avg(codes: Tensor) -> Tensor:
    """fp32 values in [-1, 1] of uint8 first-moment codes."""
    c = codes.to(torch.int32)
    mag = _decode_magnitude(c & 127, EXP_AVG_MANT, EXP_AVG_BINADES)
    return torch.where(c >= 128, -mag, mag)


def encode_exp_avg_sq_root(x: Tensor) -> Tensor:
    """uint8 codes of fp32 ``x`` in [0, 1] (the root of the second moment over its block scale)."""
    a = x.contiguous().view(torch.int32) & 0x7FFFFFFF
    code = _encode_magnitude(a, SQRT_MANT, SQRT_BINADES)
    return torch.where(a == 0, 0, code).to(torch.uint8)


def decode_exp_avg_sq_root(codes: Tensor) -> Tensor:
    """fp32 values in [0, 1] of uint8 second-moment-root codes."""
    return _decode_magnitude(codes.to(torch.int32), SQRT_MANT, SQRT_BINADES)


def num_blocks(numel: int, block_size: int) -> int:
    """Scales per state of a ``numel``-element param."""
    return -(-numel // block_size)


def _sqrt_rn(x: Tensor) -> Tensor:
    """Correctly rounded fp32 square root: torch's CPU sqrt is only faithful (1 ulp), so it is
    taken in fp64 and rounded once (innocuous double rounding for sqrt: 53 >= 2 * 24 + 2 bits)."""
    return x.double().sqrt().float()


def _blocks(flat: Tensor, block_size: int) -> Tensor:
    """(blocks, block_size) view of a flat tensor zero-padded to whole blocks."""
    pad = (-flat.numel()) % block_size
    return torch.nn.functional.pad(flat, (0, pad)).view(-1, block_size)


def _block_scale(x: Tensor) -> Tuple[Tensor, Tensor]:
    """(absmax per row, its reciprocal or 0 where it is 0); NaN propagates."""
    scale = x.abs().amax(dim=1)
    return scale, torch.where(scale > 0, 1.0 / scale, 0.0)


def quantize_adamw8bit_state(exp_avg: Tensor, exp_avg_sq: Tensor, block_size: int):
    """fp32 AdamW moments (shaped like the param) -> (exp_avg codes, exp_avg_sq codes, exp_avg
    scales, exp_avg_sq scales), the layout of AdamW8bit's state. Used to convert a
    torch.optim.AdamW state."""
    shape, n = exp_avg.shape, exp_avg.numel()
    m = _blocks(exp_avg.detach().reshape(-1).float(), block_size)
    r = _blocks(_sqrt_rn(exp_avg_sq.detach().reshape(-1).float().clamp(min=0)), block_size)
    ms, mi = _block_scale(m)
    rs, ri = _block_scale(r)
    mc = encode_exp_avg(m * mi[:, None]).reshape(-1)[:n].view(shape)
    rc = encode_exp_avg_sq_root(r * ri[:, None]).reshape(-1)[:n].view(shape)
    return mc, rc, ms, rs


def dequantize_adamw8bit_state(exp_avg: Tensor, exp_avg_sq: Tensor, exp_avg_scale: Tensor,
                               exp_avg_sq_scale: Tensor, block_size: int) -> Tuple[Tensor, Tensor]:
    """AdamW8bit's codes and scales -> fp32 (exp_avg, exp_avg_sq) shaped like the codes."""
    shape, n = exp_avg.shape, exp_avg.numel()
    m = _blocks(decode_exp_avg(exp_avg.reshape(-1)), block_size) * exp_avg_scale[:, None]
    r = _blocks(decode_exp_avg_sq_root(exp_avg_sq.reshape(-1)), block_size) * exp_avg_sq_scale[:, None]
    return m.reshape(-1)[:n].view(shape), (r * r).reshape(-1)[:n].view(shape)


def check_adamw8bit_lists(op: str, params, exp_avgs, exp_avg_sqs, exp_avg_scales, exp_avg_sq_scales,
                          block_size: int) -> None:
    """Codes: uint8 shaped like the params; scales: fp32 of num_blocks(numel, block_size)."""
    if block_size < 1 or block_size & (block_size - 1):
        raise ValueError(f"{op}: block_size must be a power of two, got {block_size}")
    for name, lst in (("exp_avgs", exp_avgs), ("exp_avg_sqs", exp_avg_sqs), ("exp_avg_scales", exp_avg_scales),
                      ("exp_avg_sq_scales", exp_avg_sq_scales)):
        if len(lst) != len(params):
            raise ValueError(f"{op}: expected {len(params)} {name} (one per param), got {len(lst)}")
    for i, p in enumerate(params):
        nb = num_blocks(p.numel(), block_size)
        for name, t, dtype, shape in (("exp_avgs", exp_avgs[i], torch.uint8, p.shape),
                                      ("exp_avg_sqs", exp_avg_sqs[i], torch.uint8, p.shape),
                                      ("exp_avg_scales", exp_avg_scales[i], torch.float32, (nb,)),
                                      ("exp_avg_sq_scales", exp_avg_sq_scales[i], torch.float32, (nb,))):
            if t.dtype != dtype or t.shape != shape or t.device != p.device:
                raise ValueError(f"{op}: expected {name}[{i}] to be {dtype} of shape {tuple(shape)} on {p.device}, "
                                 f"got {t.dtype} of shape {tuple(t.shape)} on {t.device}")


def adamw8bit_(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    exp_avg_sqs: Sequence[Tensor],
    exp_avg_scales: Sequence[Tensor],
    exp_avg_sq_scales: Sequence[Tensor],
    state_steps: Sequence[Tensor],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    weight_decay: float,
    eps: float,
    maximize: bool,
    block_size: int,
    grad_scale: Optional[Tensor] = None,
    found_inf: Optional[Tensor] = None,
    grad_norm: Optional[Tensor] = None,
    max_grad_norm: float = 0.0,
    masks: Optional[Sequence[Tensor]] = None,
) -> None:
    """AdamW step with 8-bit block-quantised moments (see the comment above for the exact maths).
    Hyperparameters may be 0-d tensors (the traced path of torch.compile)."""
    op = "adamw8bit_"
    check_masks(op, params, masks)
    check_adamw8bit_lists(op, params, exp_avgs, exp_avg_sqs, exp_avg_scales, exp_avg_sq_scales, block_size)
    skip = _skip(found_inf)
    mult = grad_multiplier(grad_scale, grad_norm, max_grad_norm)
    mult32 = mult.float() if isinstance(mult, Tensor) else mult  # one fp32 factor, as the kernels
    one_minus_beta1, one_minus_beta2, decay = 1.0 - beta1, 1.0 - beta2, 1.0 - lr * weight_decay
    for i, p in enumerate(params):
        n = p.numel()
        step = state_steps[i].double() + 1.0
        g = grads[i].reshape(-1).float() * mult32
        if maximize:
            g = -g
        m = _blocks(decode_exp_avg(exp_avgs[i].reshape(-1)), block_size) * exp_avg_scales[i][:, None]
        r = _blocks(decode_exp_avg_sq_root(exp_avg_sqs[i].reshape(-1)), block_size) * exp_avg_sq_scales[i][:, None]
        m, r = m.reshape(-1)[:n], r.reshape(-1)[:n]
        m = m * beta1 + g * one_minus_beta1
        r = _sqrt_rn((r * r) * beta2 + (g * one_minus_beta2) * g)
        # the param in its own precision (fp32 for 16-bit params)
        acc = _math_dtype(p)
        pf = p.reshape(-1).to(acc)
        if weight_decay != 0:
            pf = pf * decay
        bias_correction1 = 1.0 - beta1**step
        bias_correction2_sqrt = (1.0 - beta2**step).sqrt()
        pf = pf - (lr / bias_correction1) * m.to(acc) / (r.to(acc) / bias_correction2_sqrt + eps)
        if masks is not None:
            pf = torch.where(masks[i].reshape(-1), pf, 0.0)
        mb, rb = _blocks(m, block_size), _blocks(r, block_size)
        ms, mi = _block_scale(mb)
        rs, ri = _block_scale(rb)
        mc = encode_exp_avg(mb * mi[:, None]).reshape(-1)[:n]
        rc = encode_exp_avg_sq_root(rb * ri[:, None]).reshape(-1)[:n]
        _commit(p, pf.view(p.shape), skip)
        _commit(exp_avgs[i], mc.view(p.shape), skip)
        _commit(exp_avg_sqs[i], rc.view(p.shape), skip)
        _commit(exp_avg_scales[i], ms, skip)
        _commit(exp_avg_sq_scales[i], rs, skip)
        _commit(state_steps[i], state_steps[i] + 1, skip)
