// The Python module pyeuler._C (or the JIT-built equivalent): loading it registers the
// pyeuler::cuda_* ops (ops.cpp); the module itself only reports how it was built.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <vector>

#include "pyeuler_kernels.h"

namespace {

// Compute capabilities (e.g. 80, 90) the kernels were compiled for.
std::vector<int> compiled_archs() {
  std::vector<int> archs(16);
  archs.resize(pyeuler_compiled_archs(archs.data(), int(archs.size())));
  return archs;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "pyeuler CUDA kernels (registers the torch.ops.pyeuler.cuda_* ops)";
  m.def("compiled_archs", &compiled_archs,
        "Compute capabilities (major * 10 + minor) the kernels were compiled for");
}
