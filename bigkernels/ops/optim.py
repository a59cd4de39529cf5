"""Fused optimizer ops: schemas, fake implementations and the per-device choice of kernel.

Ops (all in the ``bigkernels`` namespace):

``fused_adam_`` / ``fused_adamw_``
    One Adam step over lists of same-device, same-dtype tensors; ``fused_adamw_`` decays the
    weights decoupled (AdamW), ``fused_adam_`` adds ``weight_decay * param`` to the gradient.
    Mutates params, exp_avgs, exp_avg_sqs, max_exp_avg_sqs (only when amsgrad) and state_steps
    (fp32 0-d step counters, incremented by one unless ``found_inf`` is non-zero).
``fused_adam_flat_`` / ``fused_adamw_flat_``
    The same step with each state in one flat buffer for all params (``exp_avg``,
    ``exp_avg_sq``, ``max_exp_avg_sq``: 1-D, param ``i`` at ``flat_offsets(...)[i]``, pieces on
    64-byte boundaries) and the step counters in one 1-D fp32 tensor: a call converts two tensor
    lists (params, grads) instead of five, which is what a step over thousands of small tensors
    costs (the fused optimizers keep their state that way; ``state_dict`` entries are views).
``fused_sgd_``
    One SGD step (momentum, dampening, nesterov, weight decay, maximize).
``sum_of_squares``
    Sum of squares of every element of a list of tensors as a 0-d fp32 tensor: the reduction
    pass of the global-norm clipping done inside the fused steps.
``adamw8bit_``
    One AdamW step with both moments as 8-bit codes plus one fp32 absmax scale per ``block_size``
    elements (dequantise -> update -> requantise in one pass; bigkernels.optim.AdamW8bit).
``apply_masks_``
    Pruned elements (bool mask False) of a list of same-device, same-dtype tensors set to zero:
    the pass prune_'s hook makes after a torch.optim step (the fused optimizers need none).

Every update op takes ``grad_scale``/``found_inf`` (torch.amp.GradScaler's protocol) and
``grad_norm``/``max_grad_norm`` (clipping by global norm); see ``bigkernels.reference.optim``
for the exact maths. Every backend bumps the params' version counters, as torch's in-place ops do.
``masks`` (optional, one bool tensor per param) keeps pruned weights at
exactly zero inside the same pass (bigkernels.prune_ registers them; the fused optimizers pass
them here).

DTensors (FSDP2, tensor parallel): every op runs on the local shards when each param's grad,
state and mask have its mesh and placements (``bigkernels.ops._dtensor``), also when called as
``torch.ops.bigkernels.<op>``; ``sum_of_squares`` then returns a ``Partial`` 0-d DTensor.
"""
from __future__ import annotations

import torch

from bigkernels.ops import _dtensor, _registry
from bigkernels.reference import optim as ref

_COMMON_TAIL = (
    "Tensor? grad_scale=None, Tensor? found_inf=None, Tensor? grad_norm=None, float max_grad_norm=0.0, "
    "Tensor[]? masks=None"
)
ADAM_SCHEMA = (
    "(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, "
    "Tensor(d!)[] max_exp_avg_sqs, Tensor(e!)[] state_steps, *, float lr, float beta1, float beta2, "
    f"float weight_decay, float eps, bool amsgrad, bool maximize, {_COMMON_TAIL}) -> ()"
)
ADAM_FLAT_SCHEMA = (
    "(Tensor(a!)[] params, Tensor[] grads, Tensor(b!) exp_avg, Tensor(c!) exp_avg_sq, "
    "Tensor(d!)? max_exp_avg_sq, Tensor(e!) state_steps, *, float lr, float beta1, float beta2, "
    f"float weight_decay, float eps, bool amsgrad, bool maximize, {_COMMON_TAIL}) -> ()"
)
SGD_SCHEMA = (
    "(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] momentum_buffers, *, float lr, float momentum, "
    "float dampening, float weight_decay, bool nesterov, bool maximize, bool is_first_step, "
    f"{_COMMON_TAIL}) -> ()"
)
SUM_OF_SQUARES_SCHEMA = "(Tensor[] tensors) -> Tensor"
APPLY_MASKS_SCHEMA = "(Tensor(a!)[] tensors, Tensor[] masks) -> ()"


