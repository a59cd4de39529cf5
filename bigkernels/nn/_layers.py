"""Which layers of a model are linear-like, which of them the model-level calls (``quantize_``,
``prune_``, ``sparsify_``, ``share_weights_``) touch, how each call reports what it did, and the
table of compressed layer types that saving and loading whole models goes by.

This is the one place that knows about foreign layer types (Hugging Face ``Conv1D``, the
transposed linear of GPT-2), output heads and tied weights; every model-level call selects its
layers through :func:`select` and reports through :func:`report`.

Linear-like layers: ``nn.Linear`` and its subclasses, and ``transformers.pytorch_utils.Conv1D``
(weight stored as [in, out], ``y = x @ W + b``) — recognised by type name and module so that
importing bigkernels never imports transformers.

Left alone by default (``filter_fn`` overrides: it sees every linear-like layer):
- tied layers: a layer whose weight parameter is shared with another module (GPT-2's and tied
  Llama's ``lm_head``, BERT's MLM decoder). Converting one would untie the pair and keep both
  copies, so the calls that *replace* layers (``quantize_``, ``sparsify_``) never do, even when
  ``filter_fn`` picks one (they warn and leave it); ``prune_`` masks a tied weight in place only
  when ``filter_fn`` asks for it (the embedding is pruned with it);
- output heads, for the calls that ask (``prune_``): the layer that produces the logits —
  ``model.get_output_embeddings()`` (Hugging Face models), a layer tied to an ``nn.Embedding``,
  on other models a layer outside numbered blocks (no ``.<digit>`` in its name) projecting onto
  a (non-square) embedding's vocabulary, and on Hugging Face models the layer holding the
  model's last parameter outside numbered blocks (classification heads such as BERT's ``classifier``; transformers' own
  quantizers leave that one alone too);
- ``nn.MultiheadAttention``'s ``out_proj`` (``NonDynamicallyQuantizableLinear``), for the calls
  that replace layers: the attention reads its weight directly (torchao skips it too).

Embeddings (``nn.Embedding``) are not linear-like: no call touches them.
"""
from __future__ import annotations

import logging
import re
import sys
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn

FilterFn = Callable[[nn.Module, str], bool]

_NUMBERED = re.compile(r"(^|\.)\d+(\.|$)")

# --------------------------------------------------------------------------------------------
# logging: what each model-level call converted
# --------------------------------------------------------------------------------------------
logger = logging.getLogger("bigkernels")


class _WhenUnconfigured(logging.StreamHandler):
    """Shows bigkernels' records on stderr while the application has not configured logging
    (no handler on the root logger: plain scripts, notebooks). Once it has, records reach its
    handlers through propagation only, so nothing is printed twice."""

    def emit(self, record: logging.LogRecord) -> None:
        if not logging.getLogger().handlers:
            super().emit(record)


if not any(isinstance(h, _WhenUnconfigured) for h in logger.handlers):
    _handler = _WhenUnconfigured(sys.stderr)
    _handler.setFormatter(logging.Formatter("bigkernels: %(message)s"))
    logger.addHandler(_handler)
if logger.level == logging.NOTSET:
    # The one-line reports are INFO: visible by default; logging.getLogger("bigkernels")
    # .setLevel(logging.WARNING) silences them.
    logger.setLevel(logging.INFO)


# --------------------------------------------------------------------------------------------
# linear-like layers
# --------------------------------------------------------------------------------------------
def is_conv1d(module: nn.Module) -> bool:
    """Hugging Face's ``Conv1D`` (GPT-2 and relatives): a linear layer with a transposed weight."""
    return any(c.__name__ == "Conv1D" and c.__module__.startswith("transformers") for c in type(module).__mro__)


def is_linear_like(module: nn.Module) -> bool:
    return (isinstance(module, nn.Linear) or is_conv1d(module)) and isinstance(getattr(module, "weight", None), Tensor)


