"""``python -m bigkernels.ops.schemas OUT.cpp`` writes the TORCH_LIBRARY schema definitions of every
op, for the CMake (libtorch) build; the Python package defines them with torch.library instead."""
import os
import sys

os.environ.setdefault("BIGKERNELS_DISABLE_EXTENSION", "1")  # schemas only; no need for _C
import warnings

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from bigkernels.ops import _registry

if __name__ == "__main__":
    text = _registry.cpp_schema_registrations()
    if len(sys.argv) > 1:
        with open(sys.argv[1], "w") as f:
            f.write(text)
    else:
        sys.stdout.write(text)
