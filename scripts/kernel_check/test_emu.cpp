// Runs the real device code (csrc/kernels/*.cuh, compiled as it is through platform.cuh
// with LN_EXT_HOST_EMULATION) against references: index math, barriers, shuffles,
// thread-block clusters, alignment, out-of-bounds accesses (ASan) or races (TSan), and
// the numerics of ill-conditioned rows.
//   LayerNorm kernels (rows, long, cluster; fused and column dweight/dbias): against a
//     long double reference of the math, on rows of ordinary spread and on rows whose
//     mean is 1e5 (float) or 1e8 (double) times their spread, where the tolerances leave
//     no room for the rounding of the mean (which the kernels correct, forward and
//     backward); N = 1 rows must give y = bias and dx = 0 exactly.
//   LN-RNN cell kernels (forward and backward of the three cells): the CUDA executor
//     (BlockRow: block reductions, column ownership, shared scratch) against the same row
//     functions run serially in double (their math is checked against autograd of
//     ln_ext/reference.py by tests/test_rnn.py); H = 1 layer norms give exact zeros.
// Launcher logic is copied here (marked), so a change there must be made here too.
#include "kernels/layer_norm_fwd.cuh"
#include "kernels/layer_norm_bwd.cuh"
#include "kernels/rnn_cells.cuh"
#include "kernels/channels_first.cuh"

#include <algorithm>
#include <cfloat>
#include <chrono>
#include <random>
#include <string>
#include <type_traits>

using namespace ln_ext::kernels;
namespace cell = ln_ext::cell;
using ld = long double;

// ---------------------------------------------------------------- launcher logic
// Copied from csrc/cuda/launch_common.cuh and csrc/cuda/rnn_cells.cu.
int pow2_at_least(int v) { int p = 1; while (p < v) p *= 2; return p; }
int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
struct Cfg { int k, group, block; int rpb() const { return block / group; } };
Cfg choose(int chunks, int big_k, int max_group) {
  if (chunks <= 32) return {1, pow2_at_least(chunks), 256};
  if (chunks <= big_k * max_group) { int g = pow2_at_least((int)ceil_div(chunks, big_k)); return {big_k, g, g <= 32 ? 256 : g}; }
  return {0, 0, 1024};
}
int cell_threads_for(int64_t H) { return 32 * (int)std::max<int64_t>(1, std::min<int64_t>(8, (H + 31) / 32)); }

// Chunks of a row the long kernels cache: all, none, or a part (standing in for
// rows longer than shared memory), by shape.
int cached_of(int64_t M, int N, int chunks) {
  switch ((M + N) % 3) {
    case 0: return chunks;
    case 1: return 0;
    default: return chunks / 2 + 1 < chunks ? chunks / 2 + 1 : chunks;
  }
}

// ---------------------------------------------------------------- values and buffers
std::mt19937 rng(1234);
template <typename T> T from_d(double v) { if constexpr (std::is_same_v<T, __half>) return __float2half_rn((float)v); else if constexpr (std::is_same_v<T, __nv_bfloat16>) return __float2bfloat16_rn((float)v); else return (T)v; }
template <typename T> double to_d(T v) { if constexpr (std::is_same_v<T, __half>) return __half2float(v); else if constexpr (std::is_same_v<T, __nv_bfloat16>) return __bfloat162float(v); else return (double)v; }
template <typename T> double tol() { if constexpr (std::is_same_v<T, __half>) return 2e-3; else if constexpr (std::is_same_v<T, __nv_bfloat16>) return 1.6e-2; else if constexpr (std::is_same_v<T, float>) return 2e-5; else return 1e-12; }
template <typename T> double ulp() { if constexpr (std::is_same_v<T, double>) return DBL_EPSILON; else return FLT_EPSILON; }

// A buffer of n elements whose first element sits `offset` elements past a 16-byte boundary;
// exactly sized so ASan flags any access past either end.
template <typename T> struct Buf {
  T* base = nullptr; T* p = nullptr; size_t n;
  Buf(size_t n_, int offset) : n(n_) {
    void* mem = nullptr;
    if (posix_memalign(&mem, 16, std::max<size_t>(1, (n + offset) * sizeof(T))) != 0) std::abort();
    base = static_cast<T*>(mem);
    p = base + offset;
  }
  Buf(const Buf&) = delete;
  ~Buf() { std::free(base); }
};

// x = offset + scale * N(0, 1). `strict`: rows whose mean is far above their spread,
// checked with tolerances the rounding of the mean would break.
struct Dist { double offset, scale; bool strict; };
constexpr Dist kOrdinary{0.5, 2.0, false};
template <typename A> constexpr Dist ill_conditioned() { return std::is_same_v<A, double> ? Dist{1e8, 1.0, true} : Dist{1e5, 1.0, true}; }

int failures = 0;
bool mode_big = false;
// The LayerNorm suites' weight offset (the gain is weight_offset + weight; Gemma's 1).
double weight_offset = 0;
// Seconds since the previous call (each suite prints its own).
double lap() {
  static auto last = std::chrono::steady_clock::now();
  const auto now = std::chrono::steady_clock::now();
  const double s = std::chrono::duration<double>(now - last).count();
  last = now;
  return s;
}  // long rows: run the cluster kernels on them too
void fail(const std::string& what) { if (++failures < 30) std::fprintf(stderr, "FAIL %s\n", what.c_str()); }
std::string num(double v) { char b[32]; std::snprintf(b, sizeof b, "%.17g", v); return b; }

// A row's statistics in long double by the corrected two-pass algorithm, kept as shift
// and residual: a long double mean of a row 1e8 times its spread is itself off by an ulp
// of 1e8 (4e-12), far more than float64 kernels are allowed here.
struct RefStats {
  ld shift, residual, rs;
  ld mean() const { return shift + residual; }
  ld xhat(double x) const { return ((x - shift) - residual) * rs; }
};
template <typename T> RefStats ref_stats(const T* x, int N) {
  ld s = 0; for (int j = 0; j < N; ++j) s += to_d(x[j]);
  const ld shift = s / N;
  ld c = 0, q = 0; for (int j = 0; j < N; ++j) { const ld d = to_d(x[j]) - shift; c += d; q += d * d; }
  c /= N;
  return {shift, c, 1 / std::sqrt(std::max<ld>(q / N - c * c, 0) + (ld)1e-5)};
}

// RMSNorm's statistics of a row in long double, as RefStats (no shift, no residual).
template <typename T> RefStats ref_rms_stats(const T* x, int N) {
  ld q = 0; for (int j = 0; j < N; ++j) { const ld v = to_d(x[j]); q += v * v; }
  return {0, 0, 1 / std::sqrt(q / N + (ld)1e-5)};
}
template <bool kCentered, typename T> RefStats ref_norm_stats(const T* x, int N) {
  return kCentered ? ref_stats(x, N) : ref_rms_stats(x, N);
}

