"""Which layers of a model are linear-like, and which of them the model-level calls
(``quantize_``, ``prune_``, ``sparsify_``, ``share_weights_``) touch by default.

This is the one place that knows about foreign layer types (Hugging Face ``Conv1D``, the
transposed linear of GPT-2) and about output heads and tied weights; every model-level call
selects its layers through :func:`select`.

Linear-like layers: ``nn.Linear`` and its subclasses, and ``transformers.pytorch_utils.Conv1D``
(weight stored as [in, out], ``y = x @ W + b``) — recognised by type name and module so that
importing bigkernels never imports transformers.

Left alone by default (``filter_fn`` overrides, it sees every linear-like layer):
- output heads: the layer that produces the logits — ``model.get_output_embeddings()`` where the
  model has it (Hugging Face models), a linear-like layer whose weight is an ``nn.Embedding``'s
  weight (tied), or a linear-like layer outside any numbered block (no ``.<digit>`` in its name)
  whose weight has an embedding's shape [num_embeddings, embedding_dim] (a projection back to the
  vocabulary);
- layers whose weight parameter is shared with another module (tied weights): converting one
  of them would untie the pair and keep both copies.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional, Tuple

from torch import Tensor, nn

FilterFn = Callable[[nn.Module, str], bool]

_NUMBERED = re.compile(r"(^|\.)\d+(\.|$)")


def is_conv1d(module: nn.Module) -> bool:
    """Hugging Face's ``Conv1D`` (GPT-2 and relatives): a linear layer with a transposed weight."""
    cls = type(module)
    return any(c.__name__ == "Conv1D" and c.__module__.startswith("transformers") for c in cls.__mro__)


def is_linear_like(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or is_conv1d(module)


def features(module: nn.Module) -> Tuple[int, int]:
    """(in_features, out_features) of a linear-like layer."""
    if is_conv1d(module):
        in_f, out_f = module.weight.shape
        return int(in_f), int(out_f)
    return module.in_features, module.out_features


def linear_weight(module: nn.Module) -> Tensor:
    """The weight as ``nn.Linear`` stores it, [out_features, in_features] (a view for Conv1D)."""
    return module.weight.t() if is_conv1d(module) else module.weight


@dataclass
class Selection:
    """Result of :func:`select`: the layers to touch, and the linear-like layers left alone with why."""
    targets: Dict[str, nn.Module] = field(default_factory=dict)
    skipped: Dict[str, str] = field(default_factory=dict)


def _shared_weights(model: nn.Module) -> Dict[int, int]:
    """id(parameter) -> number of modules that hold it as a direct parameter."""
    count: Dict[int, int] = {}
    for module in model.modules():
        for p in module.parameters(recurse=False):
            count[id(p)] = count.get(id(p), 0) + 1
    return count


def output_heads(model: nn.Module) -> Dict[int, str]:
    """id(module) -> why it counts as an output head (see the module docstring)."""
    heads: Dict[int, str] = {}
    get_out = getattr(model, "get_output_embeddings", None)
    if callable(get_out):
        try:
            out = get_out()
        except (NotImplementedError, AttributeError):
            out = None
        if isinstance(out, nn.Module):
            heads[id(out)] = "output head (get_output_embeddings)"
    embeddings = [m for m in model.modules() if isinstance(m, nn.Embedding)]
    emb_weights = {id(e.weight) for e in embeddings}
    emb_shapes = {(e.num_embeddings, e.embedding_dim) for e in embeddings}
    for fqn, m in model.named_modules():
        if id(m) in heads or not is_linear_like(m) or not isinstance(getattr(m, "weight", None), Tensor):
            continue
        if id(m.weight) in emb_weights:
            heads[id(m)] = "output head (weight tied to an embedding)"
        elif not _NUMBERED.search(fqn) and tuple(linear_weight(m).shape) in emb_shapes:
            heads[id(m)] = "output head (projects onto an embedding's vocabulary)"
    return heads


def select(model: nn.Module, filter_fn: Optional[FilterFn] = None, *, skip_heads: bool = True,
           accept: Optional[Callable[[nn.Module], bool]] = None) -> Selection:
    """The linear-like layers of ``model`` (the root included, under the name ``""``) to touch.

    With ``filter_fn`` given, it alone decides (it is called for every linear-like layer, heads
    and tied layers included). Without it, output heads (when ``skip_heads``) and layers with a
    weight shared with another module are left alone. ``accept`` narrows the candidates further
    (e.g. only layers that carry a pruning mask) without reporting the others.
    """
    sel = Selection()
    heads = output_heads(model) if filter_fn is None and skip_heads else {}
    shared = _shared_weights(model) if filter_fn is None else {}
    for fqn, m in model.named_modules():
        if not is_linear_like(m) or (accept is not None and not accept(m)):
            continue
        if filter_fn is not None:
            if filter_fn(m, fqn):
                sel.targets[fqn] = m
            else:
                sel.skipped[fqn] = "filter_fn returned False"
        elif id(m) in heads:
            sel.skipped[fqn] = heads[id(m)]
        elif shared.get(id(getattr(m, "weight", None)), 0) > 1:
            sel.skipped[fqn] = "weight shared with another module (tied)"
        else:
            sel.targets[fqn] = m
    return sel


def set_submodule(model: nn.Module, fqn: str, module: nn.Module) -> None:
    """Replace the submodule at ``fqn`` (not the root: a root module cannot be replaced in place)."""
    if not fqn:
        raise ValueError("cannot replace the root module in place")
    parent_name, _, child = fqn.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)
