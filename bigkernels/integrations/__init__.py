"""Integrations with other libraries, each loaded only when that library is in use.

``transformers`` (:mod:`bigkernels.integrations.transformers`): a Hugging Face model compressed by
bigkernels records its compressed layers in ``config.quantization_config`` (quant_method
``"bigkernels"``), so ``save_pretrained`` saves them and, after ``import bigkernels``,
``from_pretrained`` loads the model back compressed. ``import bigkernels`` never imports
transformers: :func:`install` registers the integration the moment transformers' own quantizer
table (``transformers.quantizers.auto``) is imported, or at once if it already is.
"""
from __future__ import annotations

import importlib.abc
import sys
import warnings

_HF_QUANTIZERS = "transformers.quantizers.auto"


def model_changed(model) -> None:
    """Called by every model-level call that changed ``model`` (see ``nn._layers.report``): a
    Hugging Face model — ``model`` itself, or the outermost ones inside it — gets its
    ``quantization_config`` brought up to date."""
    modeling = sys.modules.get("transformers.modeling_utils")
    if modeling is None:
        return
    from bigkernels.integrations import transformers as hf

    if isinstance(model, modeling.PreTrainedModel):
        hf.record(model)
        return
    inside = []
    for fqn, m in model.named_modules():
        if isinstance(m, modeling.PreTrainedModel) and not any(fqn.startswith(p + ".") for p in inside):
            inside.append(fqn)
            hf.record(m)


def _register_transformers() -> None:
    try:
        from bigkernels.integrations import transformers as hf

        hf.register()
    except Exception as e:  # never break the user's `import transformers`
        warnings.warn(f"bigkernels: could not register its transformers integration (saving and loading "
                      f"compressed Hugging Face models will not work): {type(e).__name__}: {e}")


class _Loader(importlib.abc.Loader):
    """Runs the real loader, puts it back on the module, then calls ``after``."""

    def __init__(self, loader, after):
        self.loader, self.after = loader, after

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        spec = module.__spec__
        spec.loader = module.__loader__ = self.loader
        self.loader.exec_module(module)
        self.after()

    def __getattr__(self, name):
        return getattr(self.loader, name)


class _AfterImport(importlib.abc.MetaPathFinder):
    """Calls ``after()`` once module ``name`` has been imported (by anyone), then removes itself."""

    def __init__(self, name: str, after):
        self.name, self.after = name, after

    def find_spec(self, fullname, path, target=None):
        if fullname != self.name:
            return None
        for finder in sys.meta_path:
            find = getattr(finder, "find_spec", None)
            if finder is self or find is None:
                continue
            spec = find(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        self.remove()
        if spec.loader is not None and hasattr(spec.loader, "exec_module"):
            spec.loader = _Loader(spec.loader, self.after)
        return spec

    def remove(self) -> None:
        if self in sys.meta_path:
            sys.meta_path.remove(self)


def install() -> None:
    """Register the transformers integration now if transformers' quantizer table is imported,
    else when it is (no import of transformers here)."""
    if _HF_QUANTIZERS in sys.modules:
        _register_transformers()
    elif not any(isinstance(f, _AfterImport) and f.name == _HF_QUANTIZERS for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterImport(_HF_QUANTIZERS, _register_transformers))
