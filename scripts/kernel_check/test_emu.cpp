// Runs the real kernel code (csrc/kernels/*.cuh, rewritten for the host by run_host_emulation.sh)
// against a float64 reference. Index math, barriers, shuffles, alignment, OOB (ASan).
#include "emu_runtime.h"
#include "kernels/layer_norm_fwd.cuh"
#include "kernels/layer_norm_bwd.cuh"

#include <algorithm>
#include <random>
#include <string>
#include <type_traits>

using namespace ln_ext::kernels;

// launcher logic, copied from csrc/cuda/launch_common.cuh
int pow2_at_least(int v) { int p = 1; while (p < v) p *= 2; return p; }
int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
struct Cfg { int k, group, block; int rpb() const { return block / group; } };
Cfg choose(int chunks, int big_k, int max_group) {
  if (chunks <= 32) return {1, pow2_at_least(chunks), 256};
  if (chunks <= big_k * max_group) { int g = pow2_at_least((int)ceil_div(chunks, big_k)); return {big_k, g, g <= 32 ? 256 : g}; }
  return {0, 0, 1024};
}

// Chunks of a row the long kernels cache: all, none, or a part (standing in for
// rows longer than shared memory), by shape.
int cached_of(int64_t M, int N, int chunks) {
  switch ((M + N) % 3) {
    case 0: return chunks;
    case 1: return 0;
    default: return chunks / 2 + 1 < chunks ? chunks / 2 + 1 : chunks;
  }
}

std::mt19937 rng(1234);
template <typename T> T from_d(double v) { if constexpr (std::is_same_v<T, __half>) return __float2half_rn((float)v); else if constexpr (std::is_same_v<T, __nv_bfloat16>) return __float2bfloat16_rn((float)v); else return (T)v; }
template <typename T> double to_d(T v) { if constexpr (std::is_same_v<T, __half>) return __half2float(v); else if constexpr (std::is_same_v<T, __nv_bfloat16>) return __bfloat162float(v); else return (double)v; }
template <typename T> double tol() { if constexpr (std::is_same_v<T, __half>) return 2e-3; else if constexpr (std::is_same_v<T, __nv_bfloat16>) return 1.6e-2; else if constexpr (std::is_same_v<T, float>) return 2e-5; else return 1e-12; }

// A buffer of n elements whose first element sits `offset` elements past a 16-byte boundary;
// exactly sized so ASan flags any access past either end.
template <typename T> struct Buf {
  T* base = nullptr; T* p = nullptr; size_t n;
  Buf(size_t n_, int offset) : n(n_) {
    // 16-byte aligned base, no padding at the end (ASan poisons from the exact size on).
    void* mem = nullptr;
    if (posix_memalign(&mem, 16, std::max<size_t>(1, (n + offset) * sizeof(T))) != 0) std::abort();
    base = static_cast<T*>(mem);
    p = base + offset;
  }
  ~Buf() { std::free(base); }
};

int failures = 0;
bool mode_big = false;  // long rows: run the cluster kernels on them too
void fail(const std::string& what) { if (++failures < 30) std::fprintf(stderr, "FAIL %s\n", what.c_str()); }

