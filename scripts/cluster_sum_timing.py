#!/usr/bin/env python
"""Times the two ways the blocks of a thread-block cluster meet to add their sums
(csrc/kernels/cluster.cuh: ClusterSum; LN_EXT_CLUSTER_SUM=barrier|lean), side by side
on shapes that take the cluster kernels, and says which is faster.

Each variant runs benchmarks/bench_layer_norm.py in its own process (the launchers read
LN_EXT_CLUSTER_SUM once), ln_ext only, which also checks every output against float64.
Writes <out>/cluster_sum.json and prints a Markdown table. Needs a GPU with clusters (sm_90).

    python scripts/cluster_sum_timing.py --out /tmp/cs
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ("barrier", "lean")
# (dtype, N, M): cluster kernels by the launchers' plans on an H100/H200 (132 SMs):
# bf16 N = 262144: the row needs 4 blocks (forward) and 16 (backward with dweight/dbias
# sums); N = 65536 with 16 rows: clusters of 8 to spread few rows; fp32 N = 131072: 4 / 8+.
SHAPES = [("bf16", 262144, 64), ("bf16", 65536, 16), ("fp32", 131072, 32)]


def run_variant(variant: str, out: Path, rep_ms: float) -> dict:
    results = []
    for dtype, n, m in SHAPES:
        folder = out / f"{variant}-{dtype}-{n}-{m}"
        cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_layer_norm.py"), "--device", "cuda",
               "--providers", "ln_ext", "--dtypes", dtype, "--n", str(n), "--m", str(m), "--latency-m", "",
               "--rep-ms", str(rep_ms), "--out", str(folder)]
        env = dict(os.environ, LN_EXT_CLUSTER_SUM=variant, LN_EXT_LOG_LAUNCHES="1")
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        launches = sorted({line for line in proc.stderr.splitlines() if line.startswith("ln_ext launch:")})
        if proc.returncode != 0:
            results.append({"dtype": dtype, "N": n, "M": m, "error": proc.stderr[-2000:], "launches": launches})
            continue
        data = json.loads((folder / "layer_norm.json").read_text())
        for r in data["results"]:
            if r.get("kind") == "throughput" and r["provider"] == "ln_ext":
                results.append({"dtype": dtype, "N": n, "M": m, "mode": r["mode"], "ms": r["ms"],
                                "pct_copy": r.get("pct_copy"), "correct": r.get("correct"), "launches": launches})
    return {"variant": variant, "results": results}


def table(runs: dict) -> str:
    lines = ["| dtype | N | M | pass | barrier ms | lean ms | lean / barrier | correct |",
             "|---|---:|---:|---|---:|---:|---:|---|"]
    by_key = {}
    for variant, run in runs.items():
        for r in run["results"]:
            by_key.setdefault((r["dtype"], r["N"], r["M"], r.get("mode", "error")), {})[variant] = r
    for (dtype, n, m, mode), v in sorted(by_key.items()):
        if mode == "error":
            lines.append(f"| {dtype} | {n} | {m} | FAILED: " + "; ".join(
                f"{k}: {r['error'].splitlines()[-1] if r['error'] else '?'}" for k, r in v.items()) + " | | | |")
            continue
        b, lean = v.get("barrier"), v.get("lean")
        ratio = f"{lean['ms'] / b['ms']:.3f}" if b and lean else "n/a"
        ok = all(r.get("correct") for r in v.values())
        lines.append(f"| {dtype} | {n} | {m} | {mode} | {b['ms'] if b else float('nan'):.4f} | "
                     f"{lean['ms'] if lean else float('nan'):.4f} | {ratio} | {'yes' if ok else 'NO'} |")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--rep-ms", type=float, default=20)
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    runs = {v: run_variant(v, args.out, args.rep_ms) for v in VARIANTS}
    (args.out / "cluster_sum.json").write_text(json.dumps(runs, indent=1))
    print(table(runs))
    launches = sorted({l for run in runs.values() for r in run["results"] for l in r.get("launches", [])})
    print("kernels launched:\n" + "\n".join(launches))
    failed = any("error" in r or not r.get("correct") for run in runs.values() for r in run["results"])
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