// ---------------------------------------------------------------- forward
// The norm family's forward: LayerNorm (kCentered) or RMSNorm, of x or (add) of h = x +
// residual, h of type R. force_long_block: run the long kernel (or, with cluster > 0, the
// cluster kernel with clusters of `cluster` blocks) with blocks of that many threads,
// whatever N.
template <typename T, typename P, typename Y, typename R = T, bool kCentered = true>
void test_fwd(int64_t M, int N, int offset, bool has_w, bool has_b, int grid_cap, int force_long_block, int cluster, Dist dist,
              bool add = false) {
  using A = acc_t<T>; constexpr int V = kVecElems<T>;
  has_b = has_b && kCentered;  // RMSNorm has no bias
  Buf<T> x(M * N, offset); Buf<Y> y(M * N, offset % 2); Buf<P> w(N, 0), b(N, 0); Buf<R> res(M * N, offset), h(M * N, offset);
  std::vector<A> mean(M), rstd(M);
  std::normal_distribution<double> nd(0.0, 1.0);
  for (int64_t i = 0; i < M * N; ++i) x.p[i] = from_d<T>(dist.offset + dist.scale * nd(rng));
  for (int64_t i = 0; i < M * N; ++i) res.p[i] = from_d<R>(nd(rng));
  for (int i = 0; i < N; ++i) { w.p[i] = from_d<P>(0.5 + 2 * nd(rng)); b.p[i] = from_d<P>(0.5 + 2 * nd(rng)); }
  FwdParams<T, P, Y, R> p{x.p, add ? res.p : nullptr, add ? h.p : nullptr, has_w ? w.p : nullptr, has_b ? b.p : nullptr, y.p,
                          kCentered ? mean.data() : nullptr, rstd.data(), M, N, (A)1e-5,
                          reinterpret_cast<uintptr_t>(x.p) % 16 == 0 && reinterpret_cast<uintptr_t>(y.p) % 16 == 0 &&
                              reinterpret_cast<uintptr_t>(res.p) % 16 == 0 && reinterpret_cast<uintptr_t>(h.p) % 16 == 0,
                          true};
  p.weight_offset = has_w ? (A)weight_offset : A(0);
  const int chunks = max_chunks_per_row(N, V);
  Cfg c = choose(chunks, 4, 512);
  if (force_long_block) c.k = 0;
  // Both ways the blocks of a cluster meet (ClusterSum: barrier, lean), by shape.
  p.lean_cluster_sum = (M + N + cluster) % 2 == 1;
  if (cluster) {
    const int slice = cluster_slice_chunks(chunks, cluster);
    const size_t smem = cluster_header_words<A>() * 16 + (size_t)slice * V * sizeof(R);
    const int grid = (int)std::max<int64_t>(1, std::min<int64_t>(M, grid_cap)) * cluster;
    emu_launch({(unsigned)grid}, {(unsigned)force_long_block}, smem, [&] { layer_norm_fwd_cluster_kernel<T, P, Y, R, kCentered>(p, slice); }, cluster);
  } else if (c.k) {
    int grid = (int)std::max<int64_t>(1, std::min<int64_t>(ceil_div(M, c.rpb()), grid_cap));
    emu_launch({(unsigned)grid}, {(unsigned)c.block}, 0, [&] {
      if (c.k == 1) layer_norm_fwd_rows_kernel<T, P, Y, R, kCentered, 1>(p, c.group); else layer_norm_fwd_rows_kernel<T, P, Y, R, kCentered, 4>(p, c.group);
    });
  } else {
    const int block = force_long_block ? force_long_block : 1024;
    const int cached = cached_of(M, N, chunks);
    int grid = (int)std::max<int64_t>(1, std::min<int64_t>(M, grid_cap));
    emu_launch({(unsigned)grid}, {(unsigned)block}, (size_t)cached * V * sizeof(R), [&] { layer_norm_fwd_long_kernel<T, P, Y, R, kCentered>(p, cached); });
  }
  const std::string tag = std::string(kCentered ? "fwd" : "rms fwd") + (add ? " add" : "") + " M=" + std::to_string(M) + " N=" + std::to_string(N) + " off=" + std::to_string(offset) + " k=" + std::to_string(c.k) + " cluster=" + std::to_string(cluster) + (p.lean_cluster_sum ? " lean" : "") + " T=" + std::to_string(sizeof(T)) + " P=" + std::to_string(sizeof(P)) + " Y=" + std::to_string(sizeof(Y)) + " R=" + std::to_string(sizeof(R)) + " w=" + std::to_string(has_w) + " woff=" + num(weight_offset) + " b=" + std::to_string(has_b) + " mean/spread=" + num(dist.offset / dist.scale);
  std::vector<double> u(N);  // the row the norm reads: x, or h = x + residual rounded to R
  for (int64_t r = 0; r < M; ++r) {
    for (int j = 0; j < N; ++j) {
      const int64_t e = r * N + j;
      u[j] = add ? to_d(from_d<R>(to_d(x.p[e]) + to_d(res.p[e]))) : to_d(x.p[e]);
      if (add && to_d(h.p[e]) != u[j]) { fail(tag + " h[" + std::to_string(r) + "," + std::to_string(j) + "] got " + num(to_d(h.p[e])) + " want " + num(u[j])); return; }
    }
    const RefStats st = ref_norm_stats<kCentered>(u.data(), N);
    const ld mu = st.mean(), rs = st.rs;
    // strict: the mean within an ulp of itself and a few of the spread.
    const bool mean_ok = !kCentered || (dist.strict ? std::abs(mean[r] - mu) <= ulp<A>() * (std::abs(mu) + 8 / rs)
                                                    : std::abs(mean[r] - mu) <= 1e-5 * (1 + std::abs(mu)));
    const bool rstd_ok = std::abs(rstd[r] - rs) <= (dist.strict ? 64 * ulp<A>() : 1e-4) * rs;
    if (!mean_ok || !rstd_ok) { fail(tag + " stats row " + std::to_string(r) + ": mean " + num(mean[r]) + " want " + num(mu) + ", rstd " + num(rstd[r]) + " want " + num(rs)); return; }
    for (int j = 0; j < N; ++j) {
      const double bias = has_b ? to_d(b.p[j]) : 0.0;
      const double ref = (double)(st.xhat(u[j]) * (has_w ? to_d(w.p[j]) + weight_offset : 1.0) + bias);
      const double got = to_d(y.p[r * N + j]);
      const double t = dist.strict ? 16 * ulp<Y>() * (1 + std::abs(ref))
                                   : std::max(tol<Y>(), 2e-5 * (std::is_same_v<A, double> ? 0 : 1)) * (1 + std::abs(ref)) * 4;
      // LayerNorm, N = 1: xhat = 0, y = bias exactly.
      const bool ok = kCentered && N == 1 ? got == to_d(from_d<Y>(bias)) : std::abs(got - ref) <= t;
      if (!ok) { fail(tag + " y[" + std::to_string(r) + "," + std::to_string(j) + "] got " + num(got) + " want " + num(ref)); return; }
    }
  }
}