// force_long_block: run the long kernel (or, with cluster > 0, the cluster kernel with clusters of
// `cluster` blocks) with blocks of that many threads, whatever N.
template <typename T, typename P, typename Y>
void test_fwd(int64_t M, int N, int offset, bool has_w, bool has_b, int grid_cap, int force_long_block, int cluster = 0) {
  using A = acc_t<T>; constexpr int V = kVecElems<T>;
  Buf<T> x(M * N, offset); Buf<Y> y(M * N, offset % 2); Buf<P> w(N, 0), b(N, 0);
  std::vector<A> mean(M), rstd(M);
  std::normal_distribution<double> nd(0.5, 2.0);
  for (int64_t i = 0; i < M * N; ++i) x.p[i] = from_d<T>(nd(rng));
  for (int i = 0; i < N; ++i) { w.p[i] = from_d<P>(nd(rng)); b.p[i] = from_d<P>(nd(rng)); }
  FwdParams<T, P, Y> p{x.p, has_w ? w.p : nullptr, has_b ? b.p : nullptr, y.p, mean.data(), rstd.data(), M, N, (A)1e-5,
                       reinterpret_cast<uintptr_t>(x.p) % 16 == 0 && reinterpret_cast<uintptr_t>(y.p) % 16 == 0, true};
  const int chunks = max_chunks_per_row(N, V);
  Cfg c = choose(chunks, 4, 512);
  if (force_long_block) c.k = 0;
  if (cluster) {
    const int slice = cluster_slice_chunks(chunks, cluster);
    const size_t smem = cluster_header_words<A>() * 16 + (size_t)slice * V * sizeof(T);
    const int grid = (int)std::max<int64_t>(1, std::min<int64_t>(M, grid_cap)) * cluster;
    emu_launch({(unsigned)grid}, {(unsigned)force_long_block}, smem, [&] { layer_norm_fwd_cluster_kernel<T, P, Y>(p, slice); }, cluster);
  } else if (c.k) {
    int grid = (int)std::max<int64_t>(1, std::min<int64_t>(ceil_div(M, c.rpb()), grid_cap));
    emu_launch({(unsigned)grid}, {(unsigned)c.block}, 0, [&] {
      if (c.k == 1) layer_norm_fwd_rows_kernel<T, P, Y, 1>(p, c.group); else layer_norm_fwd_rows_kernel<T, P, Y, 4>(p, c.group);
    });
  } else {
    const int block = force_long_block ? force_long_block : 1024;
    const int cached = cached_of(M, N, chunks);
    int grid = (int)std::max<int64_t>(1, std::min<int64_t>(M, grid_cap));
    emu_launch({(unsigned)grid}, {(unsigned)block}, (size_t)cached * V * sizeof(T), [&] { layer_norm_fwd_long_kernel<T, P, Y>(p, cached); });
  }
  const std::string tag = "fwd M=" + std::to_string(M) + " N=" + std::to_string(N) + " off=" + std::to_string(offset) + " k=" + std::to_string(c.k) + " cluster=" + std::to_string(cluster) + " T=" + std::to_string(sizeof(T)) + " P=" + std::to_string(sizeof(P)) + " Y=" + std::to_string(sizeof(Y)) + " w=" + std::to_string(has_w) + " b=" + std::to_string(has_b);
  for (int64_t r = 0; r < M; ++r) {
    double mu = 0, var = 0;
    for (int j = 0; j < N; ++j) mu += to_d(x.p[r * N + j]);
    mu /= N;
    for (int j = 0; j < N; ++j) { double d = to_d(x.p[r * N + j]) - mu; var += d * d; }
    var /= N;
    const double rs = 1.0 / std::sqrt(var + 1e-5);
    if (!(std::abs(mean[r] - mu) <= 1e-5 * (1 + std::abs(mu))) || !(std::abs(rstd[r] - rs) <= 1e-4 * rs)) { fail(tag + " stats row " + std::to_string(r)); return; }
    for (int j = 0; j < N; ++j) {
      double ref = (to_d(x.p[r * N + j]) - mu) * rs * (has_w ? to_d(w.p[j]) : 1.0) + (has_b ? to_d(b.p[j]) : 0.0);
      double got = to_d(y.p[r * N + j]);
      double t = std::max(tol<Y>(), 2e-5 * (std::is_same_v<A, double> ? 0 : 1)) * (1 + std::abs(ref)) * 4;
      if (!(std::abs(got - ref) <= t)) { fail(tag + " y[" + std::to_string(r) + "," + std::to_string(j) + "] got " + std::to_string(got) + " want " + std::to_string(ref)); return; }
    }
  }
}

