"""Host-side model of the CUDA LayerNorm kernels' index math (no GPU needed).

Replays, in Python, how csrc/cuda/*.cu pick a kernel shape and how the kernels in
csrc/kernels/*.cuh walk the 16-byte chunk grid, and checks for every shape given:
  * every element of every row is loaded exactly once and stored exactly once
    (rows kernels: the row fits in group * K chunks; long kernels: strided walk);
  * no access outside the tensor, no vector access that is not 16-byte aligned
    or that leaves its row; parameter vector loads only at columns % V == 0 and
    inside the parameter (rows starting inside a chunk: two aligned neighbours);
  * the fused dweight/dbias path gives every column exactly one accumulator, and
    rows not starting on a chunk read their staging row only where it was written;
  * the param_cols grid covers every (row, column) once and keeps grid.y <= 65535;
  * the cluster kernels: the blocks of a cluster cover every chunk of a row once,
    every column has one dweight/dbias owner whose cache (its chunks and the next)
    holds it, and the cluster sizes the launchers pick for the long rows;
  * the add + norm variants: the residual, h (fwd) and dh (bwd) are read and written at
    x's element indices, chunk by chunk, so they inherit x's coverage; what is left to
    check is that each chunk of them, in their own dtype, is whole 16-byte vectors.
Run: python scripts/kernel_check/index_model.py   (prints a summary, exits 1 on a failure)
"""
import itertools
import sys

MULTI_ROW_BLOCK, LONG_BLOCK = 256, 1024
FWD_BIG_K, FWD_MAX_GROUP = 4, 512
BWD_BIG_K, BWD_MAX_GROUP = 2, 512
COL_TILE, COL_ROW_LANES, COL_BLOCKS_PER_SM = 32, 8, 8


def max_chunks_per_row(n, v):
    return n // v if n % v == 0 else (n + 2 * (v - 1)) // v


def pow2_at_least(v):
    p = 1
    while p < v:
        p *= 2
    return p


def ceil_div(a, b):
    return (a + b - 1) // b


def choose_rows_config(chunks, big_k, max_group):
    if chunks <= 32:
        return 1, pow2_at_least(chunks), MULTI_ROW_BLOCK
    if chunks <= big_k * max_group:
        group = pow2_at_least(ceil_div(chunks, big_k))
        return big_k, group, (MULTI_ROW_BLOCK if group <= 32 else group)
    return 0, 0, LONG_BLOCK


def row_chunks(row, n, v):
    start = row * n
    first = start // v
    head = start - first * v
    return first, head, (head + n + v - 1) // v


def walk_row(m, n, v, vec_ok, row, chunk_ids, loads, elem_bytes=16):
    """Accesses of the chunks `chunk_ids` of `row`; returns (param_vec_cols)."""
    first, head, count = row_chunks(row, n, v)
    pvec = []
    for s in chunk_ids:
        if s >= count:
            continue
        col0 = s * v - head
        full = vec_ok and col0 >= 0 and col0 + v <= n
        base = (first + s) * v
        if full:
            assert base % v == 0  # 16-byte aligned (chunk index * 16 bytes)
            for e in range(base, base + v):
                assert row * n <= e < row * n + n, "vector access leaves the row"
                loads[e] = loads.get(e, 0) + 1
            # weight/bias: one aligned vector load, or (row starting inside a chunk) two
            # aligned neighbours shifted, both inside the parameter [0, n)
            aligned = col0 // v * v
            if aligned == col0:
                pvec.append(col0)
            elif aligned + 2 * v <= n:
                assert aligned % v == 0 and aligned <= col0 and col0 + v <= aligned + 2 * v
                pvec.extend((aligned, aligned + v))
        else:
            for i in range(v):
                c = col0 + i
                if 0 <= c < n:
                    e = base + i
                    assert e == row * n + c
                    loads[e] = loads.get(e, 0) + 1
    assert all(c % v == 0 and 0 <= c and c + v <= n for c in pvec), "parameter vector load"
    return pvec


def check_rows_kernel(m, n, v, vec_ok, k, group, block, grid):
    loads = {}
    rpb = block // group
    assert block % group == 0 and block % 32 == 0 and (group <= 32 or group == block)
    for b in range(grid):
        batch = b * rpb
        while batch < m:
            for t in range(block):
                row = batch + t // group
                if row >= m:
                    continue
                lane = t % group
                walk_row(m, n, v, vec_ok, row, [kk * group + lane for kk in range(k)], loads)
            batch += grid * rpb
    return loads


def check_long_kernel(m, n, v, vec_ok, grid, block=LONG_BLOCK):
    loads = {}
    for b in range(grid):
        for row in range(b, m, grid):
            _, _, count = row_chunks(row, n, v)
            for t in range(min(block, count)):
                walk_row(m, n, v, vec_ok, row, range(t, count, block), loads)
    return loads


