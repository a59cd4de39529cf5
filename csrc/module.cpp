// bigkernels._C: an empty Python module. Importing it runs the static TORCH_LIBRARY_IMPL
// registrations of every kernel linked into it; no function is exposed through Python's C API
// (raw pybind11 entry points graph-break under torch.compile). Built against Python's limited
// API so one abi3 wheel serves every CPython >= 3.9.
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