template <typename T, typename DY, typename P>
void test_bwd(int64_t M, int N, int offset, bool has_w, bool want_dx, bool want_params, int grid_cap, int force_long_block, int cluster = 0) {
  using A = acc_t<T>; constexpr int V = kVecElems<T>;
  Buf<T> x(M * N, offset), dx(M * N, offset); Buf<DY> dy(M * N, offset); Buf<P> w(N, 0);
  std::vector<A> mean(M), rstd(M);
  std::normal_distribution<double> nd(0.5, 2.0);
  for (int64_t i = 0; i < M * N; ++i) { x.p[i] = from_d<T>(nd(rng)); dy.p[i] = from_d<DY>(nd(rng)); }
  for (int i = 0; i < N; ++i) w.p[i] = from_d<P>(nd(rng));
  for (int64_t r = 0; r < M; ++r) {
    double mu = 0, var = 0;
    for (int j = 0; j < N; ++j) mu += to_d(x.p[r * N + j]);
    mu /= N;
    for (int j = 0; j < N; ++j) { double d = to_d(x.p[r * N + j]) - mu; var += d * d; }
    mean[r] = (A)mu; rstd[r] = (A)(1.0 / std::sqrt(var / N + 1e-5));
  }
  BwdParams<T, DY, P> p{dy.p, x.p, mean.data(), rstd.data(), has_w ? w.p : nullptr, want_dx ? dx.p : nullptr, nullptr, M, N,
                        reinterpret_cast<uintptr_t>(x.p) % 16 == 0 && reinterpret_cast<uintptr_t>(dy.p) % 16 == 0 && reinterpret_cast<uintptr_t>(dx.p) % 16 == 0, true};
  const int chunks = max_chunks_per_row(N, V);
  Cfg c = choose(chunks, 2, 512);
  if (force_long_block) c.k = 0;
  const bool fuse = want_params && c.k != 0;
  std::vector<A> partials;
  int partial_blocks = 0;
  bool fuse_long = false;
  if (cluster) {
    // cluster kernel: dweight/dbias sums of each block's columns in shared memory (here:
    // unless (M + N) % 3 == 0, standing in for "too large", which takes param_cols)
    fuse_long = want_params && (M + N) % 3 != 0;
    const int slice = cluster_slice_chunks(chunks, cluster);
    const int clusters = (int)std::max<int64_t>(1, std::min<int64_t>(M, grid_cap));
    const size_t smem = cluster_header_words<A>() * 16 + (fuse_long ? 2 * (size_t)long_param_cols(slice * V) * sizeof(A) : 0) +
                        (size_t)(slice + 1) * V * (sizeof(T) + sizeof(DY));
    if (fuse_long) { partials.assign((size_t)clusters * 2 * N, (A)-777); p.partials = partials.data(); partial_blocks = clusters; }
    if (want_dx || fuse_long) emu_launch({(unsigned)(clusters * cluster)}, {(unsigned)force_long_block}, smem, [&] { layer_norm_bwd_cluster_kernel<T, DY, P>(p, slice); }, cluster);
  } else if (c.k && (want_dx || fuse)) {
    int grid = (int)std::max<int64_t>(1, std::min<int64_t>(ceil_div(M, c.rpb()), grid_cap));
    size_t smem = 0;
    if (fuse) { partials.assign((size_t)grid * 2 * N, (A)-777); p.partials = partials.data(); partial_blocks = grid; if (N % V != 0) smem = (size_t)c.rpb() * 2 * chunks * V * sizeof(A); else if (c.rpb() > 1) smem = c.rpb() * N * sizeof(A); }
    emu_launch({(unsigned)grid}, {(unsigned)c.block}, smem, [&] {
      if (c.k == 1) layer_norm_bwd_rows_kernel<T, DY, P, 1>(p, c.group); else layer_norm_bwd_rows_kernel<T, DY, P, 2>(p, c.group);
    });
  } else if (c.k == 0) {
    // long kernel: dweight/dbias sums in shared memory (here: unless (M + N) % 3 == 0,
    // standing in for "too large", which takes param_cols), row cache or not
    fuse_long = want_params && (M + N) % 3 != 0;
    const int block = force_long_block ? force_long_block : 1024;
    const int cached = want_dx ? cached_of(M + 1, N, chunks) : 0;
    int grid = (int)std::max<int64_t>(1, std::min<int64_t>(M, grid_cap));
    const size_t smem = (fuse_long ? 2 * (size_t)long_param_cols(N) * sizeof(A) : 0) + (size_t)cached * V * (sizeof(T) + sizeof(DY));
    if (fuse_long) { partials.assign((size_t)grid * 2 * N, (A)-777); p.partials = partials.data(); partial_blocks = grid; }
    if (want_dx || fuse_long) emu_launch({(unsigned)grid}, {(unsigned)block}, smem, [&] { layer_norm_bwd_long_kernel<T, DY, P>(p, cached); });
  }
  if (want_params && !fuse && !fuse_long) {
    const int64_t col_tiles = ceil_div(N, kColTile);
    const int64_t max_slices = std::min<int64_t>(65535, std::max<int64_t>(1, M / (4 * kColRowLanes)));
    int64_t slices = std::clamp<int64_t>(ceil_div(grid_cap * 8, col_tiles), 1, max_slices);
    const int64_t rps = ceil_div(M, slices);
    slices = ceil_div(M, rps);
    partials.assign((size_t)slices * 2 * N, (A)-777);
    emu_launch({(unsigned)col_tiles, (unsigned)slices}, {kColTile, kColRowLanes}, 0, [&] {
      layer_norm_bwd_param_cols_kernel<T, DY>(dy.p, x.p, mean.data(), rstd.data(), partials.data(), M, N, rps);
    });
    partial_blocks = (int)slices;
  }
  std::vector<P> dw(N), db(N);
  if (want_params) {
    emu_launch({(unsigned)ceil_div(N, kColTile)}, {kColTile, kColRowLanes}, 0, [&] {
      layer_norm_bwd_param_reduce_kernel<A, P>(partials.data(), partial_blocks, N, dw.data(), db.data());
    });
  }
  const std::string tag = "bwd M=" + std::to_string(M) + " N=" + std::to_string(N) + " off=" + std::to_string(offset) + " k=" + std::to_string(c.k) + " cluster=" + std::to_string(cluster) + " fuse=" + std::to_string(fuse) + std::to_string(fuse_long) + " T=" + std::to_string(sizeof(T)) + " DY=" + std::to_string(sizeof(DY)) + " P=" + std::to_string(sizeof(P)) + " w=" + std::to_string(has_w) + " dx=" + std::to_string(want_dx) + " params=" + std::to_string(want_params);
  std::vector<double> rdw(N, 0), rdb(N, 0);
  for (int64_t r = 0; r < M; ++r) {
    double sg = 0, sgx = 0;
    for (int j = 0; j < N; ++j) {
      const double xh = (to_d(x.p[r * N + j]) - mean[r]) * rstd[r], d = to_d(dy.p[r * N + j]), g = d * (has_w ? to_d(w.p[j]) : 1.0);
      sg += g; sgx += g * xh; rdw[j] += d * xh; rdb[j] += d;
    }
    sg /= N; sgx /= N;
    if (!want_dx) continue;
    for (int j = 0; j < N; ++j) {
      const double xh = (to_d(x.p[r * N + j]) - mean[r]) * rstd[r], g = to_d(dy.p[r * N + j]) * (has_w ? to_d(w.p[j]) : 1.0);
      const double ref = rstd[r] * (g - sg - xh * sgx), got = to_d(dx.p[r * N + j]);
      const double t = tol<T>() * 8 * (1 + std::abs(ref)) * (std::is_same_v<A, double> ? 1 : 1);
      if (!(std::abs(got - ref) <= t + (std::is_same_v<A, double> ? 0 : 1e-4 * std::sqrt((double)N)))) { fail(tag + " dx[" + std::to_string(r) + "," + std::to_string(j) + "] got " + std::to_string(got) + " want " + std::to_string(ref)); return; }
    }
  }
  if (want_params) {
    for (int j = 0; j < N; ++j) {
      const double t = (tol<P>() * 4 + (std::is_same_v<A, double> ? 0 : 1e-5 * M)) * (1 + std::abs(rdw[j]) + std::sqrt((double)M));
      if (!(std::abs(to_d(dw[j]) - rdw[j]) <= t) || !(std::abs(to_d(db[j]) - rdb[j]) <= t)) { fail(tag + " dw/db[" + std::to_string(j) + "] got " + std::to_string(to_d(dw[j])) + "/" + std::to_string(to_d(db[j])) + " want " + std::to_string(rdw[j]) + "/" + std::to_string(rdb[j])); return; }
    }
  }
}

