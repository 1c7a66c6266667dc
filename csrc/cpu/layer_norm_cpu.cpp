// The norm family on the CPU (LayerNorm, RMSNorm, add + norm): the torch side
// (threads, dtypes, parameters) of the row kernels in row_kernels_impl.h.
//
// Forward: rows split across threads (at::parallel_for); each row's mean and
// centered sum of squares, then y, all accumulated in acc_t (float32, float64 for
// double input). Backward: rows are cut
// into a number of blocks fixed by M and N alone, never by the thread count; each
// block writes dx and its own partial dweight/dbias, and the partials are summed in
// block order, so the gradients are bitwise reproducible on any number of threads.
#include "../layer_norm.h"
#include "row_kernels.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>

namespace ln_ext {
namespace cpu {

bool cpu_isa_capped_at(const char* isa) {
  const char* cap = std::getenv("LN_EXT_CPU_ISA");
  return cap != nullptr && std::strcmp(cap, isa) == 0;
}

bool cpu_has_avx512() {
#ifdef LN_EXT_CPU_AVX2
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl");
#else
  return false;
#endif
}

const RowKernels& row_kernels() {
  static const RowKernels chosen = [] {
#ifdef LN_EXT_CPU_AVX2
    if (!cpu_isa_capped_at("generic") && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
        __builtin_cpu_supports("f16c")) {
      return cpu_has_avx512() && !cpu_isa_capped_at("avx2") ? row_kernels_avx512() : row_kernels_avx2();
    }
#endif
    return row_kernels_generic();
  }();
  return chosen;
}

}  // namespace cpu

namespace {

cpu::Elem elem_of(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return cpu::Elem::f32;
    case at::kDouble: return cpu::Elem::f64;
    case at::kHalf: return cpu::Elem::f16;
    case at::kBFloat16: return cpu::Elem::bf16;
    default: TORCH_CHECK(false, "ln_ext.layer_norm: unsupported dtype ", t);
  }
}

// A parameter for the row kernels, which read weight and bias in one dtype: p itself (the
// op made it contiguous), or, absent, `fill` (1 for weight, 0 for bias) in `dtype`, the
// other parameter's (exact in any) or the accumulation type.
at::Tensor param_or_fill(const at::Tensor& p, int64_t n, double fill, const at::Tensor& x, at::ScalarType dtype) {
  return p.defined() ? p : at::full({n}, fill, x.options().dtype(dtype));
}

at::ScalarType acc_type(at::ScalarType x) { return x == at::kDouble ? at::kDouble : at::kFloat; }

// The parameters' dtype for the row kernels: a 16-bit weight and bias are converted to
// float32 once per call when the call has enough rows, instead of once per row in the
// kernels (the conversion is exact, so the result is the same bits): 2 threads of an AMD
// EPYC, 2^23 elements, N 256-4096, bf16 / f16: forward 5-18% faster, backward up to 12%
// (AVX2 and AVX-512 builds). The threshold keeps the two extra tensor ops (~3 us) out of
// calls of few rows, where the per-row conversions they save cost about as much.
at::ScalarType row_param_dtype(at::ScalarType p, int64_t rows) {
  constexpr int64_t kMinRowsToConvert = 64;
  const bool reduced = p == at::kHalf || p == at::kBFloat16;
  return reduced && rows >= kMinRowsToConvert ? at::kFloat : p;
}
at::Tensor as_dtype(const at::Tensor& p, at::ScalarType dtype) {
  return p.defined() && p.scalar_type() != dtype ? p.to(dtype) : p;
}

// Row blocks of the backward: enough for many threads, few enough that the
// partial sums (2 * N acc_t per block: zeroed, added to row by row, read back) stay
// small next to the rows — at least 128 bytes of x per column per block, so the
// partials cost ~6% of the traffic — and that a block is worth a thread (a few
// rows would otherwise cost more in zeroing and adding partials than in the rows
// themselves). Depends on M, N and x's dtype only.
int64_t bwd_blocks(int64_t rows, int64_t cols, int64_t x_elem_size) {
  constexpr int64_t kMaxBlocks = 64;
  constexpr int64_t kMinBlockColumnBytes = 128;
  constexpr int64_t kMinBlockElements = int64_t{1} << 16, kMinPairElements = int64_t{1} << 15;
  const int64_t by_traffic = rows * x_elem_size / kMinBlockColumnBytes;
  const int64_t by_work = rows * cols / kMinBlockElements;
  const int64_t blocks = std::max<int64_t>(1, std::min({kMaxBlocks, by_traffic, by_work}));
  // Few rows: two blocks (a second thread) wherever each holds kMinPairElements, whatever the
  // partials' share: bf16 backward op, 2 threads, [16, 4096] 36 -> 25 us, [64, 4096] 110 -> 71,
  // [8, 16384] 78 -> 57; one thread pays 1-5%; [16, 1024] stays one block (13 vs 17 us).
  return blocks == 1 && rows >= 2 && rows * cols >= 2 * kMinPairElements ? 2 : blocks;
}

// An output that, with the input it is computed from, outgrows a last-level cache (16 MiB:
// half of a 32 MiB L3) would only pass through it: stored around the caches it costs no
// read-for-ownership, a third of a float forward's traffic (2 threads of an AMD EPYC,
// [2048, 4096] float32 forward: 1.07 -> 1.39x torch; 16-bit y, narrowed then streamed: bf16
// 1.22 -> 1.04 ms with AVX-512, f16 1.24 -> 0.87 with AVX2, no change at N <= 1024).
bool streams(const at::Tensor& out) {
  constexpr int64_t kStreamMinBytes = int64_t{16} << 20;
  return out.defined() && out.nbytes() >= kStreamMinBytes;
}

// At least this many elements of work per thread before a loop is split.
constexpr int64_t kGrainElements = 8192;

}  // namespace

