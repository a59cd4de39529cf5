// bigkernels._C: an empty Python module. Importing it runs the static STABLE_TORCH_LIBRARY_IMPL
// registrations of every CPU kernel linked into it (the CUDA kernels are a separate op library,
// bigkernels._C_cuda, loaded by bigkernels/ops/_extension.py under a CUDA torch); no function is
// exposed through Python's C API (raw pybind11 entry points graph-break under torch.compile).
// Built against Python's limited API and the LibTorch stable ABI, so one abi3 wheel serves every
// CPython >= 3.10 and every torch >= 2.10 (setup.py).
#include <Python.h>

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      "_C",  // name
      "bigkernels compiled kernels (registered with the PyTorch dispatcher on import)",
      -1,    // size
      nullptr,
  };
  return PyModule_Create(&module_def);
}
}
