// The op schemas of the C++ CPU backend (namespace sae_kernels_cpp; implementations in encode.cpp and
// sparse.cpp). Outputs are allocated by the caller (kernels/*.py) and written in place: every element of
// every output is written, so NaN-poisoned buffers show an unwritten one.
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(sae_kernels_cpp, m) {
  m.def("topk_select(Tensor x, Tensor W, Tensor? b, int k, Tensor(a!) values, Tensor(b!) indices) -> ()");
  m.def(
      "threshold_select(int mode, Tensor x, Tensor W, Tensor? b, Tensor? theta, Tensor? r_mag, Tensor? b_mag, "
      "float half_band, Tensor(a!) values, Tensor(b!)? gate, Tensor(c!) aux, Tensor(d!) indices, "
      "Tensor(e!) counts) -> ()");
  m.def("gather_matmul(Tensor values, Tensor indices, Tensor W, Tensor? bias, Tensor(a!) out) -> ()");
  m.def("gather_dot(Tensor g, Tensor indices, Tensor W, Tensor(a!) out) -> ()");
  m.def("scatter_rows(Tensor coef, Tensor indices, Tensor X, int n, Tensor(a!) dW, Tensor(b!) dsum) -> ()");
  m.def("prefix_norms(Tensor values, Tensor indices, Tensor W, Tensor r0, Tensor(a!) E) -> ()");
  m.def(
      "prefix_norms_backward(Tensor values, Tensor indices, Tensor W, Tensor r0, Tensor grad, Tensor(a!) dv, "
      "Tensor(b!) dr0, Tensor(c!) S) -> ()");
}

// `import kernels._C` loads the library, which registers the ops above; the module itself is empty.
static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&module_def); }