def _adam_reference(decoupled: bool):
    def impl(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, **kw):
        ref.fused_adam_(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps,
                        decoupled_weight_decay=decoupled, **kw)

    impl.__name__ = "fused_adamw_" if decoupled else "fused_adam_"
    return impl


def _adam_flat_reference(decoupled: bool):
    def impl(params, grads, exp_avg, exp_avg_sq, max_exp_avg_sq, state_steps, **kw):
        ref.fused_adam_flat_(params, grads, exp_avg, exp_avg_sq, max_exp_avg_sq, state_steps,
                             decoupled_weight_decay=decoupled, **kw)

    impl.__name__ = "fused_adamw_flat_" if decoupled else "fused_adam_flat_"
    return impl


def _no_output(*args, **kwargs) -> None:
    return None


def _sum_of_squares_fake(tensors):
    torch._check(len(tensors) > 0, lambda: "sum_of_squares: tensors must not be empty")
    return tensors[0].new_empty((), dtype=torch.float32)


_DEFS = [
    ("fused_adam_", ADAM_SCHEMA, _adam_reference(False), _no_output, "fused_adam_triton_"),
    ("fused_adamw_", ADAM_SCHEMA, _adam_reference(True), _no_output, "fused_adamw_triton_"),
    ("fused_adam_flat_", ADAM_FLAT_SCHEMA, _adam_flat_reference(False), _no_output, None),
    ("fused_adamw_flat_", ADAM_FLAT_SCHEMA, _adam_flat_reference(True), _no_output, None),
    ("fused_sgd_", SGD_SCHEMA, ref.fused_sgd_, _no_output, "fused_sgd_triton_"),
    ("sum_of_squares", SUM_OF_SQUARES_SCHEMA, ref.sum_of_squares, _sum_of_squares_fake, "sum_of_squares_triton"),
    ("apply_masks_", APPLY_MASKS_SCHEMA, ref.apply_masks_, _no_output, None),
]

def _masks_as_list(kwargs: dict) -> dict:
    """The Triton ops take ``masks`` as a required list (empty: none): see bigkernels.triton.optim."""
    masks = kwargs.get("masks")
    return dict(kwargs, masks=[] if masks is None else masks)


for _name, _schema, _reference, _fake, _triton_name in _DEFS:
    _qual = f"{_registry.NAMESPACE}::{_name}"
    torch.library.define(_qual, _schema)
    torch.library.register_fake(_qual)(_fake)
    # The reference is the kernel of last resort for any device without a compiled one.
    torch.library.impl(_qual, "CompositeExplicitAutograd")(_reference)
    _registry.register(_registry.OpInfo(_name, _schema, _reference, triton_name=_triton_name,
                                        triton_kwargs=_masks_as_list if "masks" in _schema else None))
    _dtensor.register(_name, sum_of_squares=_name == "sum_of_squares")


def _run(op: str, backend, tensors, *args, **kwargs):
    """``op`` on ``backend`` (a name from ``_registry.BACKENDS``), or on the fastest one for the
    device of ``tensors[0]`` when None. Callers inside a traced step (the fused optimizers under
    torch.compile) pass the backend they chose outside the trace: choosing reads the dispatcher
    table (``torch._C._dispatch_dump``), which Dynamo cannot trace. DTensors run on their local
    shards (``bigkernels.ops._dtensor``), whatever the backend."""
    if tensors and (_dtensor.is_dtensor(tensors[0]) or (backend == "reference" and _dtensor.any_dtensor(tensors))):
        def local(*args, **kwargs):
            return _run(op, backend, *args, **kwargs)

        if op == "sum_of_squares":
            return _dtensor.sum_of_squares_on_shards(local, tensors)
        return _dtensor.call_on_shards(op, local, (tensors,) + args, kwargs)
    if backend is None:
        return _registry.call(op, tensors[0].device, tensors, *args, **kwargs)
    return _registry.call_backend(op, backend, tensors, *args, **kwargs)