// ---------------------------------------------------------------- backward
// The gradient of the norm's input (LayerNorm, or RMSNorm), plus dh when `with_dh`.
template <typename T, typename DY, typename P, bool kCentered = true>
void test_bwd(int64_t M, int N, int offset, bool has_w, bool want_dx, bool want_params, int grid_cap, int force_long_block, int cluster, Dist dist,
              bool with_dh = false) {
  using A = acc_t<T>; constexpr int V = kVecElems<T>;
  Buf<T> x(M * N, offset), dx(M * N, offset), dh(M * N, offset); Buf<DY> dy(M * N, offset); Buf<P> w(N, 0);
  std::normal_distribution<double> nd(0.0, 1.0);
  for (int64_t i = 0; i < M * N; ++i) { x.p[i] = from_d<T>(dist.offset + dist.scale * nd(rng)); dy.p[i] = from_d<DY>(0.5 + 2 * nd(rng)); dh.p[i] = from_d<T>(nd(rng)); }
  for (int i = 0; i < N; ++i) w.p[i] = from_d<P>(0.5 + 2 * nd(rng));
  // The statistics as the forward stores them: rounded to A (the kernels correct for it).
  std::vector<RefStats> st(M);
  std::vector<A> mean(M), rstd(M), residual(M, (A)-777);
  for (int64_t r = 0; r < M; ++r) { st[r] = ref_norm_stats<kCentered>(x.p + r * N, N); mean[r] = (A)st[r].mean(); rstd[r] = (A)st[r].rs; }
  BwdParams<T, DY, P> p{with_dh ? dh.p : nullptr, dy.p, x.p, kCentered ? mean.data() : nullptr, rstd.data(), has_w ? w.p : nullptr,
                        want_dx ? dx.p : nullptr, nullptr, nullptr, M, N,
                        reinterpret_cast<uintptr_t>(x.p) % 16 == 0 && reinterpret_cast<uintptr_t>(dy.p) % 16 == 0 &&
                            reinterpret_cast<uintptr_t>(dx.p) % 16 == 0 && reinterpret_cast<uintptr_t>(dh.p) % 16 == 0,
                        true};
  p.weight_offset = has_w ? (A)weight_offset : A(0);
  const int chunks = max_chunks_per_row(N, V);
  Cfg c = choose(chunks, 2, 512);
  if (force_long_block) c.k = 0;
  const bool fuse = want_params && c.k != 0;
  std::vector<A> partials;
  int partial_blocks = 0;
  bool fuse_long = false;
  p.lean_cluster_sum = (M + N + cluster) % 2 == 0;  // both meetings of a cluster's blocks, by shape
  if (cluster) {
    // cluster kernel: dweight/dbias sums of each block's columns in shared memory (here:
    // unless (M + N) % 3 == 0, standing in for "too large", which takes param_cols and
    // the kernel's per-row residuals)
    fuse_long = want_params && (M + N) % 3 != 0;
    if (!want_dx && !fuse_long) fuse_long = want_params;  // as the launcher: without dx the cluster kernel fuses
    const int slice = cluster_slice_chunks(chunks, cluster);
    const int clusters = (int)std::max<int64_t>(1, std::min<int64_t>(M, grid_cap));
    const size_t smem = cluster_header_words<A>() * 16 + (fuse_long ? 2 * (size_t)long_param_cols(slice * V) * sizeof(A) : 0) +
                        (size_t)(slice + 1) * V * (sizeof(T) + sizeof(DY));
    if (fuse_long) { partials.assign((size_t)clusters * 2 * N, (A)-777); p.partials = partials.data(); partial_blocks = clusters; }
    else if (want_params && kCentered) p.residual = residual.data();
    emu_launch({(unsigned)(clusters * cluster)}, {(unsigned)force_long_block}, smem, [&] { layer_norm_bwd_cluster_kernel<T, DY, P, kCentered>(p, slice); }, cluster);
  } else if (c.k && (want_dx || fuse)) {
    int grid = (int)std::max<int64_t>(1, std::min<int64_t>(ceil_div(M, c.rpb()), grid_cap));
    size_t smem = 0;
    if (fuse) { partials.assign((size_t)grid * 2 * N, (A)-777); p.partials = partials.data(); partial_blocks = grid; if (N % V != 0) smem = (size_t)c.rpb() * 2 * chunks * V * sizeof(A); else if (c.rpb() > 1) smem = c.rpb() * N * sizeof(A); }
    emu_launch({(unsigned)grid}, {(unsigned)c.block}, smem, [&] {
      if (c.k == 1) layer_norm_bwd_rows_kernel<T, DY, P, kCentered, 1>(p, c.group); else layer_norm_bwd_rows_kernel<T, DY, P, kCentered, 2>(p, c.group);
    });
  } else if (c.k == 0) {
    // long kernel: dweight/dbias sums in shared memory (here: unless (M + N) % 3 == 0,
    // standing in for "too large": residuals for param_cols), row cache or not
    fuse_long = want_params && (M + N) % 3 != 0;
    const int block = force_long_block ? force_long_block : 1024;
    const int cached = (want_dx || fuse_long) ? cached_of(M + 1, N, chunks) : 0;
    int grid = (int)std::max<int64_t>(1, std::min<int64_t>(M, grid_cap));
    const size_t smem = (fuse_long ? 2 * (size_t)long_param_cols(N) * sizeof(A) : 0) + (size_t)cached * V * (sizeof(T) + sizeof(DY));
    if (fuse_long) { partials.assign((size_t)grid * 2 * N, (A)-777); p.partials = partials.data(); partial_blocks = grid; }
    else if (want_params && kCentered) p.residual = residual.data();
    // RMSNorm without dx and without fused sums: no kernel is needed before param_cols.
    if (want_dx || fuse_long || p.residual != nullptr)
      emu_launch({(unsigned)grid}, {(unsigned)block}, smem, [&] { layer_norm_bwd_long_kernel<T, DY, P, kCentered>(p, cached); });
  }
  if (want_params && !fuse && !fuse_long) {
    const int64_t col_tiles = ceil_div(N, kColTile);
    const int64_t max_slices = std::min<int64_t>(65535, std::max<int64_t>(1, M / (4 * kColRowLanes)));
    int64_t slices = std::clamp<int64_t>(ceil_div(grid_cap * 8, col_tiles), 1, max_slices);
    const int64_t rps = ceil_div(M, slices);
    slices = ceil_div(M, rps);
    partials.assign((size_t)slices * 2 * N, (A)-777);
    emu_launch({(unsigned)col_tiles, (unsigned)slices}, {kColTile, kColRowLanes}, 0, [&] {
      layer_norm_bwd_param_cols_kernel<T, DY>(dy.p, x.p, kCentered ? mean.data() : nullptr, rstd.data(),
                                              kCentered ? residual.data() : nullptr, partials.data(), M, N, rps);
    });
    partial_blocks = (int)slices;
  }
  std::vector<P> dw(N), db(N);
  if (want_params) {
    emu_launch({(unsigned)ceil_div(N, kColTile)}, {kColTile, kColRowLanes}, 0, [&] {
      layer_norm_bwd_param_reduce_kernel<A, P>(partials.data(), partial_blocks, N, dw.data(), kCentered ? db.data() : nullptr);
    });
  }
  const std::string tag = std::string(kCentered ? "bwd" : "rms bwd") + (with_dh ? " +dh" : "") + " M=" + std::to_string(M) + " N=" + std::to_string(N) + " off=" + std::to_string(offset) + " k=" + std::to_string(c.k) + " cluster=" + std::to_string(cluster) + (p.lean_cluster_sum ? " lean" : "") + " fuse=" + std::to_string(fuse) + std::to_string(fuse_long) + " T=" + std::to_string(sizeof(T)) + " DY=" + std::to_string(sizeof(DY)) + " P=" + std::to_string(sizeof(P)) + " w=" + std::to_string(has_w) + " woff=" + num(weight_offset) + " dx=" + std::to_string(want_dx) + " params=" + std::to_string(want_params) + " mean/spread=" + num(dist.offset / dist.scale);
  // Reference from the exact statistics, not the rounded ones the kernels were given.
  std::vector<ld> rdw(N, 0), rdb(N, 0);
  ld max_dw_term = 0;
  for (int64_t r = 0; r < M; ++r) {
    ld sg = 0, sgx = 0, max_g = 0;
    for (int j = 0; j < N; ++j) {
      const ld xh = st[r].xhat(to_d(x.p[r * N + j])), d = to_d(dy.p[r * N + j]), g = d * (has_w ? to_d(w.p[j]) + weight_offset : 1.0);
      sg += g; sgx += g * xh; rdw[j] += d * xh; rdb[j] += d;
      max_g = std::max(max_g, std::abs(g)); max_dw_term = std::max(max_dw_term, std::abs(d * xh) + std::abs(d));
    }
    sg = kCentered ? sg / N : 0;  // RMSNorm takes no mean(g) out
    sgx /= N;
    if (!want_dx) continue;
    for (int j = 0; j < N; ++j) {
      const ld xh = st[r].xhat(to_d(x.p[r * N + j])), g = to_d(dy.p[r * N + j]) * (has_w ? to_d(w.p[j]) + weight_offset : 1.0);
      const double extra = with_dh ? to_d(dh.p[r * N + j]) : 0.0;
      const double ref = (double)(st[r].rs * (g - sg - xh * sgx)) + extra, got = to_d(dx.p[r * N + j]);
      // strict: the norm's part within ulps of its terms, and the rounding of adding dh.
      const double t = dist.strict ? 32 * ulp<T>() * (double)(st[r].rs * max_g) + 2 * ulp<T>() * std::abs(ref)
                                   : tol<T>() * 8 * (1 + std::abs(ref)) + (std::is_same_v<A, double> ? 0 : 1e-4 * std::sqrt((double)N));
      // LayerNorm, N = 1: dx = 0 exactly (plus dh).
      const bool ok = kCentered && N == 1 ? got == to_d(from_d<T>(extra)) : std::abs(got - ref) <= t;
      if (!ok) { fail(tag + " dx[" + std::to_string(r) + "," + std::to_string(j) + "] got " + num(got) + " want " + num(ref)); return; }
    }
  }
  if (want_params) {
    for (int j = 0; j < N; ++j) {
      const double t = dist.strict ? 8 * ulp<A>() * M * (double)max_dw_term
                                   : (tol<P>() * 4 + (std::is_same_v<A, double> ? 0 : 1e-5 * M)) * (double)(1 + std::abs(rdw[j]) + std::sqrt((ld)M));
      const bool dw_ok = kCentered && N == 1 ? to_d(dw[j]) == 0.0 : std::abs(to_d(dw[j]) - rdw[j]) <= t;  // N = 1: xhat = 0
      const bool db_ok = !kCentered || std::abs(to_d(db[j]) - rdb[j]) <= t;
      if (!dw_ok || !db_ok) { fail(tag + " dw/db[" + std::to_string(j) + "] got " + num(to_d(dw[j])) + "/" + num(to_d(db[j])) + " want " + num(rdw[j]) + "/" + num(rdb[j])); return; }
    }
  }
}

