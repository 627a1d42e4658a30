// What this build of the kernels contains, for diagnostics in pyeuler.cuda.is_available().
#include "pyeuler_kernels.h"

extern "C" int pyeuler_compiled_archs(int* archs, int capacity) {
  // nvcc defines __CUDA_ARCH_LIST__ (e.g. 800,900) in every compilation pass.
  static const int kArchs[] = {__CUDA_ARCH_LIST__};
  const int count = int(sizeof(kArchs) / sizeof(kArchs[0]));
  for (int i = 0; i < count && i < capacity; ++i) archs[i] = kArchs[i] / 10;
  return count;
}