def adam_op(decoupled_weight_decay: bool) -> str:
    """The op name of an Adam step: ``fused_adamw_`` (decoupled weight decay) or ``fused_adam_``."""
    return "fused_adamw_" if decoupled_weight_decay else "fused_adam_"


def fused_adam_(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, *,
                decoupled_weight_decay: bool, backend=None, **kwargs) -> None:
    """Run the Adam (or AdamW) step on ``backend`` (default: the fastest for the tensors' device)."""
    _run(adam_op(decoupled_weight_decay), backend, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs,
         state_steps, **kwargs)


def adam_flat_op(decoupled_weight_decay: bool) -> str:
    """The op name of an Adam step on flat state buffers."""
    return "fused_adamw_flat_" if decoupled_weight_decay else "fused_adam_flat_"


def fused_adam_flat_(params, grads, exp_avg, exp_avg_sq, max_exp_avg_sq, state_steps, *,
                     decoupled_weight_decay: bool, backend=None, **kwargs) -> None:
    """The Adam (or AdamW) step on flat state buffers (see ``flat_offsets``) on ``backend``."""
    _run(adam_flat_op(decoupled_weight_decay), backend, params, grads, exp_avg, exp_avg_sq, max_exp_avg_sq,
         state_steps, **kwargs)


flat_offsets = ref.flat_offsets


def fused_sgd_(params, grads, momentum_buffers, *, backend=None, **kwargs) -> None:
    """Run the SGD step on ``backend`` (default: the fastest for the tensors' device)."""
    _run("fused_sgd_", backend, params, grads, momentum_buffers, **kwargs)


def apply_masks_(tensors, masks) -> None:
    """Zero the pruned elements of ``tensors`` (one bool mask each) on the fastest backend; one
    call per device and dtype (prune_'s post-step hook for torch.optim optimizers)."""
    _run("apply_masks_", None, tensors, masks)


def sum_of_squares(tensors, *, backend=None):
    """Sum of squares of all elements of ``tensors`` (0-d fp32) on ``backend`` (default: the
    fastest for their device)."""
    return _run("sum_of_squares", backend, tensors)


# ----------------------------------------------------------------------------------------------
# RMSprop, Adafactor, Lion (issue 12)
#
# ``fused_rmsprop_``: one torch.optim.RMSprop step (alpha, eps, weight_decay, momentum, centered,
# maximize); grad_avgs empty unless centered, momentum_buffers empty unless momentum > 0.
# ``fused_adafactor_``: one torch.optim.Adafactor step; a call's params are all >= 2-D (factored:
# row_vars / col_vars one per param, variances empty) or all < 2-D (variances, row/col empty);
# eps1 is a number (the optimizer resolves torch's None). Three passes over each gradient: row /
# column statistics (+ the param's RMS), the update's RMS, the update.
# ``fused_lion_``: one Lion step (one state, exp_avg; no step counter).
# Same tail as the ops above (GradScaler, clipping, masks); references in bigkernels.reference.optim.
# ----------------------------------------------------------------------------------------------
RMSPROP_SCHEMA = (
    "(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] square_avgs, Tensor(c!)[] grad_avgs, "
    "Tensor(d!)[] momentum_buffers, Tensor(e!)[] state_steps, *, float lr, float alpha, float eps, "
    f"float weight_decay, float momentum, bool centered, bool maximize, {_COMMON_TAIL}) -> ()"
)
ADAFACTOR_SCHEMA = (
    "(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] row_vars, Tensor(c!)[] col_vars, "
    "Tensor(d!)[] variances, Tensor(e!)[] state_steps, *, float lr, float beta2_decay, float eps1, float eps2, "
    f"float d, float weight_decay, bool maximize, {_COMMON_TAIL}) -> ()"
)
LION_SCHEMA = (
    "(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, *, float lr, float beta1, float beta2, "
    f"float weight_decay, bool maximize, {_COMMON_TAIL}) -> ()"
)
_MORE_DEFS = [
    ("fused_rmsprop_", RMSPROP_SCHEMA, ref.fused_rmsprop_, "fused_rmsprop_triton_"),
    ("fused_adafactor_", ADAFACTOR_SCHEMA, ref.fused_adafactor_, "fused_adafactor_triton_"),
    ("fused_lion_", LION_SCHEMA, ref.fused_lion_, "fused_lion_triton_"),
]
for _name, _schema, _reference, _triton_name in _MORE_DEFS:
    _qual = f"{_registry.NAMESPACE}::{_name}"
    torch.library.define(_qual, _schema)
    torch.library.register_fake(_qual)(_no_output)
    torch.library.impl(_qual, "CompositeExplicitAutograd")(_reference)
    _registry.register(_registry.OpInfo(_name, _schema, _reference, triton_name=_triton_name,
                                        triton_kwargs=_masks_as_list))