template <typename T, typename P, typename Y, typename DY>
void layer_norm_suite(const std::vector<int>& ns, const std::vector<int64_t>& ms, Dist dist) {
  constexpr int V = kVecElems<T>;
  int cases = 0;
  for (int n : ns) for (int64_t m : ms) {
    if ((int64_t)n * m > 300000) continue;
    const int off = (n + (int)m) % 3 == 0 ? 1 : 0;  // sometimes a misaligned base
    const int grid_cap = 1 + (n + (int)m) % 3;       // force grid-stride loops
    test_fwd<T, P, Y>(m, n, off, n % 2 == 0, n % 3 != 0, grid_cap, 0, 0, dist);
    test_bwd<T, DY, P>(m, n, off, n % 4 != 1, true, true, grid_cap, 0, 0, dist);
    test_bwd<T, DY, P>(m, n, 0, true, n % 2 == 0, n % 2 == 1, grid_cap, 0, 0, dist);
    // The rest of the family on the launcher's kernel for N: RMSNorm, add + norm (h in x's
    // dtype, and float32 beside a 16-bit x), the gradient of h added to dx.
    using RF = std::conditional_t<std::is_same_v<T, double>, double, float>;
    test_fwd<T, P, Y, T, false>(m, n, off, n % 2 == 1, false, grid_cap, 0, 0, dist);
    test_fwd<T, P, Y, T, true>(m, n, off, true, true, grid_cap, 0, 0, dist, true);
    test_fwd<T, P, Y, RF, false>(m, n, 0, true, false, grid_cap, 0, 0, dist, true);
    test_bwd<T, DY, P, false>(m, n, off, n % 2 == 0, true, true, grid_cap, 0, 0, dist, true);
    test_bwd<T, DY, P, true>(m, n, 0, true, true, n % 2 == 0, grid_cap, 0, 0, dist, true);
    if (n <= 700) {  // the long kernels on short rows too, small blocks: several chunks per thread
      test_fwd<T, P, Y>(m, n, off, true, true, grid_cap, 64, 0, dist);
      test_bwd<T, DY, P>(m, n, off, true, true, true, grid_cap, 32, 0, dist);
      test_bwd<T, DY, P>(m, n, 0, n % 2 == 0, false, true, grid_cap, 64, 0, dist);
      test_fwd<T, P, Y, RF, true>(m, n, off, true, true, grid_cap, 64, 0, dist, true);
      test_fwd<T, P, Y, T, false>(m, n, 0, true, false, grid_cap, 32, 0, dist, true);
      test_bwd<T, DY, P, false>(m, n, off, true, true, true, grid_cap, 64, 0, dist, true);
      test_bwd<T, DY, P, false>(m, n, 0, true, false, true, grid_cap, 32, 0, dist);
    }
    if (n <= 1100 || mode_big) {  // the cluster kernels: 1..4 blocks a row, small blocks
      const int cluster = 1 + (n + (int)m) % 4;
      test_fwd<T, P, Y>(m, n, off, n % 3 != 0, true, grid_cap, 64, cluster, dist);
      test_bwd<T, DY, P>(m, n, off, true, true, true, grid_cap, 32 * cluster, cluster, dist);
      test_bwd<T, DY, P>(m, n, 0, n % 2 == 1, n % 2 == 0, true, grid_cap, 64, 5 - cluster, dist);
      test_fwd<T, P, Y, RF, false>(m, n, off, true, false, grid_cap, 64, cluster, dist, true);
      test_fwd<T, P, Y, T, true>(m, n, 0, true, true, grid_cap, 32, 5 - cluster, dist, true);
      test_bwd<T, DY, P, false>(m, n, off, true, true, true, grid_cap, 32 * cluster, cluster, dist, true);
    }
    cases++;
  }
  std::printf("LayerNorm T=%zu P=%zu Y=%zu DY=%zu V=%d mean/spread=%g: %d shapes, failures so far %d (%.0f s)\n", sizeof(T), sizeof(P), sizeof(Y), sizeof(DY), V, dist.offset / dist.scale, cases, failures, lap());
}