template <typename T, typename P, typename Y, typename DY>
void suite(const std::vector<int>& ns, const std::vector<int64_t>& ms) {
  constexpr int V = kVecElems<T>;
  int cases = 0;
  for (int n : ns) for (int64_t m : ms) {
    if ((int64_t)n * m > 300000) continue;
    const int off = (n + (int)m) % 3 == 0 ? 1 : 0;  // sometimes a misaligned base
    const int grid_cap = 1 + (n + (int)m) % 3;       // force grid-stride loops
    test_fwd<T, P, Y>(m, n, off, n % 2 == 0, n % 3 != 0, grid_cap, 0);
    test_bwd<T, DY, P>(m, n, off, n % 4 != 1, true, true, grid_cap, 0);
    test_bwd<T, DY, P>(m, n, 0, true, n % 2 == 0, n % 2 == 1, grid_cap, 0);
    if (n <= 700) {  // the long kernels on short rows too, small blocks: several chunks per thread
      test_fwd<T, P, Y>(m, n, off, true, true, grid_cap, 64);
      test_bwd<T, DY, P>(m, n, off, true, true, true, grid_cap, 32);
      test_bwd<T, DY, P>(m, n, 0, n % 2 == 0, false, true, grid_cap, 64);
    }
    if (n <= 1100 || mode_big) {  // the cluster kernels: 1..4 blocks a row, small blocks
      const int cluster = 1 + (n + (int)m) % 4;
      test_fwd<T, P, Y>(m, n, off, n % 3 != 0, true, grid_cap, 64, cluster);
      test_bwd<T, DY, P>(m, n, off, true, true, true, grid_cap, 32 * cluster, cluster);
      test_bwd<T, DY, P>(m, n, 0, n % 2 == 1, n % 2 == 0, true, grid_cap, 64, 5 - cluster);
    }
    cases++;
  }
  std::printf("suite T=%zu P=%zu Y=%zu DY=%zu V=%d: %d shapes, failures so far %d\n", sizeof(T), sizeof(P), sizeof(Y), sizeof(DY), V, cases, failures);
}