void norm_fwd_cpu_kernel(const NormFwdArgs& a) {
  const int64_t N = a.cols;
  const auto acc = acc_type(a.x.scalar_type());
  const auto p_dtype = row_param_dtype(
      a.weight.defined() ? a.weight.scalar_type() : a.bias.defined() ? a.bias.scalar_type() : acc, a.rows);
  const at::Tensor w = param_or_fill(as_dtype(a.weight, p_dtype), N, 1.0, a.x, p_dtype);
  const at::Tensor b = a.centered ? param_or_fill(as_dtype(a.bias, p_dtype), N, 0.0, a.x, p_dtype) : at::Tensor();
  cpu::FwdCall call;
  call.x_t = elem_of(a.x.scalar_type());
  call.p_t = elem_of(p_dtype);
  call.y_t = elem_of(a.y.scalar_type());
  call.h_t = a.h.defined() ? elem_of(a.h.scalar_type()) : call.x_t;
  call.centered = a.centered;
  call.x = a.x.const_data_ptr();
  call.residual = a.residual.defined() ? a.residual.const_data_ptr() : nullptr;
  call.h = a.h.defined() ? a.h.mutable_data_ptr() : nullptr;
  call.w = w.const_data_ptr();
  call.weight_offset = a.weight_offset;
  call.b = b.defined() ? b.const_data_ptr() : nullptr;
  call.y = a.y.mutable_data_ptr();
  call.mean = a.mean.defined() ? a.mean.mutable_data_ptr() : nullptr;
  call.rstd = a.rstd.mutable_data_ptr();
  call.n = N;
  call.eps = a.eps;
  call.stream_y = streams(a.y);
  const auto& k = cpu::row_kernels();
  const int64_t grain = std::max<int64_t>(1, kGrainElements / N);
  at::parallel_for(0, a.rows, grain, [&](int64_t begin, int64_t end) { k.fwd(call, begin, end); });
}

