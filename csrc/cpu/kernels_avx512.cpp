// The kernels for x86-64 CPUs with AVX-512 F/BW/VL/DQ (Skylake-SP, Ice Lake, Zen 4 and later).
// Same scheme as kernels_avx2.cpp: setup.py adds "-mavx512f -mavx512bw -mavx512vl -mavx512dq" (plus
// the AVX2 flags) and -DCPU_CAPABILITY=AVX512 -DCPU_CAPABILITY_AVX512 for this unit only, ops.cpp
// checks the CPU before the first call, and without those flags the table is empty.
#if defined(CPU_CAPABILITY_AVX512)
#include "kernels_impl.h"
#else
#include "kernels.h"
const mpvg::cpu::KernelTable* mpvg::cpu::kernels_AVX512() { return nullptr; }
#endif
