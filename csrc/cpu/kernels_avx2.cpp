// The kernels for x86-64 CPUs with AVX2 + FMA + F16C (Haswell, Zen and later).
//
// Portability decision (ATen's scheme): instead of compiling the whole extension with -mavx2, which
// would crash with SIGILL on an older CPU, only this unit is built for AVX2: setup.py compiles it
// with "-mavx2 -mfma -mf16c -mbmi -mbmi2 -mpopcnt -DCPU_CAPABILITY=AVX2 -DCPU_CAPABILITY_AVX2" on
// x86-64, and ops.cpp calls into it only after checking at run time that the CPU supports those
// instructions (and that torch's own dispatch, ATEN_CPU_CAPABILITY, allows AVX2). The unit has no
// static initializers, so loading it on any CPU is safe. Built without those flags (another
// architecture, a compiler that rejects them), it yields an empty table and the DEFAULT kernels run.
#if defined(CPU_CAPABILITY_AVX2)
#include "kernels_impl.h"
#else
#include "kernels.h"
const mpvg::cpu::KernelTable* mpvg::cpu::kernels_AVX2() { return nullptr; }
#endif
