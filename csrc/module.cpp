// Makes the extension importable as kt_ops._C; importing it runs the static registrations
// of csrc/registration.cpp. The ops are reached through torch.ops.kt, not this module.
#include <Python.h>

PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}
