// Element types, conversions and 16-byte vector access to the rows of a
// contiguous [M, N] tensor. Device code only; knows nothing of torch.
//
// The chunk grid: every row is cut along the 16-byte grid of the *flattened*
// tensor. Chunk c holds flattened elements [c*V, (c+1)*V), V = 16 / sizeof(T)
// for the input element type T (8 for half/bfloat16, 4 for float, 2 for double).
// A row [r*N, r*N + N) touches `count` consecutive chunks starting at `first`;
// its first element sits `head` elements into the first chunk. When N % V != 0
// the rows start at varying offsets inside a chunk, so the first and last chunk
// of a row are only partly the row's: those are moved element by element (the
// "peeled head and tail"), every other chunk with 16-byte loads/stores. Tensors
// of other element types (y, dy, weight...) use the same element index, so a
// chunk of them is V elements = 16 or 32 bytes, aligned whenever x's is.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <cstring>

#include "platform.cuh"

namespace ln_ext {
namespace kernels {

// Accumulation type: float for float/half/bfloat16, double for double.
template <typename T>
struct AccOf {
  using type = float;
};
template <>
struct AccOf<double> {
  using type = double;
};
template <typename T>
using acc_t = typename AccOf<T>::type;

// Elements of T per 16-byte access.
template <typename T>
constexpr int kVecElems = 16 / static_cast<int>(sizeof(T));

__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }
__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }

// acc -> storage type, round to nearest even.
template <typename T>
struct FromAcc;
template <>
struct FromAcc<float> {
  __device__ __forceinline__ static float cast(float v) { return v; }
};
template <>
struct FromAcc<double> {
  __device__ __forceinline__ static double cast(double v) { return v; }
};
template <>
struct FromAcc<__half> {
  __device__ __forceinline__ static __half cast(float v) { return __float2half_rn(v); }
};
template <>
struct FromAcc<__nv_bfloat16> {
  __device__ __forceinline__ static __nv_bfloat16 cast(float v) { return __float2bfloat16_rn(v); }
};
template <typename T, typename A>
__device__ __forceinline__ T from_acc(A v) {
  return FromAcc<T>::cast(v);
}

// min and max of two ints, the same in device code and in the host emulation.
__host__ __device__ constexpr int imin(int a, int b) { return a < b ? a : b; }
__host__ __device__ constexpr int imax(int a, int b) { return a > b ? a : b; }

// Whether a chunk is in a row cache in shared memory (value true) or read from the
// tensor (false), as a type: code that picks its source pointer by it compiles to
// plain shared-memory or global loads, where a pointer chosen at run time would be a
// generic one (LD, which must test the address space on every access).
template <bool kCached>
struct InCache {
  static constexpr bool value = kCached;
};

// f(s, InCache<...>{}) for this thread's chunks s = threadIdx.x + m * blockDim.x of a
// row of `count` chunks whose first `cached` chunks are in a row cache.
template <typename F>
__device__ __forceinline__ void for_chunks_split(int cached, int count, F&& f) {
  const int split = imin(cached, count);
  int s = threadIdx.x;
  for (; s < split; s += blockDim.x) f(s, InCache<true>{});
  for (; s < count; s += blockDim.x) f(s, InCache<false>{});
}

// The chunks of one row; see the file comment.
struct RowChunks {
  int64_t first;  // flattened chunk index of the row's first chunk
  int head;       // the row starts `head` elements into that chunk, 0 <= head < V
  int count;      // chunks the row touches
};

template <int V>
__device__ __forceinline__ RowChunks row_chunks(int64_t row, int n) {
  const int64_t start = row * n;
  RowChunks rc;
  rc.first = start / V;
  rc.head = static_cast<int>(start - rc.first * V);
  rc.count = (rc.head + n + V - 1) / V;
  return rc;
}

// Upper bound of RowChunks::count over all rows (host and device).
__host__ __device__ constexpr int max_chunks_per_row(int n, int v) {
  return n % v == 0 ? n / v : (n + 2 * (v - 1)) / v;
}

// Chunk s of a row covers the row's columns [col0, col0 + V) with col0 = s*V - head.
// `full`: all of them are in the row and the tensors are 16-byte aligned.
template <int V>
__device__ __forceinline__ bool chunk_is_full(bool vec_ok, int col0, int n) {
  return vec_ok && col0 >= 0 && col0 + V <= n;
}

__device__ __forceinline__ bool in_row(int col, int n) {
  return static_cast<unsigned>(col) < static_cast<unsigned>(n);
}

// V elements of T at a 16-byte aligned address as 16-byte words (LDG.128 / STG.128).
template <int V, typename T>
__device__ __forceinline__ void load_words(const T* src, T (&dst)[V]) {
  static_assert((sizeof(T) * V) % 16 == 0, "a chunk must be whole 16-byte words");
  constexpr int kWords = sizeof(T) * V / 16;
  LN_EXT_ASSERT_ALIGNED16(src);
  LN_EXT_ASSERT_ALIGNED16(dst);
  const uint4* s = reinterpret_cast<const uint4*>(src);
  uint4* d = reinterpret_cast<uint4*>(dst);
#pragma unroll
  for (int w = 0; w < kWords; ++w) d[w] = s[w];
}