// ---------------------------------------------------------------- LN-RNN cells
// The reference executor: the row functions run serially in double.
struct SerialDouble {
  template <class F> void for_cols(int64_t n, F f) const { for (int64_t j = 0; j < n; ++j) f(j); }
  template <int N, class A, class F> void sum_cols(int64_t n, F f, A (&s)[N]) const {
    for (int k = 0; k < N; ++k) s[k] = 0;
    for (int64_t j = 0; j < n; ++j) { A v[N]; f(j, v); for (int k = 0; k < N; ++k) s[k] += v[k]; }
  }
  template <class T, class A> void mean_rstd(const T* x, int64_t n, A eps, A& mean, A& rstd) const {
    ln_ext::cell::row_mean_rstd(*this, n, eps, [&](int64_t j) { return A(x[j]); }, mean, rstd);
  }
  bool leader() const { return true; }
};

// One operand of a cell op: `cols` values per batch row (or, `shared`, one vector for
// all rows: the parameters), of the io dtype T or of the acc dtype A.
struct Operand { const char* name; int64_t cols; bool shared, acc; };

// The operands of a cell op in the device dtype (T, A) and as doubles: inputs random,
// outputs dirty; `set` copies device outputs into the double copies (chaining fwd into bwd).
template <typename T, typename A>
struct CellData {
  std::vector<std::vector<T>> io;
  std::vector<std::vector<A>> acc;
  std::vector<std::vector<double>> dbl;
  std::vector<Operand> ops;
  CellData(const std::vector<Operand>& operands, int64_t B) : ops(operands) {
    std::normal_distribution<double> nd(0.0, 1.0);
    for (const Operand& o : ops) {
      const size_t n = (size_t)(o.shared ? o.cols : B * o.cols);
      io.emplace_back(o.acc ? 0 : n); acc.emplace_back(o.acc ? n : 0); dbl.emplace_back(n);
      for (size_t i = 0; i < n; ++i) {
        const double v = (o.name[0] == 'g' && o.shared ? 1.0 : 0.0) + nd(rng);  // gains near 1
        if (o.acc) { acc.back()[i] = (A)v; dbl.back()[i] = (double)acc.back()[i]; }
        else { io.back()[i] = from_d<T>(v); dbl.back()[i] = to_d(io.back()[i]); }
      }
    }
  }
  int at(const char* name) const { for (size_t i = 0; i < ops.size(); ++i) if (std::string(ops[i].name) == name) return (int)i; std::abort(); }
  // Pointers for the device (Dev) and the double reference (!Dev) row structs.
  template <bool Dev> auto ptr(const char* name) {
    const int i = at(name);
    if constexpr (Dev) { if (ops[i].acc) return (void*)acc[i].data(); return (void*)io[i].data(); }
    else return (void*)dbl[i].data();
  }
  void sync_from_device(const char* name) {
    const int i = at(name);
    for (size_t k = 0; k < dbl[i].size(); ++k) dbl[i][k] = ops[i].acc ? (double)acc[i][k] : to_d(io[i][k]);
  }
  void set(const char* name, const std::vector<double>& v) { dbl[at(name)] = v; }
};

template <bool Dev, typename T, typename A, typename D>
auto rnn_row(D& d, bool relu) {
  using TT = std::conditional_t<Dev, T, double>; using AA = std::conditional_t<Dev, A, double>;
  auto io = [&](const char* n) { return static_cast<TT*>(d.template ptr<Dev>(n)); };
  auto ac = [&](const char* n) { return static_cast<AA*>(d.template ptr<Dev>(n)); };
  return cell::RnnRow<TT, AA>{io("xproj"), io("hproj"), io("gamma"), io("beta"), io("dh"), io("h"), io("da"), ac("stats"),
                              ac("dgamma_rows"), ac("dbeta_rows"), relu};
}
template <bool Dev, typename T, typename A, typename D>
auto lstm_row(D& d) {
  using TT = std::conditional_t<Dev, T, double>; using AA = std::conditional_t<Dev, A, double>;
  auto io = [&](const char* n) { return static_cast<TT*>(d.template ptr<Dev>(n)); };
  auto ac = [&](const char* n) { return static_cast<AA*>(d.template ptr<Dev>(n)); };
  return cell::LstmRow<TT, AA>{io("xgates"), io("hproj"), io("gamma_h"), io("bias"), io("c_prev"), io("gamma_c"), io("beta_c"), io("dh"), io("dc"),
                               io("h"), io("c"), io("dc_prev"), io("dgates"), io("dhproj"), ac("gates"), ac("stats"), ac("dgamma_h_rows"),
                               ac("dgamma_c_rows"), ac("dbeta_c_rows")};
}
template <bool Dev, typename T, typename A, typename D>
auto gru_row(D& d) {
  using TT = std::conditional_t<Dev, T, double>; using AA = std::conditional_t<Dev, A, double>;
  auto io = [&](const char* n) { return static_cast<TT*>(d.template ptr<Dev>(n)); };
  auto ac = [&](const char* n) { return static_cast<AA*>(d.template ptr<Dev>(n)); };
  return cell::GruRow<TT, AA>{io("xzr"), io("xn"), io("h_prev"), io("dh"), io("hproj"), io("gamma_h"), io("beta_h"), io("h"), io("dxn"),
                              io("dh_prev"), io("dxzr"), io("dhproj"), ac("gates"), ac("stats"), ac("dgamma_h_rows"), ac("dbeta_h_rows")};
}

// Compares the device outputs `names` with the reference's; exact zeros where `zero(name, col)`.
template <typename T, typename A, typename D, typename Zero>
void check_cell_outputs(D& d, const std::vector<const char*>& names, const std::vector<double>* refs, const std::string& tag, Zero zero) {
  for (size_t k = 0; k < names.size(); ++k) {
    const int i = d.at(names[k]);
    const int64_t cols = d.ops[i].cols;
    const std::vector<double>& ref = refs[k];
    for (size_t e = 0; e < ref.size(); ++e) {
      const double got = d.ops[i].acc ? (double)d.acc[i][e] : to_d(d.io[i][e]);
      // The device rounds to T what it stores as T (the LSTM's c, before LN(c) reads it
      // back), the double reference nothing: T's tolerance for every output.
      const double t = 4 * std::max(tol<T>(), 2 * tol<A>()) * (1 + std::abs(ref[e]));
      const bool want_zero = zero(names[k], (int64_t)(e % cols));
      if (want_zero ? got != 0.0 : !(std::abs(got - ref[e]) <= t)) {
        fail(tag + " " + names[k] + "[" + std::to_string(e) + "] got " + num(got) + " want " + num(ref[e]) + (want_zero ? " (exact 0)" : ""));
        return;
      }
    }
  }
}

