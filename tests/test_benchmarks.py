"""The benchmark scripts and the GPU-check helpers still run: each in its tiniest CPU mode.

No timing is asserted; these catch a benchmark broken by an API change, a report writer that
lost a column, and a correctness check that would let a wrong kernel through.
"""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
TINY_TIMING = ["--device", "cpu", "--rep-ms", "1", "--warmup-ms", "0", "--threads", "1"]


def run_script(*args, timeout=240):
    proc = subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    return proc.returncode, proc.stdout + proc.stderr


@pytest.fixture
def benchmarks(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import bench_layer_norm
    import common

    return common, bench_layer_norm


def test_layer_norm_benchmark_writes_json_markdown_and_plot(tmp_path):
    rc, log = run_script(ROOT / "benchmarks/bench_layer_norm.py", *TINY_TIMING, "--dtypes", "fp32,bf16",
                         "--n", "64,100", "--elements", "1024", "--latency-m", "2", "--providers", "ln_ext,torch",
                         "--out", tmp_path)
    assert rc == 0, log
    payload = json.loads((tmp_path / "layer_norm.json").read_text())
    assert payload["schema"] == "ln_ext.bench.layer_norm/1"
    assert payload["env"]["device"] == "cpu" and payload["env"]["cpu_threads"] == 1
    assert payload["ceilings"]["copy_gbps"] > 0
    timed = {(r["kind"], r["dtype"], r["N"], r["provider"], r["mode"]): r for r in payload["results"] if "ms" in r}
    for dtype in ("fp32", "bf16"):
        for n in (64, 100):
            for mode in ("fwd", "bwd", "fwd_bwd"):
                ours = timed[("throughput", dtype, n, "ln_ext", mode)]
                assert ours["correct"] and ours["M"] == round(1024 / n) and ours["gbps"] > 0 and ours["pct_copy"] > 0
                assert ("throughput", dtype, n, "torch", mode) in timed
        latency = timed[("latency", dtype, 4096, "ln_ext", "fwd_bwd")]
        assert latency["M"] == 2 and latency["wall_us"] > 0
    per_call = {(r["dtype"], r["M"], r["N"], r["provider"], r["mode"]): r["wall_us"]
                for r in payload["results"] if r["kind"] == "per_call"}
    assert len(per_call) == 2 * 2 * 2 * 2 and min(per_call.values()) > 0  # dtypes, shapes, providers, modes
    report = (tmp_path / "layer_norm.md").read_text()
    assert "bench_layer_norm.py" in report and "torch " + torch.__version__ in report  # self-contained header
    assert "### fp32, backward (dx, dweight, dbias)" in report and "| 100 |" in report
    assert "### Per call: tiny shapes (µs)" in report and "| bf16 | 16 × 256 | forward + backward |" in report
    assert payload["completed"] == {"shapes": 6, "of": 6} and "Interrupted" not in report
    assert (tmp_path / "layer_norm.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_layer_norm_benchmark_marks_a_wrong_kernel(benchmarks, tmp_path, monkeypatch):
    common, bench = benchmarks

    def halves_the_bias(weight, bias):
        w = weight.detach().clone().requires_grad_()
        b = bias.detach().clone().requires_grad_()
        return (lambda x: torch.nn.functional.layer_norm(x, w.shape, w, b / 2)), [w, b]

    monkeypatch.setattr(bench.BY_NAME["ln_ext"], "setup", halves_the_bias)
    rc = bench.main([*TINY_TIMING, "--dtypes", "fp32", "--n", "32", "--elements", "256", "--latency-m", "",
                     "--providers", "ln_ext,torch", "--out", str(tmp_path)])
    assert rc == 1  # a mismatching ln_ext fails the run
    results = json.loads((tmp_path / "layer_norm.json").read_text())["results"]
    assert {r["correct"] for r in results if r["provider"] == "ln_ext"} == {False}
    assert {r["correct"] for r in results if r["provider"] == "torch"} == {True}
    report = (tmp_path / "layer_norm.md").read_text()
    assert f"{common.MISMATCH} ln_ext fp32 M=8 N=32: y off by" in report


def test_error_ratio_passes_rounding_and_fails_bugs(benchmarks):
    common, _ = benchmarks
    ref = torch.randn(64, 128, dtype=torch.float64)
    tol = common.TOLERANCE[torch.bfloat16][0]
    assert common.error_ratio(ref.to(torch.bfloat16), ref, tol) <= 1  # rounding to bf16
    assert common.error_ratio((ref * 1.1).to(torch.bfloat16), ref, tol) > 1  # a 10% error
    nan = ref.clone()
    nan[3, 7] = float("nan")
    assert common.error_ratio(nan, ref, tol) == math.inf
    assert common.error_ratio(ref[:, :64], ref, tol) == math.inf  # wrong shape


def test_rnn_benchmark_writes_reports(tmp_path):
    rc, log = run_script(ROOT / "benchmarks/bench_rnn.py", *TINY_TIMING, "--hidden", "8,16", "--seq-len", "3",
                         "--batch", "2", "--out", tmp_path)
    assert rc == 0, log
    payload = json.loads((tmp_path / "rnn.json").read_text())
    assert payload["schema"] == "ln_ext.bench.rnn/1"
    timed = {(r["cell"], r["H"], r["provider"], r["mode"]): r for r in payload["results"] if "ms" in r}
    providers = ["torch", "naive"] + ([] if "ln_ext" in payload["missing"] else ["ln_ext"])
    for cell in ("lstm", "gru"):
        for hidden in (8, 16):
            for provider in providers:
                for mode in ("fwd", "fwd_bwd"):
                    assert timed[(cell, hidden, provider, mode)]["correct"], (cell, hidden, provider, mode)
    report = (tmp_path / "rnn.md").read_text()
    assert "| lstm | fp32 | 16 |" in report and "Interrupted" not in report
    assert (tmp_path / "rnn.png").read_bytes()[:4] == b"\x89PNG"
    if "ln_ext" not in payload["missing"]:  # the inference path keeps less than a saving call
        path = {(r["cell"], r["H"], r["mode"]): r for r in payload["results"] if r["kind"] == "rnn_inference_path"}
        for cell in ("lstm", "gru"):
            for hidden in (8, 16):
                assert path[(cell, hidden, "inference")]["bytes_held"] < path[(cell, hidden, "saving")]["bytes_held"]
        assert "### inference path" in report


def test_norm_family_benchmark_writes_reports(tmp_path):
    rc, log = run_script(ROOT / "benchmarks/bench_norm_family.py", *TINY_TIMING, "--dtypes", "fp32,bf16",
                         "--n", "64,100", "--elements", "1024", "--providers", "ln_ext,torch", "--out", tmp_path)
    assert rc == 0, log
    payload = json.loads((tmp_path / "norm_family.json").read_text())
    assert payload["schema"] == "ln_ext.bench.norm_family/1"
    timed = {(r["op"], r["dtype"], r["N"], r["provider"], r["mode"]): r for r in payload["results"] if "ms" in r}
    for op in ("rms_norm", "add_layer_norm", "add_rms_norm"):
        for dtype in ("fp32", "bf16"):
            for n in (64, 100):
                for mode in ("fwd", "bwd", "fwd_bwd"):
                    ours = timed[(op, dtype, n, "ln_ext", mode)]
                    assert ours["correct"] and ours["gbps"] > 0, (op, dtype, n, mode)
    per_call = {(r["op"], r["dtype"], r["M"], r["provider"], r["mode"]) for r in payload["results"]
                if r.get("kind") == "per_call" and r["wall_us"] > 0}
    assert len(per_call) == 3 * 2 * 2 * 2 * 2  # ops, dtypes, shapes, providers, modes
    report = (tmp_path / "norm_family.md").read_text()
    assert "bench_norm_family.py" in report and "### rms_norm, fp32, forward" in report and "| 100 |" in report
    assert "| add_rms_norm | fp32 | 1 × 64 | forward, no grad |" in report
    assert (tmp_path / "norm_family.png").read_bytes()[:4] == b"\x89PNG"


def test_sanitizer_cases_pass_on_the_cpu_kernels():
    rc, log = run_script(ROOT / "scripts/sanitizer_cases.py", "--device", "cpu")
    assert rc == 0, log


def test_gpu_check_script_parses():
    proc = subprocess.run(["bash", "-n", str(ROOT / "scripts/gpu_check.sh")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_model_norms_benchmark_writes_reports(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("timm")
    rc, log = run_script(ROOT / "benchmarks/bench_model_norms.py", "--device", "cpu", "--tiny", "--rep-ms", "1",
                         "--dtypes", "fp32", "--out", tmp_path)
    assert rc == 0, log
    payload = json.loads((tmp_path / "model_norms.json").read_text())
    rows = {r["form"]: r for r in payload["results"]}
    assert set(rows) == {"llama", "gemma", "ln2d"}
    for form, row in rows.items():
        assert row["correct"], form  # the converted module's outputs and gradients are the original's
        assert all(ms > 0 for ms in row["ms"].values()) and len(row["ms"]) == 8
        assert row["saved_bytes"]["original"] > 0 and row["saved_bytes"]["ln_ext"] > 0
    report = (tmp_path / "model_norms.md").read_text()
    assert "### forward + backward" in report and "| gemma | 16x64 | fp32 |" in report