template <int V, typename T>
__device__ __forceinline__ void store_words(T* dst, const T (&src)[V]) {
  static_assert((sizeof(T) * V) % 16 == 0, "a chunk must be whole 16-byte words");
  constexpr int kWords = sizeof(T) * V / 16;
  LN_EXT_ASSERT_ALIGNED16(src);
  LN_EXT_ASSERT_ALIGNED16(dst);
  const uint4* s = reinterpret_cast<const uint4*>(src);
  uint4* d = reinterpret_cast<uint4*>(dst);
#pragma unroll
  for (int w = 0; w < kWords; ++w) d[w] = s[w];
}

// A chunk load in two phases, so that a thread issues the 16-byte loads of all its
// chunks (of every tensor it reads) back to back before the first conversion waits on
// one: load_chunk_words, then convert_chunk. Loading and converting chunk by chunk kept
// one load in flight per thread (each LDG waited on by the next instruction).
// Phase one: the raw words of a full chunk (a predicated load), zeros when not full:
// words left unwritten on a path stayed live around the row loops (ptxas cannot tell
// that phase two reads them only when full), a register each through every reduction.
template <int V, typename T>
__device__ __forceinline__ void load_chunk_words(const T* chunk, bool full, T (&raw)[V]) {
  static_assert((sizeof(T) * V) % 16 == 0, "a chunk must be whole 16-byte words");
  if (full) {
    load_words<V>(chunk, raw);
  } else {
    uint4* d = reinterpret_cast<uint4*>(raw);
#pragma unroll
    for (int w = 0; w < static_cast<int>(sizeof(T) * V / 16); ++w) d[w] = make_uint4(0, 0, 0, 0);
  }
}

// Phase two: out[v] = chunk[v] as acc for the columns col0 + v inside the row, `fill`
// elsewhere: from `raw` (load_chunk_words) when full, else element by element from memory.
// `chunk` points at the chunk's first element (which may precede the row).
template <typename A, int V, typename T>
__device__ __forceinline__ void convert_chunk(const T* chunk, const T (&raw)[V], bool full, int col0, int n,
                                              A fill, A (&out)[V]) {
  if (full) {
#pragma unroll
    for (int v = 0; v < V; ++v) out[v] = to_acc(raw[v]);
  } else {
#pragma unroll
    for (int v = 0; v < V; ++v) out[v] = in_row(col0 + v, n) ? A(to_acc(chunk[v])) : fill;
  }
}

// Both phases for one chunk.
template <typename A, int V, typename T>
__device__ __forceinline__ void load_chunk(const T* chunk, bool full, int col0, int n, A fill,
                                           A (&out)[V]) {
  alignas(16) T raw[V];
  load_chunk_words<V>(chunk, full, raw);
  convert_chunk(chunk, raw, full, col0, n, fill, out);
}

// Writes the elements of the chunk that lie inside the row.
template <typename T, int V, typename A>
__device__ __forceinline__ void store_chunk(T* chunk, bool full, int col0, int n,
                                            const A (&in)[V]) {
  if (full) {
    alignas(16) T raw[V];
#pragma unroll
    for (int v = 0; v < V; ++v) raw[v] = from_acc<T>(in[v]);
    store_words<V>(chunk, raw);
  } else {
#pragma unroll
    for (int v = 0; v < V; ++v) {
      if (in_row(col0 + v, n)) chunk[v] = from_acc<T>(in[v]);
    }
  }
}

// Copies the chunk's in-row elements (raw, no conversion), e.g. into a shared-memory row cache.
template <int V, typename T>
__device__ __forceinline__ void copy_chunk(const T* src, T* dst, bool full, int col0, int n) {
  if (full) {
    alignas(16) T raw[V];
    load_words<V>(src, raw);
    store_words<V>(dst, raw);
  } else {
#pragma unroll
    for (int v = 0; v < V; ++v) {
      if (in_row(col0 + v, n)) dst[v] = src[v];
    }
  }
}