// Forward then backward of one cell over B rows of hidden size H: the device kernels
// (emulated, the launcher's block size) against the double row functions.
template <typename T, typename A, typename MakeRow, typename Fwd, typename Bwd, typename Zero>
void test_cell(const char* mode, int64_t B, int64_t H, const std::vector<Operand>& operands,
               const std::vector<const char*>& fwd_out, const std::vector<const char*>& bwd_out,
               MakeRow make_row, Fwd fwd_kernel, Bwd bwd_kernel, Zero zero) {
  CellData<T, A> d(operands, B);
  const std::string tag = std::string(mode) + " B=" + std::to_string(B) + " H=" + std::to_string(H) + " T=" + std::to_string(sizeof(T));
  const A eps = (A)1e-5;
  const unsigned threads = (unsigned)cell_threads_for(H);
  auto dev = make_row(std::integral_constant<bool, true>{}, d);
  emu_launch({(unsigned)B}, {threads}, 0, [&] { fwd_kernel(dev, H, eps); });
  {  // reference forward on the same inputs
    auto ref = make_row(std::integral_constant<bool, false>{}, d);
    for (int64_t b = 0; b < B; ++b) ref_fwd_row(mode, SerialDouble{}, ref.at(b, H), H, 1e-5);
    std::vector<std::vector<double>> want;
    for (const char* n : fwd_out) want.push_back(d.dbl[d.at(n)]);
    check_cell_outputs<T, A>(d, fwd_out, want.data(), tag + " fwd", [](const char*, int64_t) { return false; });
  }
  // Backward from the device forward's outputs (the same inputs for both).
  for (const char* n : fwd_out) d.sync_from_device(n);
  emu_launch({(unsigned)B}, {threads}, 0, [&] { bwd_kernel(dev, H); });
  auto ref = make_row(std::integral_constant<bool, false>{}, d);
  for (int64_t b = 0; b < B; ++b) ref_bwd_row(mode, SerialDouble{}, ref.at(b, H), H);
  std::vector<std::vector<double>> want;
  for (const char* n : bwd_out) want.push_back(d.dbl[d.at(n)]);
  check_cell_outputs<T, A>(d, bwd_out, want.data(), tag + " bwd", zero);
}

// The row functions by cell, in double (found by test_cell through SerialDouble).
void ref_fwd_row(const char*, SerialDouble ex, const cell::RnnRow<double, double>& r, int64_t H, double eps) { cell::rnn_fwd_row(ex, r, H, eps); }
void ref_fwd_row(const char*, SerialDouble ex, const cell::LstmRow<double, double>& r, int64_t H, double eps) { cell::lstm_fwd_row(ex, r, H, eps); }
void ref_fwd_row(const char*, SerialDouble ex, const cell::GruRow<double, double>& r, int64_t H, double eps) { cell::gru_fwd_row(ex, r, H, eps); }
void ref_bwd_row(const char*, SerialDouble ex, const cell::RnnRow<double, double>& r, int64_t H) { cell::rnn_bwd_row(ex, r, H); }
void ref_bwd_row(const char*, SerialDouble ex, const cell::LstmRow<double, double>& r, int64_t H) { cell::lstm_bwd_row(ex, r, H); }
void ref_bwd_row(const char*, SerialDouble ex, const cell::GruRow<double, double>& r, int64_t H) { cell::gru_bwd_row(ex, r, H); }

template <typename T>
void cell_suite(const std::vector<int64_t>& hs, const std::vector<int64_t>& bs) {
  using A = acc_t<T>;
  int cases = 0;
  for (int64_t H : hs) for (int64_t B : bs) {
    // LN-RNN, tanh and relu. H = 1: the layer norm's output is beta whatever its input: da = 0 exactly.
    for (const bool relu : {false, true}) {
      test_cell<T, A>(relu ? "rnn relu" : "rnn", B, H,
          {{"xproj", H, false, false}, {"hproj", H, false, false}, {"gamma", H, true, false}, {"beta", H, true, false}, {"dh", H, false, false},
           {"h", H, false, false}, {"da", H, false, false}, {"stats", 2, false, true}, {"dgamma_rows", H, false, true}, {"dbeta_rows", H, false, true}},
          {"h", "stats"}, {"da", "dgamma_rows", "dbeta_rows"},
          [relu](auto dev, auto& d) { return rnn_row<decltype(dev)::value, T, A>(d, relu); },
          [](auto r, int64_t H, A eps) { cell::rnn_fwd_kernel<T, A>(r, H, eps); }, [](auto r, int64_t H) { cell::rnn_bwd_kernel<T, A>(r, H); },
          [H](const char* n, int64_t) { return H == 1 && std::string(n) == "da"; });
    }
    // LN-LSTM (dc = 0 at H = 1: the c layer norm passes nothing back, so the i, f, g
    // gradients and dc_prev are exactly 0).
    test_cell<T, A>("lstm", B, H,
        {{"xgates", 4 * H, false, false}, {"hproj", 4 * H, false, false}, {"gamma_h", 4 * H, true, false}, {"bias", 4 * H, true, false},
         {"c_prev", H, false, false}, {"gamma_c", H, true, false}, {"beta_c", H, true, false}, {"dh", H, false, false}, {"dc", H, false, false},
         {"h", H, false, false}, {"c", H, false, false}, {"dc_prev", H, false, false}, {"dgates", 4 * H, false, false},
         {"dhproj", 4 * H, false, false}, {"gates", 4 * H, false, true}, {"stats", 4, false, true}, {"dgamma_h_rows", 4 * H, false, true},
         {"dgamma_c_rows", H, false, true}, {"dbeta_c_rows", H, false, true}},
        {"h", "c", "gates", "stats"}, {"dc_prev", "dgates", "dhproj", "dgamma_h_rows", "dgamma_c_rows", "dbeta_c_rows"},
        [H](auto dev, auto& d) {
          if (H == 1) {  // dc = 0 in both copies
            const int i = d.at("dc");
            for (auto& v : d.io[i]) v = from_d<T>(0.0);
            for (auto& v : d.dbl[i]) v = 0.0;
          }
          return lstm_row<decltype(dev)::value, T, A>(d);
        },
        [](auto r, int64_t H, A eps) { cell::lstm_fwd_kernel<T, A>(r, H, eps); }, [](auto r, int64_t H) { cell::lstm_bwd_kernel<T, A>(r, H); },
        [H](const char* n, int64_t col) { return H == 1 && (std::string(n) == "dc_prev" || (std::string(n) == "dgates" && col < 3)); });
    // LN-GRU. H = 1: the n part of the recurrent layer norm is one value: its input gradient is 0.
    test_cell<T, A>("gru", B, H,
        {{"xzr", 2 * H, false, false}, {"xn", H, false, false}, {"h_prev", H, false, false}, {"dh", H, false, false},
         {"hproj", 3 * H, false, false}, {"gamma_h", 3 * H, true, false}, {"beta_h", 3 * H, true, false}, {"h", H, false, false},
         {"dxn", H, false, false}, {"dh_prev", H, false, false}, {"dxzr", 2 * H, false, false}, {"dhproj", 3 * H, false, false},
         {"gates", 4 * H, false, true}, {"stats", 4, false, true}, {"dgamma_h_rows", 3 * H, false, true}, {"dbeta_h_rows", 3 * H, false, true}},
        {"h", "gates", "stats"}, {"dxn", "dh_prev", "dxzr", "dhproj", "dgamma_h_rows", "dbeta_h_rows"},
        [](auto dev, auto& d) { return gru_row<decltype(dev)::value, T, A>(d); },
        [](auto r, int64_t H, A eps) { cell::gru_fwd_kernel<T, A>(r, H, eps); }, [](auto r, int64_t H) { cell::gru_bwd_kernel<T, A>(r, H); },
        [H](const char* n, int64_t col) { return H == 1 && std::string(n) == "dhproj" && col == 2; });
    cases++;
  }
  std::printf("cells T=%zu: %d shapes x 4 cells, failures so far %d (%.0f s)\n", sizeof(T), cases, failures, lap());
}