int main(int argc, char** argv) {
  std::setvbuf(stdout, nullptr, _IONBF, 0);
  const std::string mode = argc > 1 ? argv[1] : "";
  std::vector<int> ns = {1, 2, 3, 4, 5, 7, 8, 9, 15, 16, 17, 31, 33, 63, 64, 65, 127, 128, 129, 255, 256, 257, 263, 513, 1000, 1023, 1024, 1025};
  std::vector<int64_t> ms = {1, 3, 37};
  if (mode == "q") {
    ns = {7, 33, 64, 1025};
    ms = {3};
  } else if (mode == "big") {
    mode_big = true;
    ns = {2047, 2048, 2049, 4096, 4097, 5127, 8192, 8200, 12289, 16385};
    ms = {1, 3};
  } else if (mode == "n") {  // n N1 N2 ...: these N with M = 2, 16-bit x only
    mode_big = true;
    ns.clear();
    for (int i = 2; i < argc; ++i) ns.push_back(std::atoi(argv[i]));
    ms = {2};
    suite<__nv_bfloat16, __nv_bfloat16, __nv_bfloat16, __nv_bfloat16>(ns, ms);
    suite<__half, float, float, float>(ns, ms);
    std::printf("%s: %d failures\n", failures ? "FAILED" : "OK", failures);
    return failures != 0;
  }
  suite<float, float, float, float>(ns, ms);
  suite<double, double, double, double>(ns, ms);
  suite<__nv_bfloat16, __nv_bfloat16, __nv_bfloat16, __nv_bfloat16>(ns, ms);
  suite<__half, float, float, float>(ns, ms);
  suite<__half, __half, float, __half>(ns, ms);
  suite<__nv_bfloat16, float, __nv_bfloat16, float>(ns, ms);
  std::printf("%s: %d failures\n", failures ? "FAILED" : "OK", failures);
  return failures != 0;
}
