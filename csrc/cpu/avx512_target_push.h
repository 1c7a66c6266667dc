// Compile what follows, up to avx512_target_pop.h, for AVX-512 (F, BW, DQ, VL) with AVX2,
// FMA and F16C (x86-64), on 256-bit vectors: AVX-512's 32 registers, masks and
// instructions at the AVX2 build's width. Measured on an Intel Xeon (Sapphire Rapids
// class, 1 thread, LSTM cell, B = 16, H = 128 / 512): fwd 20.8 / 53.2 us (AVX2) ->
// 18.6 / 45.6, bwd 16.4 / 47.2 -> 14.3 / 40.2; 512-bit vectors made the forward slower
// (22.5 / 60.2: its sigmoid divisions) for a faster backward (12.0 / 32.6), a loss in sum.
// As avx2_target_push.h: included after every standard header by the *_avx512.cpp
// builds, whose kernels are picked at run time when the CPU has these instructions.
// Clang's target attribute takes no vector width (it may use 512 bits); the extension
// is built with gcc (setup.py, torch's toolchain).
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx2,fma,f16c"))), \
                             apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512dq,avx512vl,avx2,fma,f16c,prefer-vector-width=256")
#endif