// ---------------------------------------------------------------- channels-first norms
// x: [B, C, S], one norm per (b, s) over C channels S apart: forward, then the backward (dx,
// and dweight/dbias through per-warp shared rows and the parameter reduction), against the
// long double reference of each position's column; C = 1 exact (y = bias, dx = 0, dw = 0).
// has_w: a weight (else none, gain 1); want_dx / want_params: which backward outputs are asked
// for (no partials: no shared memory, the kernel's early return).
template <typename T, typename P, bool kCentered>
void test_channels_first(int64_t B, int C, int64_t S, int block, int grid_cap, Dist dist, bool has_w = true,
                         bool want_dx = true, bool want_params = true) {
  const double offset = has_w ? weight_offset : 0.0;
  using A = acc_t<T>;
  const int64_t n = B * C * S, positions = B * S;
  Buf<T> x(n, 0), dx(n, 0), dy(n, 0), y(n, 0); Buf<P> w(C, 0), b(C, 0);
  std::vector<A> mean(positions), rstd(positions);
  std::normal_distribution<double> nd(0.0, 1.0);
  for (int64_t i = 0; i < n; ++i) { x.p[i] = from_d<T>(dist.offset + dist.scale * nd(rng)); dy.p[i] = from_d<T>(nd(rng)); }
  for (int c = 0; c < C; ++c) { w.p[c] = from_d<P>(0.5 + nd(rng)); b.p[c] = from_d<P>(nd(rng)); }
  for (int c = 0; c < C && !has_w; ++c) w.p[c] = from_d<P>(1.0);  // the reference's gain of 1
  ChannelFwdParams<T, P, T> fp{x.p, has_w ? w.p : nullptr, kCentered ? b.p : nullptr, y.p,
                               kCentered ? mean.data() : nullptr, rstd.data(), positions, S, C, (A)1e-5, (A)offset};
  const int grid = (int)std::max<int64_t>(1, std::min<int64_t>(ceil_div(positions, block), grid_cap));
  emu_launch({(unsigned)grid}, {(unsigned)block}, 0, [&] { channels_first_fwd_kernel<T, P, T, kCentered>(fp); });
  const int warps = block / 32;
  std::vector<A> partials((size_t)grid * 2 * C, (A)-777);
  ChannelBwdParams<T, T, P> bp{dy.p, x.p, kCentered ? mean.data() : nullptr, rstd.data(), has_w ? w.p : nullptr,
                               want_dx ? dx.p : nullptr, want_params ? partials.data() : nullptr, positions, S, C,
                               (A)offset};
  emu_launch({(unsigned)grid}, {(unsigned)block}, want_params ? (size_t)warps * 2 * C * sizeof(A) : 0,
             [&] { channels_first_bwd_kernel<T, T, P, kCentered>(bp); });
  std::vector<P> dw(C), db(C);
  if (want_params) {
    emu_launch({(unsigned)ceil_div(C, kColTile)}, {kColTile, kColRowLanes}, 0, [&] {
      layer_norm_bwd_param_reduce_kernel<A, P>(partials.data(), grid, C, dw.data(), kCentered ? db.data() : nullptr);
    });
  }
  const std::string tag = std::string(kCentered ? "cf layer" : "cf rms") + " B=" + std::to_string(B) + " C=" + std::to_string(C) + " S=" + std::to_string(S) + " block=" + std::to_string(block) + " grid=" + std::to_string(grid) + " T=" + std::to_string(sizeof(T)) + " P=" + std::to_string(sizeof(P)) + " woff=" + num(offset) + " w=" + std::to_string(has_w) + " dx=" + std::to_string(want_dx) + " params=" + std::to_string(want_params) + " mean/spread=" + num(dist.offset / dist.scale);
  std::vector<double> col(C);
  std::vector<ld> rdw(C, 0), rdb(C, 0);
  for (int64_t pos = 0; pos < positions; ++pos) {
    const int64_t base = pos / S * C * S + pos % S;
    for (int c = 0; c < C; ++c) col[c] = to_d(x.p[base + c * S]);
    const RefStats st = ref_norm_stats<kCentered>(col.data(), C);
    if (std::abs(rstd[pos] - st.rs) > (dist.strict ? 64 * ulp<A>() : 1e-4) * st.rs) { fail(tag + " rstd at " + std::to_string(pos)); return; }
    ld sg = 0, sgx = 0;
    for (int c = 0; c < C; ++c) {
      const ld xh = st.xhat(col[c]), d = to_d(dy.p[base + c * S]), g = d * (to_d(w.p[c]) + offset);
      sg += g; sgx += g * xh; rdw[c] += d * xh; rdb[c] += d;
      const double want_y = (double)(xh * (to_d(w.p[c]) + offset) + (kCentered ? to_d(b.p[c]) : 0.0));
      const double got_y = to_d(y.p[base + c * S]);
      const bool y_ok = kCentered && C == 1 ? got_y == to_d(from_d<T>(to_d(b.p[c]))) :
                        std::abs(got_y - want_y) <= (dist.strict ? 32 * ulp<T>() : tol<T>() * 4) * (1 + std::abs(want_y));
      if (!y_ok) { fail(tag + " y at " + std::to_string(pos) + "," + std::to_string(c) + " got " + num(got_y) + " want " + num(want_y)); return; }
    }
    sg = kCentered ? sg / C : 0;
    sgx /= C;
    for (int c = 0; c < C && want_dx; ++c) {
      const ld xh = st.xhat(col[c]), g = to_d(dy.p[base + c * S]) * (to_d(w.p[c]) + offset);
      const double want = (double)(st.rs * (g - sg - xh * sgx)), got = to_d(dx.p[base + c * S]);
      const bool ok = kCentered && C == 1 ? got == 0.0 : std::abs(got - want) <= (dist.strict ? 64 * ulp<T>() : tol<T>() * 8) * (double)(st.rs * (1 + std::abs(g)) * 4);
      if (!ok) { fail(tag + " dx at " + std::to_string(pos) + "," + std::to_string(c) + " got " + num(got) + " want " + num(want)); return; }
    }
  }
  for (int c = 0; c < C && want_params; ++c) {
    const double t = (tol<P>() * 4 + (std::is_same_v<A, double> ? 0 : 1e-5 * positions)) * (double)(1 + std::abs(rdw[c]) + std::sqrt((ld)positions));
    const bool dw_ok = kCentered && C == 1 ? to_d(dw[c]) == 0.0 : std::abs(to_d(dw[c]) - rdw[c]) <= t;
    const bool db_ok = !kCentered || std::abs(to_d(db[c]) - rdb[c]) <= t;
    if (!dw_ok || !db_ok) { fail(tag + " dw/db[" + std::to_string(c) + "] got " + num(to_d(dw[c])) + "/" + num(to_d(db[c])) + " want " + num(rdw[c]) + "/" + num(rdb[c])); return; }
  }
}