// Copies chunks [begin, end) of a row (chunk s at src + s * V; the row starts `head`
// elements into chunk 0) raw to dst + (s - begin) * V, e.g. into a shared-memory row
// cache. Thread t copies the chunks begin + t + m * blockDim.x, the same ones it
// later works on, so the copy needs no barrier for the thread's own reads. Each
// thread loads kBatchBytes of chunks before it stores any: the long-row kernels
// run one 1024-thread block per multiprocessor, and one 16-byte load in flight per
// thread (16 KB per multiprocessor) is too few to keep HBM busy. The batch costs
// registers (64 at 1024 threads): the backward kernels spill at 64 bytes.
template <int V, int kBatchBytes, typename T>
__device__ __forceinline__ void cache_chunks(const T* src, T* dst, int begin, int end, int head,
                                             int n, bool vec_ok) {
  constexpr int kCacheBatch = kBatchBytes / (V * sizeof(T)) > 0 ? kBatchBytes / (V * sizeof(T)) : 1;
  for (int s0 = begin + static_cast<int>(threadIdx.x); s0 < end;
       s0 += kCacheBatch * static_cast<int>(blockDim.x)) {
    alignas(16) T raw[kCacheBatch][V];
    bool full[kCacheBatch];
#pragma unroll
    for (int u = 0; u < kCacheBatch; ++u) {
      const int s = s0 + u * static_cast<int>(blockDim.x);
      full[u] = s < end && chunk_is_full<V>(vec_ok, s * V - head, n);
      if (full[u]) load_words<V>(src + s * V, raw[u]);
    }
#pragma unroll
    for (int u = 0; u < kCacheBatch; ++u) {
      const int s = s0 + u * static_cast<int>(blockDim.x);
      if (s >= end) break;
      if (full[u]) {
        store_words<V>(dst + (s - begin) * V, raw[u]);
      } else {
        copy_chunk<V>(src + s * V, dst + (s - begin) * V, false, s * V - head, n);
      }
    }
  }
}

// weight/bias for the columns [col0, col0 + V) of a row: `fill` when the parameter
// is absent or for columns outside the row. `vec`: the chunk is full (so col0 >= 0)
// and the parameter is 16-byte aligned. Then a chunk starting on a column multiple
// of V (every row when N % V == 0) is one vector load; a row starting `head`
// columns into a chunk (N % V != 0) needs columns [col0, col0 + V) = the tail of the
// aligned chunk at V * (col0 / V) and the head of the next: two vector loads (L1
// hits: every row reads the same parameters) and a shift by r = col0 % V through
// log2(V) select stages, in place of V scalar loads, which made odd-N rows
// load/store-unit bound. The last chunks of a row, whose next aligned chunk would
// pass the end of the parameter, load per element.
template <typename A, int V, typename P>
__device__ __forceinline__ void load_param_chunk(const P* p, bool vec, int col0, int n, A fill,
                                                 A (&out)[V]) {
  if (p == nullptr) {
#pragma unroll
    for (int v = 0; v < V; ++v) out[v] = fill;
    return;
  }
  // Only for parameters as wide as x (one 16-byte word a chunk): float parameters
  // next to 16-bit x (32 bytes a chunk) took 17 more registers in the one-chunk rows
  // kernels (40 -> 57, 64 -> 80), a third less occupancy for every N.
  constexpr bool kShiftParams = sizeof(P) * V == 16;
  const int aligned_col = vec ? col0 / V * V : 0;
  const int r = col0 - aligned_col;
  if (vec && r == 0) {
    alignas(16) P raw[V];
    load_words<V>(p + col0, raw);
#pragma unroll
    for (int v = 0; v < V; ++v) out[v] = to_acc(raw[v]);
  } else if (kShiftParams && vec && aligned_col + 2 * V <= n) {
    // The two aligned chunks as 8 32-bit words, shifted down by r elements: whole
    // words through select stages (constant indices keep them in registers; 16-bit
    // elements as arrays compiled to local memory), then half a word for 16-bit P.
    uint32_t lo[4], hi[4], w[8];
    load_words<4>(reinterpret_cast<const uint32_t*>(p + aligned_col), lo);
    load_words<4>(reinterpret_cast<const uint32_t*>(p + aligned_col + V), hi);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      w[i] = lo[i];
      w[4 + i] = hi[i];
    }
    const int shift_bytes = r * static_cast<int>(sizeof(P));
#pragma unroll
    for (int bit = 2; bit > 0; bit /= 2) {
      const bool shift = ((shift_bytes / 4) & bit) != 0;
#pragma unroll
      for (int i = 0; i + bit < 8; ++i) w[i] = shift ? w[i + bit] : w[i];
    }
    if (sizeof(P) == 2 && (shift_bytes & 2) != 0) {
#pragma unroll
      for (int i = 0; i < 4; ++i) w[i] = (w[i] >> 16) | (w[i + 1] << 16);
    }
    P raw[V];
    memcpy(raw, w, sizeof(raw));
#pragma unroll
    for (int v = 0; v < V; ++v) out[v] = to_acc(raw[v]);
  } else {
#pragma unroll
    for (int v = 0; v < V; ++v) out[v] = in_row(col0 + v, n) ? A(to_acc(p[col0 + v])) : fill;
  }
}

// A norm's gain at the chunk's columns: offset + weight (a zero-centered weight: Gemma's
// 1 + w, the offset a kernel argument, not a tensor). An absent weight is a gain of 1 whatever
// the offset (as channels_first.cuh's channel_gain; the ops refuse an offset without a weight).
template <typename A, int V, typename P>
__device__ __forceinline__ void load_gain_chunk(const P* weight, A offset, bool vec, int col0, int n,
                                                A (&out)[V]) {
  load_param_chunk(weight, vec, col0, n, A(1), out);
  if (weight == nullptr) return;
#pragma unroll
  for (int v = 0; v < V; ++v) out[v] += offset;
}

}  // namespace kernels
}  // namespace ln_ext