def fused_rmsprop_(params, grads, square_avgs, grad_avgs, momentum_buffers, state_steps, *, backend=None,
                   **kwargs) -> None:
    """Run the RMSprop step on ``backend`` (default: the fastest for the tensors' device)."""
    _run("fused_rmsprop_", backend, params, grads, square_avgs, grad_avgs, momentum_buffers, state_steps, **kwargs)


def fused_adafactor_(params, grads, row_vars, col_vars, variances, state_steps, *, backend=None, **kwargs) -> None:
    """Run the Adafactor step on ``backend`` (default: the fastest for the tensors' device)."""
    _run("fused_adafactor_", backend, params, grads, row_vars, col_vars, variances, state_steps, **kwargs)


def fused_lion_(params, grads, exp_avgs, *, backend=None, **kwargs) -> None:
    """Run the Lion step on ``backend`` (default: the fastest for the tensors' device)."""
    _run("fused_lion_", backend, params, grads, exp_avgs, **kwargs)


# ----- AdamW8bit: AdamW with 8-bit block-quantised moments (bigkernels.optim.AdamW8bit) -----------
# ``adamw8bit_`` mutates params, exp_avgs / exp_avg_sqs (uint8 codes shaped like the params),
# exp_avg_scales / exp_avg_sq_scales (fp32, one per ``block_size`` elements) and state_steps: one
# AdamW step with dequantise -> update -> requantise in one pass. Codes, scales and rounding are
# defined exactly in bigkernels.reference.optim (every backend writes the same codes and scales bit
# for bit); GradScaler, clipping and masks as the other update ops. Unlike the ops above it takes
# plain tensors only: a DTensor param's scales are not placed like it (blocks are per shard), so
# bigkernels.optim.AdamW8bit hands the op each rank's local shards itself.
ADAMW8BIT_SCHEMA = (
    "(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, "
    "Tensor(d!)[] exp_avg_scales, Tensor(e!)[] exp_avg_sq_scales, Tensor(f!)[] state_steps, *, float lr, "
    f"float beta1, float beta2, float weight_decay, float eps, bool maximize, int block_size, {_COMMON_TAIL}) -> ()"
)
torch.library.define(f"{_registry.NAMESPACE}::adamw8bit_", ADAMW8BIT_SCHEMA)
torch.library.register_fake(f"{_registry.NAMESPACE}::adamw8bit_")(_no_output)
torch.library.impl(f"{_registry.NAMESPACE}::adamw8bit_", "CompositeExplicitAutograd")(ref.adamw8bit_)
_registry.register(_registry.OpInfo("adamw8bit_", ADAMW8BIT_SCHEMA, ref.adamw8bit_, triton_name="adamw8bit_triton_",
                                    triton_kwargs=_masks_as_list))


def adamw8bit_(params, grads, exp_avgs, exp_avg_sqs, exp_avg_scales, exp_avg_sq_scales, state_steps, *,
               backend=None, **kwargs) -> None:
    """Run the 8-bit AdamW step on ``backend`` (default: the fastest for the tensors' device)."""
    _run("adamw8bit_", backend, params, grads, exp_avgs, exp_avg_sqs, exp_avg_scales, exp_avg_sq_scales,
         state_steps, **kwargs)