void norm_bwd_cpu_kernel(const NormBwdArgs& a) {
  const int64_t M = a.rows, N = a.cols;
  const auto acc = acc_type(a.x.scalar_type());
  const at::Tensor weight =
      a.weight.defined() ? as_dtype(a.weight, row_param_dtype(a.weight.scalar_type(), M)) : a.weight;
  const at::Tensor w = param_or_fill(weight, N, 1.0, a.x, acc);
  const auto& k = cpu::row_kernels();
  cpu::BwdCall call;
  call.x_t = elem_of(a.x.scalar_type());
  call.p_t = elem_of(w.scalar_type());
  call.dy_t = elem_of(a.dy.scalar_type());
  call.centered = a.centered;
  call.x = a.x.const_data_ptr();
  call.dy = a.dy.const_data_ptr();
  call.dh = a.dh.defined() ? a.dh.const_data_ptr() : nullptr;
  call.w = w.const_data_ptr();
  call.weight_offset = a.weight_offset;
  call.mean = a.mean.defined() ? a.mean.const_data_ptr() : nullptr;
  call.rstd = a.rstd.const_data_ptr();
  call.dx = a.dx.defined() ? a.dx.mutable_data_ptr() : nullptr;
  call.n = N;
  // A 16-bit dx stays cached: the rows in pairs of the backward (N >= 3072) interleave two
  // rows' narrow streamed stores, slower on AVX2 (bf16 [2048, 4096] 2.55 -> 3.35 ms).
  call.stream_dx = streams(a.dx) && a.dx.element_size() >= 4;
  const bool want_params = a.dweight.defined() || a.dbias.defined();
  if (!want_params) {
    const int64_t grain = std::max<int64_t>(1, kGrainElements / N);
    at::parallel_for(0, M, grain, [&](int64_t begin, int64_t end) { k.bwd(call, nullptr, nullptr, begin, end); });
    return;
  }
  const int64_t blocks = bwd_blocks(M, N, a.x.element_size());
  const bool sums_are_outputs = a.dweight.defined() && a.dweight.scalar_type() == acc &&
                                (a.centered ? a.dbias.defined() && a.dbias.scalar_type() == acc : true);
  if (blocks == 1 && sums_are_outputs) {
    // One block, parameters in acc_t: its sums are the gradients (few rows: no partials).
    const size_t bytes = N * a.dweight.element_size();
    void* dw_out = a.dweight.mutable_data_ptr();
    void* db_out = a.centered ? a.dbias.mutable_data_ptr() : nullptr;  // RMSNorm: no bias
    std::memset(dw_out, 0, bytes);
    if (db_out != nullptr) std::memset(db_out, 0, bytes);
    k.bwd(call, dw_out, db_out, 0, M);
    return;
  }
  // partial[blk]: dweight partial sums [N], then dbias partial sums [N].
  at::Tensor partial = at::zeros({blocks, 2, N}, a.x.options().dtype(acc));
  const int64_t elem_size = partial.element_size();
  char* part = static_cast<char*>(partial.mutable_data_ptr());
  at::parallel_for(0, blocks, 1, [&](int64_t blk_begin, int64_t blk_end) {
    for (int64_t blk = blk_begin; blk < blk_end; ++blk) {
      char* dw_part = part + blk * 2 * N * elem_size;
      char* db_part = dw_part + N * elem_size;
      k.bwd(call, dw_part, db_part, blk * M / blocks, (blk + 1) * M / blocks);
    }
  });
  // dweight/dbias: the block partials summed in block order (a reduction over dim 0 of a
  // contiguous tensor would leave the order to ATen) and rounded once into the outputs'
  // dtype, with no sums tensor or converting copies between (a few rows' call is mostly those).
  AT_DISPATCH_FLOATING_TYPES(partial.scalar_type(), "norm_bwd_cpu_partials", [&] {
    using acc_t = scalar_t;
    const acc_t* p = partial.const_data_ptr<acc_t>();
    for (const int which : {0, 1}) {  // 0: dweight, 1: dbias
      const at::Tensor& out = which == 0 ? a.dweight : a.dbias;
      if (!out.defined()) continue;
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "norm_bwd_cpu_sums", [&] {
        scalar_t* o = out.mutable_data_ptr<scalar_t>();  // contiguous (new_grads)
        constexpr int64_t kColumns = 256;  // columns summed at once, on the stack
        const int64_t grain = std::max<int64_t>(kColumns, kGrainElements / blocks);
        at::parallel_for(0, N, grain, [&](int64_t begin, int64_t end) {
          for (int64_t c0 = begin; c0 < end; c0 += kColumns) {
            const int64_t width = std::min(kColumns, end - c0);
            acc_t sum[kColumns] = {};
            for (int64_t blk = 0; blk < blocks; ++blk) {
              const acc_t* row = p + (blk * 2 + which) * N + c0;
              for (int64_t j = 0; j < width; ++j) sum[j] += row[j];
            }
            for (int64_t j = 0; j < width; ++j) o[c0 + j] = static_cast<scalar_t>(sum[j]);
          }
        });
      });
    }
  });
}

TORCH_LIBRARY_IMPL(ln_ext, CPU, m) { register_norm_ops<norm_fwd_cpu_kernel, norm_bwd_cpu_kernel>(m); }

}  // namespace ln_ext