template <typename T, typename P>
void channels_first_suite(const std::vector<int>& cs) {
  int cases = 0;
  for (int C : cs) {
    for (const auto& [B, S] : std::vector<std::pair<int64_t, int64_t>>{{1, 5}, {2, 37}, {3, 64}}) {
      const int block = 32 * (1 + (C + (int)S) % 4), grid_cap = 1 + (C + (int)B) % 3;
      test_channels_first<T, P, true>(B, C, S, block, grid_cap, kOrdinary);
      test_channels_first<T, P, false>(B, C, S, block, grid_cap, kOrdinary);
      // No weight, and a backward without dx or without dweight/dbias (no shared memory).
      test_channels_first<T, P, true>(B, C, S, block, grid_cap, kOrdinary, false, S % 2 == 0, S % 2 == 1);
      test_channels_first<T, P, false>(B, C, S, block, grid_cap, kOrdinary, true, true, false);
      cases += 4;
    }
    if constexpr (std::is_same_v<T, float> || std::is_same_v<T, double>) {  // 16-bit x cannot hold such rows
      test_channels_first<T, P, true>(2, C, 9, 64, 2, ill_conditioned<acc_t<T>>());
      cases++;
    }
  }
  std::printf("channels-first T=%zu P=%zu woff=%g: %d cases, failures so far %d (%.0f s)\n", sizeof(T), sizeof(P),
              weight_offset, cases, failures, lap());
}

// ---------------------------------------------------------------- main
int main(int argc, char** argv) {
  std::setvbuf(stdout, nullptr, _IONBF, 0);
  lap();
  const std::string mode = argc > 1 ? argv[1] : "";
  std::vector<int> ns = {1, 2, 3, 4, 5, 7, 8, 9, 15, 16, 17, 31, 33, 63, 64, 65, 127, 128, 129, 255, 256, 257, 263, 513, 1000, 1023, 1024, 1025};
  std::vector<int64_t> ms = {1, 3, 37};
  std::vector<int> ill_ns = ns;
  std::vector<int64_t> hs = {1, 2, 3, 31, 32, 33, 100, 255, 256, 257, 1000, 2048}, bs = {1, 3};
  if (mode == "q") {
    ns = {1, 7, 33, 64, 1024, 1025};  // 1024: rows kernel, one row per block, n % V == 0 (16-byte partial stores)
    ms = {3};
    ill_ns = {2, 1025};
    hs = {1, 33, 257};
    bs = {2};
  } else if (mode == "t") {  // for ThreadSanitizer: every kernel family once, float and bf16
    ns = {33, 1025};
    ms = {3};
    layer_norm_suite<float, float, float, float>(ns, ms, kOrdinary);
    layer_norm_suite<__nv_bfloat16, __nv_bfloat16, __nv_bfloat16, __nv_bfloat16>(ns, ms, kOrdinary);
    cell_suite<float>({1, 33, 257}, {2});
    channels_first_suite<float, float>({1, 7});
    channels_first_suite<__nv_bfloat16, __nv_bfloat16>({3});
    std::printf("%s: %d failures\n", failures ? "FAILED" : "OK", failures);
    return failures != 0;
  } else if (mode == "big") {
    mode_big = true;
    ns = {2047, 2048, 2049, 4096, 4097, 5127, 8192, 8200, 12289, 16385};
    ms = {1, 3};
    ill_ns = {4097, 12289};
    hs = {};
  } else if (mode == "n") {  // n N1 N2 ...: these N with M = 2, 16-bit x only
    mode_big = true;
    ns.clear();
    for (int i = 2; i < argc; ++i) ns.push_back(std::atoi(argv[i]));
    ms = {2};
    layer_norm_suite<__nv_bfloat16, __nv_bfloat16, __nv_bfloat16, __nv_bfloat16>(ns, ms, kOrdinary);
    layer_norm_suite<__half, float, float, float>(ns, ms, kOrdinary);
    std::printf("%s: %d failures\n", failures ? "FAILED" : "OK", failures);
    return failures != 0;
  }
  // The quick mode runs the 16-bit and mixed dtype combinations on fewer shapes.
  const std::vector<int> ns16 = mode == "q" ? std::vector<int>{7, 1025} : ns;
  layer_norm_suite<float, float, float, float>(ns, ms, kOrdinary);
  layer_norm_suite<double, double, double, double>(ns, ms, kOrdinary);
  layer_norm_suite<__nv_bfloat16, __nv_bfloat16, __nv_bfloat16, __nv_bfloat16>(ns16, ms, kOrdinary);
  layer_norm_suite<__half, float, float, float>(ns16, ms, kOrdinary);
  layer_norm_suite<__half, __half, float, __half>(ns16, ms, kOrdinary);
  layer_norm_suite<__nv_bfloat16, float, __nv_bfloat16, float>(ns16, ms, kOrdinary);
  layer_norm_suite<float, float, float, float>(ill_ns, ms, ill_conditioned<float>());
  layer_norm_suite<double, double, double, double>(ill_ns, ms, ill_conditioned<double>());
  // A zero-centered gain (Gemma's 1 + w) on a few shapes of every kernel shape.
  weight_offset = 1.0;
  const std::vector<int> offset_ns = {1, 7, 33, 1025};
  layer_norm_suite<float, float, float, float>(offset_ns, {3}, kOrdinary);
  layer_norm_suite<__nv_bfloat16, float, __nv_bfloat16, float>(offset_ns, {3}, kOrdinary);
  channels_first_suite<float, float>({1, 3});
  weight_offset = 0;
  std::printf("weight_offset = 1: failures so far %d (%.0f s)\n", failures, lap());
  const std::vector<int> cf_cs = mode == "q" ? std::vector<int>{1, 2, 33} : std::vector<int>{1, 2, 3, 8, 33, 96};
  channels_first_suite<float, float>(cf_cs);
  channels_first_suite<double, double>(cf_cs);
  channels_first_suite<__nv_bfloat16, __nv_bfloat16>(cf_cs);
  channels_first_suite<__half, float>(cf_cs);
  if (!hs.empty()) {
    cell_suite<float>(hs, bs);
    cell_suite<double>(hs, bs);
    cell_suite<__half>(hs, bs);
    cell_suite<__nv_bfloat16>(hs, bs);
  }
  std::printf("%s: %d failures\n", failures ? "FAILED" : "OK", failures);
  return failures != 0;
}