def features(module: nn.Module) -> Tuple[int, int]:
    """(in_features, out_features) of a linear-like layer."""
    if is_conv1d(module):
        in_f, out_f = module.weight.shape
        return int(in_f), int(out_f)
    return module.in_features, module.out_features


def linear_weight(module: nn.Module) -> Tensor:
    """The weight as ``nn.Linear`` stores it, [out_features, in_features] (a view for Conv1D)."""
    return module.weight.t() if is_conv1d(module) else module.weight


def to_weight_layout(module: nn.Module, t: Tensor) -> Tensor:
    """A tensor shaped like :func:`linear_weight` ([out, in]) in the layout of ``module.weight``
    itself (transposed for Conv1D), contiguous."""
    return (t.t() if is_conv1d(module) else t).contiguous()


def kind(module: nn.Module) -> str:
    """The layer's type as users know it, for messages: ``nn.Linear``, ``Conv1D``, ``MyLinear(nn.Linear)``."""
    cls = type(module)
    if cls is nn.Linear:
        return "nn.Linear"
    if is_conv1d(module) or not isinstance(module, nn.Linear):
        return cls.__name__
    return f"{cls.__name__}(nn.Linear)"


# --------------------------------------------------------------------------------------------
# compressed layer types: one entry per type, for selection and for saving / loading models
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CompressedType:
    """One kind of compressed linear layer, as saved in a whole-model checkpoint.

    ``name`` is stored in saved configs (keep it stable). ``detect(module)`` says whether a
    module is of this kind (the first entry that detects a module wins). ``describe(module)``
    returns a JSON-able dict from which ``build`` can make an empty layer whose tensors have
    exactly the saved names, shapes and dtypes. ``build(layer, spec, dtype)`` gets the float
    layer the model's own ``__init__`` created at that place (usually on the meta device),
    the spec and the float dtype the model is loaded in, and returns the module to put there
    (a new one, on ``layer``'s device, or ``layer`` itself, modified). ``loaded(module)``, if
    given, runs once the checkpoint's tensors are in place.
    """
    name: str
    detect: Callable[[nn.Module], bool]
    describe: Callable[[nn.Module], Dict[str, Any]]
    build: Callable[[nn.Module, Dict[str, Any], torch.dtype], nn.Module]
    loaded: Optional[Callable[[nn.Module], None]] = None


COMPRESSED: Dict[str, CompressedType] = {}


def register_compressed(entry: CompressedType) -> CompressedType:
    """Add (or replace, by name) a compressed layer type; returns it."""
    COMPRESSED[entry.name] = entry
    return entry


def compressed_type(module: nn.Module) -> Optional[CompressedType]:
    """The registered type that detects ``module``, or None."""
    for entry in COMPRESSED.values():
        if entry.detect(module):
            return entry
    return None


def compressed_layers(model: nn.Module) -> Dict[str, Tuple[CompressedType, nn.Module]]:
    """fqn -> (type, module) for every compressed layer of ``model`` (pruned layers included)."""
    found = {}
    for fqn, m in model.named_modules():
        entry = compressed_type(m)
        if entry is not None:
            found[fqn] = (entry, m)
    return found


# --------------------------------------------------------------------------------------------
# selection
# --------------------------------------------------------------------------------------------
@dataclass
class Selection:
    """Result of :func:`select`.

    ``targets``: linear-like layers to convert. ``converted``: layers that are already of a
    compressed layer class (QuantLinear, SparseLinear, ...) and were chosen — each call decides
    what that means for it. ``skipped``: linear-like layers left alone, with why (reported at
    INFO). ``refused``: layers ``filter_fn`` chose that cannot be converted, with why (warned).
    """
    targets: Dict[str, nn.Module] = field(default_factory=dict)
    converted: Dict[str, nn.Module] = field(default_factory=dict)
    skipped: Dict[str, str] = field(default_factory=dict)
    refused: Dict[str, str] = field(default_factory=dict)