def check_fused_params(m, n, v, k, group, rpb):
    """The rows kernel's fused dweight/dbias: each column has exactly one accumulator
    (k, i, lane); with N % V == 0 it is the thread's own chunk column in every row, else
    the staging row holds column j at head + j, inside what the row's chunks wrote."""
    chunks = max_chunks_per_row(n, v)
    staged = n % v != 0
    def column(kk, i, lane):
        return lane + (kk * v + i) * group if staged else (kk * group + lane) * v + i
    owners = [column(kk, i, lane) for lane in range(group) for kk in range(k) for i in range(v)]
    owners = [c for c in owners if c < n]
    assert sorted(owners) == list(range(n)), "fused partial: a column with no or two owners"
    stage_len = chunks * v
    for r in range(min(m, 2 * v)):
        _, head, count = row_chunks(r, n, v)
        if not staged:
            assert head == 0 and count == n // v
            continue
        written = set(range(0, min(count, k * group) * v))  # chunks s < count store V values
        assert all(head + j in written and head + j < stage_len for j in range(n)), "staging read"
    acc_bytes = 8 if v == 2 else 4
    smem = rpb * 2 * stage_len * acc_bytes if staged else (rpb * n * acc_bytes if rpb > 1 else 0)
    assert smem <= 64 * 1024 + 1024 and (not staged or 2 * stage_len >= n)


SMEM_OPTIN_SM90 = 227 * 1024 - 1024  # dynamic_shared_memory_limit() on sm_90
MAX_CLUSTER_BLOCKS, MAX_PORTABLE_CLUSTER_BLOCKS = 16, 8


def cluster_slice_chunks(chunks, blocks):
    return ceil_div(chunks, blocks)


def check_cluster_kernel(m, n, v, vec_ok, blocks, clusters):
    """Chunks of each row split over the cluster's blocks (each walks its own slice);
    dweight/dbias columns: one owner each, read from inside that block's cache."""
    loads = {}
    slice_chunks = cluster_slice_chunks(max_chunks_per_row(n, v), blocks)
    for c in range(clusters):
        for row in range(c, m, clusters):
            _, head, count = row_chunks(row, n, v)
            owners = []
            for rank in range(blocks):
                begin = min(rank * slice_chunks, count)
                end = min(begin + slice_chunks, count)
                cache_end = min(end + 1, count)
                walk_row(m, n, v, vec_ok, row, range(begin, end), loads)
                col_begin = min(rank * slice_chunks * v, n)
                col_end = min(col_begin + slice_chunks * v, n)
                for j in range(col_begin, col_end):
                    e = head + j - begin * v
                    assert 0 <= e < (cache_end - begin) * v <= (slice_chunks + 1) * v, "cluster column cache"
                    owners.append(j)
            assert sorted(owners) == list(range(n)), "cluster columns: none or two owners"
    return loads


def plan_cluster_blocks(chunks, rows, smem_for, sms=132):
    """Cluster blocks per row the launchers pick (0: the long kernel), before the
    device's occupancy check."""
    blocks = 1
    while blocks <= MAX_CLUSTER_BLOCKS and smem_for(cluster_slice_chunks(chunks, blocks)) > SMEM_OPTIN_SM90:
        blocks *= 2
    if blocks > MAX_CLUSTER_BLOCKS:
        return 0
    while blocks < MAX_PORTABLE_CLUSTER_BLOCKS and rows * blocks * 2 <= sms:
        blocks *= 2
    return 0 if blocks == 1 else blocks


