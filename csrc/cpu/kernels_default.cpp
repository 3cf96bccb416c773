// The kernels for any CPU: ATen's generic at::vec (fixed-size arrays the compiler vectorizes for
// the baseline instruction set it targets, e.g. SSE2 on x86-64, NEON on aarch64).
#define CPU_CAPABILITY DEFAULT
#define CPU_CAPABILITY_DEFAULT
#include "kernels_impl.h"