def _shared_weights(model: nn.Module) -> Dict[int, List[str]]:
    """id(parameter) -> the modules that hold it as a direct parameter (by name)."""
    holders: Dict[int, List[str]] = {}
    for fqn, module in model.named_modules():
        for p in module.parameters(recurse=False):
            holders.setdefault(id(p), []).append(fqn)
    return holders


def output_heads(model: nn.Module) -> Dict[int, str]:
    """id(module) -> why it counts as an output head (see the module docstring)."""
    heads: Dict[int, str] = {}
    get_out = getattr(model, "get_output_embeddings", None)
    is_hf = callable(get_out) and hasattr(model, "config")
    if callable(get_out):
        try:
            out = get_out()
        except (NotImplementedError, AttributeError):
            out = None
        if isinstance(out, nn.Module):
            heads[id(out)] = "output head: get_output_embeddings()"
    embeddings = [m for m in model.modules() if isinstance(m, nn.Embedding)]
    emb_weights = {id(e.weight) for e in embeddings}
    # (the shape rule is for models without get_output_embeddings; a square embedding's shape is
    # also a hidden -> hidden layer's)
    emb_shapes = set() if is_hf else {(e.num_embeddings, e.embedding_dim) for e in embeddings
                                      if e.num_embeddings != e.embedding_dim}
    for fqn, m in model.named_modules():
        if id(m) in heads or not is_linear_like(m):
            continue
        if id(m.weight) in emb_weights:
            heads[id(m)] = "output head: tied to an embedding"
        elif not _NUMBERED.search(fqn) and tuple(linear_weight(m).shape) in emb_shapes:
            heads[id(m)] = "output head: projects onto an embedding's vocabulary"
    if is_hf:
        params = list(model.named_parameters())
        if params:
            owner = params[-1][0].rpartition(".")[0]
            m = model.get_submodule(owner) if owner else model
            if is_linear_like(m) and not _NUMBERED.search(owner) and id(m) not in heads:
                heads[id(m)] = "output head: the model's last layer"
    return heads