def check_cluster_plans():
    header = 16 * ceil_div((96 + 3 * 3) * 4, 16)  # cluster_header_words: block_sums scratch, ClusterSum slots and totals
    fwd = lambda t: (lambda s: header + s * 16)  # x chunks of 16 bytes
    def bwd(t_bytes, dy_bytes, sums):
        v = 16 // t_bytes
        return lambda s: header + (2 * ((s * v + 3) // 4 * 4) * 4 if sums else 0) + (s + 1) * v * (t_bytes + dy_bytes)
    facts = [  # (what, chunks, rows, smem_for, expected blocks)
        ("fwd bf16 N=262144, many rows", 262144 // 8, 256, fwd(2), 4),
        ("fwd bf16 N=65536, many rows (one block holds the row)", 65536 // 8, 1024, fwd(2), 0),
        ("fwd bf16 N=65536, 16 rows (spread over 128 SMs)", 65536 // 8, 16, fwd(2), 8),
        ("fwd fp32 N=262144", 262144 // 4, 256, fwd(4), 8),
        ("bwd bf16 N=262144 with sums", 262144 // 8, 256, bwd(2, 2, True), 16),
        ("bwd bf16 N=262144 without sums", 262144 // 8, 256, bwd(2, 2, False), 8),
        ("bwd bf16 N=32768 with sums", 32768 // 8, 2048, bwd(2, 2, True), 2),
        ("bwd bf16 N=16384 with sums (the long kernel)", 16384 // 8, 4096, bwd(2, 2, True), 0),
        ("bwd fp32 N=262144 with sums (too large)", 262144 // 4, 256, bwd(4, 4, True), 0),
        ("bwd fp32 N=262144 without sums", 262144 // 4, 256, bwd(4, 4, False), 16),
    ]
    for what, chunks, rows, smem_for, want in facts:
        got = plan_cluster_blocks(chunks, rows, smem_for)
        assert got == want, f"cluster plan {what}: {got} blocks, expected {want}"


def assert_once(loads, m, n, what):
    assert len(loads) == m * n and all(c == 1 for c in loads.values()), \
        f"{what}: {m}x{n} covered {len(loads)} elements, counts {set(loads.values())}"
    assert min(loads) == 0 and max(loads) == m * n - 1


def check_shape(m, n, v, vec_ok, sms=132, threads_per_sm=2048):
    chunks = max_chunks_per_row(n, v)
    assert all(row_chunks(r, n, v)[2] <= chunks for r in range(min(m, 4 * v)))
    for big_k, max_group, name in ((FWD_BIG_K, FWD_MAX_GROUP, "fwd"), (BWD_BIG_K, BWD_MAX_GROUP, "bwd")):
        k, group, block = choose_rows_config(chunks, big_k, max_group)
        if k:
            assert group * k >= chunks and group <= max_group
            rpb = block // group
            grid = max(1, min(ceil_div(m, rpb), sms * max(1, threads_per_sm // block)))
            assert_once(check_rows_kernel(m, n, v, vec_ok, k, group, block, grid), m, n, f"{name} rows")
            if name == "bwd":
                check_fused_params(m, n, v, k, group, rpb)
        else:
            grid = max(1, min(m, sms * max(1, threads_per_sm // LONG_BLOCK)))
            assert_once(check_long_kernel(m, n, v, vec_ok, grid), m, n, f"{name} long")
    for blocks in (1, 2, 3, 4, 16):
        clusters = max(1, min(m, 7))
        assert_once(check_cluster_kernel(m, n, v, vec_ok, blocks, clusters), m, n, f"cluster x{blocks}")
    # param_cols grid
    col_tiles = ceil_div(n, COL_TILE)
    max_slices = min(65535, max(1, m // (4 * COL_ROW_LANES)))
    slices = min(max(ceil_div(sms * COL_BLOCKS_PER_SM, col_tiles), 1), max_slices)
    rows_per_slice = ceil_div(m, slices)
    slices = ceil_div(m, rows_per_slice)
    assert slices <= 65535 and slices * rows_per_slice >= m and (slices - 1) * rows_per_slice < m


# (x element bytes, residual/h element bytes): the dtype pairs the ops accept (a residual
# stream of x's dtype, or float32 beside a 16-bit x).
RESIDUAL_PAIRS = ((2, 2), (2, 4), (4, 4), (8, 8))


def check_residual_chunks(chunks=4096):
    """A chunk of x is V = 16 / size(x) elements; the same elements of the residual/h
    are V * size(R) bytes at byte offset chunk * V * size(R): whole, aligned 16-byte
    vectors when R is at least as wide as x, which every accepted pair is."""
    for x_size, r_size in RESIDUAL_PAIRS:
        v = 16 // x_size
        for c in range(chunks):
            offset, width = c * v * r_size, v * r_size
            assert offset % 16 == 0 and width % 16 == 0, \
                f"residual chunk {c}: x {x_size} B, R {r_size} B: offset {offset}, {width} bytes"


def main():
    shapes = 0
    ns = list(range(1, 130)) + [255, 256, 257, 511, 1000, 1023, 1024, 1025, 2049, 4095, 4097,
                                5127, 8192, 12289, 16384, 16385, 32768, 65537]
    for v, vec_ok in itertools.product((2, 4, 8), (True, False)):
        for n in ns:
            for m in ((1, 3, 37) if n <= 1025 else (1, 3)):
                check_shape(m, n, v, vec_ok)
                shapes += 1
    # a very tall problem's param_cols grid (2^31 / N rows)
    for n in (1, 7, 1024):
        m = (2 ** 31) // n + 5
        col_tiles = ceil_div(n, COL_TILE)
        max_slices = min(65535, max(1, m // (4 * COL_ROW_LANES)))
        slices = min(max(ceil_div(132 * COL_BLOCKS_PER_SM, col_tiles), 1), max_slices)
        assert ceil_div(m, ceil_div(m, slices)) <= 65535
    check_cluster_plans()
    check_residual_chunks()
    print(f"kernel_index_model: {shapes} (M, N, V, aligned) cases OK")


if __name__ == "__main__":
    try:
        main()
    except AssertionError as e:
        print("FAIL:", e)
        sys.exit(1)
