// Compile what follows, up to avx2_target_pop.h, for AVX2 + FMA + F16C (x86-64). Included
// after every standard header by the *_avx2.cpp kernel builds, so only their own
// (internal-linkage) kernels get the target: the extension itself is built for the
// baseline ISA and picks these at run time.
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma,f16c"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#endif