def select(model: nn.Module, filter_fn: Optional[FilterFn] = None, *, call: str, skip_heads: bool = True,
           replace: bool = True, accept: Optional[Callable[[nn.Module], bool]] = None) -> Selection:
    """The layers of ``model`` (the root included, under the name ``""``) that call ``call``
    converts.

    With ``filter_fn`` given, it alone chooses (it is called for every linear-like and every
    compressed layer, heads and tied layers included), except that a call that replaces layers
    (``replace``) never converts a tied layer or ``nn.MultiheadAttention``'s ``out_proj``
    (``refused``, warned by :func:`report`). Without it, output heads (when ``skip_heads``) and
    tied layers are left alone. ``accept`` narrows the candidates further (e.g. only layers
    that carry a pruning mask) without reporting the others. A replacing call whose model is
    itself a linear layer raises (a module cannot replace itself in place).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"{call}: expected an nn.Module, got {type(model).__name__}")
    if filter_fn is not None and not callable(filter_fn):
        raise TypeError(f"{call}: filter_fn must be a callable (module, fqn) -> bool, got {type(filter_fn).__name__}")
    sel = Selection()
    heads = output_heads(model) if skip_heads else {}
    holders = _shared_weights(model)
    for fqn, m in model.named_modules():
        linear = is_linear_like(m)
        compressed = not linear and compressed_type(m) is not None
        if not (linear or compressed) or (accept is not None and not accept(m)):
            continue
        name = fqn or "<model>"
        if filter_fn is not None and not filter_fn(m, fqn):
            sel.skipped[name] = "filter_fn returned False"
            continue
        if compressed:
            sel.converted[fqn] = m
            continue
        tied = [h or "<model>" for h in holders.get(id(m.weight), []) if h != fqn]
        why = None
        if tied:
            why = f"weight tied to {', '.join(tied)}"
        elif replace and isinstance(m, nn.modules.linear.NonDynamicallyQuantizableLinear):
            why = "nn.MultiheadAttention reads this weight directly"
        if filter_fn is None and id(m) in heads:
            sel.skipped[name] = heads[id(m)]
        elif why is not None and (replace or filter_fn is None):
            if filter_fn is None:
                sel.skipped[name] = why
            else:
                sel.refused[name] = f"{why}: replacing it would untie it and keep both copies" if tied else why
        else:
            sel.targets[fqn] = m
    if replace and "" in sel.targets:
        raise ValueError(f"{call}: the model is itself a linear layer ({kind(model)}); a module cannot be replaced "
                         f"in place. Convert it with the layer's from_linear (e.g. bigkernels.nn.QuantLinear."
                         f"from_linear(layer)), or pass a model that contains it")
    return sel


def set_submodule(model: nn.Module, fqn: str, module: nn.Module) -> None:
    """Replace the submodule at ``fqn`` (not the root: a root module cannot be replaced in place)."""
    if not fqn:
        raise ValueError("cannot replace the root module in place")
    parent_name, _, child = fqn.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def replace_each(call: str, model: nn.Module, layers: Dict[str, nn.Module],
                 make: Callable[[str, nn.Module], nn.Module]) -> List[str]:
    """Replace each of ``layers`` (fqn -> layer of ``model``) by ``make(fqn, layer)``, one at a
    time (each float layer can be freed as soon as its replacement is in); an error is annotated
    with the layer's name. Returns the names replaced."""
    done = []
    for fqn, layer in layers.items():
        try:
            new = make(fqn, layer)
        except Exception as e:
            e.add_note(f"{call}: while converting layer {fqn!r} ({kind(layer)})")
            raise
        set_submodule(model, fqn, new)
        done.append(fqn)
    return done


# --------------------------------------------------------------------------------------------
# reporting
# --------------------------------------------------------------------------------------------
def names(fqns, limit: int = 4) -> str:
    """``a, b, c, d and 5 more`` (layer names for a message)."""
    fqns = [f or "<model>" for f in fqns]
    if len(fqns) <= limit:
        return ", ".join(fqns)
    return f"{', '.join(fqns[:limit])} and {len(fqns) - limit} more"


def _by_reason(reasons: Dict[str, str]) -> str:
    groups: Dict[str, List[str]] = {}
    for fqn, why in reasons.items():
        groups.setdefault(why, []).append(fqn)
    return "; ".join(f"{names(fqns)} ({why})" for why, fqns in groups.items())


def report(call: str, did: str, done: List[str], sel: Selection, extra_skipped: Optional[Dict[str, str]] = None,
           model: Optional[nn.Module] = None) -> None:
    """One INFO line saying what ``call`` did (``did``: e.g. "QuantLinear(w8a8)") to which
    layers and what it left alone; a warning for layers ``filter_fn`` chose that could not be
    converted, and one when nothing was converted. ``model``, if given, is a model the call
    changed: a Hugging Face model gets its saved config updated (see bigkernels.integrations)."""
    skipped = dict(sel.skipped)
    skipped.update(extra_skipped or {})
    if sel.refused:
        warnings.warn(f"{call}: left alone although filter_fn chose them: {_by_reason(sel.refused)}", stacklevel=3)
    if done:
        line = f"{call}: {len(done)} layer{'s' if len(done) != 1 else ''} -> {did}: {names(done)}"
        if skipped:
            line += f"; left alone: {_by_reason(skipped)}"
        logger.info(line)
    else:
        why = _by_reason(skipped) if skipped else "the model has no linear layer (nn.Linear, Conv1D) to convert"
        warnings.warn(f"{call}: converted no layer; {why}", stacklevel=3)
    if model is not None and done:
        from bigkernels import integrations

        integrations.model_changed(model)
