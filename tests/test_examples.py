"""The examples still run (tiny --smoke mode, seconds each), and update_readme.py only
touches what lies between its markers.

The smoke runs check what the examples check about themselves (agreement with float64,
checkpoint round trips) and that they write their result files; they measure nothing.
"""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))

import update_readme  # noqa: E402


def run_example(script, out_dir, *args):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, os.path.join(ROOT, "examples", script), "--smoke", "--device", "cpu",
           "--out", str(out_dir), *args]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{' '.join(cmd)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


def test_transformer_dropin_smoke(tmp_path):
    run_example("transformer_dropin.py", tmp_path)
    results = json.loads((tmp_path / "transformer_dropin_cpu.json").read_text())
    assert results["agreement"]["passed"]
    assert results["layer_norms_converted"] == 3  # 2 in the one encoder layer + the final one
    assert all(v["strict_load"] for v in results["checkpoint"].values())
    assert set(results["training"]) == {"nn.LayerNorm eager", "ln_ext eager"}
    fused = results["fused_add"]
    assert fused["agreement"]["passed"]
    assert set(fused["training"]) == {"nn.LayerNorm, add then norm eager", "ln_ext, add then norm eager",
                                      "ln_ext, fused add + norm eager"}
    md = (tmp_path / "transformer_dropin_cpu.md").read_text()
    assert "nn.LayerNorm" in md and results["environment"]["date"] in md and "fused add + norm" in md


def test_ln_rnn_stability_smoke(tmp_path):
    pytest.importorskip("sklearn", reason="the LN-RNN example reads scikit-learn's bundled digits")
    run_example("ln_rnn_stability.py", tmp_path)
    results = json.loads((tmp_path / "ln_rnn_stability_cpu.json").read_text())
    models = {run["model"] for run in results["runs"]}
    assert models == {"tanh RNN", "LN tanh RNN", "LSTM", "LN-LSTM"}
    for run in results["runs"]:
        assert len(run["steps"]) == len(run["test_accuracy"]) and 0.0 <= run["final_accuracy"] <= 1.0
    for png in ("_curves.png", "_gradient_reach.png"):
        assert (tmp_path / f"ln_rnn_stability_cpu{png}").read_bytes()[:4] == b"\x89PNG"


# ---------------------------------------------------------------- update_readme.py
def make_repo(tmp_path):
    results = tmp_path / "examples" / "results"
    results.mkdir(parents=True)
    (results / "transformer_dropin_cpu.md").write_text("### cpu table\n\n*CPU, 2026-01-02 10:00 UTC*\n\n| a |\n")
    (results / "transformer_dropin_cuda.md").write_text("### gpu table\n\n*H100, 2026-01-01 10:00 UTC*\n\n"
                                                        "![plot](plot.png)\n")
    return tmp_path


def test_update_readme_replaces_only_between_markers(tmp_path):
    root = make_repo(tmp_path)
    readme = ("intro, typed by hand\n<!-- BEGIN:transformer_dropin -->\nstale numbers\n"
              "<!-- END:transformer_dropin -->\nmiddle\n"
              "<!-- BEGIN:transformer_dropin src=examples/results/transformer_dropin_cpu.md -->"
              "<!-- END:transformer_dropin -->\noutro\n")
    messages = []
    updated = update_readme.update(readme, str(root), str(root), messages.append)
    before_first = updated.split("<!-- BEGIN:transformer_dropin -->")[0]
    assert before_first == "intro, typed by hand\n"
    assert "\nmiddle\n" in updated and updated.endswith("<!-- END:transformer_dropin -->\noutro\n")
    assert "stale numbers" not in updated
    first, second = updated.split("middle")
    assert "gpu table" in first and "cpu table" not in first  # GPU results preferred
    assert "cpu table" in second  # an explicit src wins
    assert "](examples/results/plot.png)" in first  # relative links rebased to the README
    # Running it again changes nothing.
    assert update_readme.update(updated, str(root), str(root), messages.append) == updated


def test_update_readme_leaves_readme_without_markers_alone(tmp_path):
    root = make_repo(tmp_path)
    readme = "no markers here\n<!-- BEGIN:unknown_section -->x<!-- END:unknown_section -->\n"
    messages = []
    assert update_readme.update(readme, str(root), str(root), messages.append) == readme
    assert any("unknown marker 'unknown_section'" in m for m in messages)
    assert any("transformer_dropin" in m and "no <!-- BEGIN:transformer_dropin -->" in m for m in messages)


def test_update_readme_without_results_keeps_section(tmp_path):
    readme = "<!-- BEGIN:bench_layer_norm -->\nkept\n<!-- END:bench_layer_norm -->\n"
    messages = []
    assert update_readme.update(readme, str(tmp_path), str(tmp_path), messages.append) == readme
    assert any("bench_layer_norm: no source found" in m for m in messages)


def test_update_readme_takes_a_benchmarks_summary_and_links_the_rest(tmp_path):
    results = tmp_path / "benchmarks" / "results" / "cpu-X"
    results.mkdir(parents=True)
    (results / "layer_norm.md").write_text(
        "## LayerNorm: CPU X\n\nCPU X · 2026-01-02 10:00 UTC\n\n<!-- summary -->\n### Summary\n\n| N | fp32 fwd |\n"
        "|---|---:|\n| 256 | 1.30× |\n<!-- /summary -->\n\n### fp32, forward\n\n| every | column |\n\n"
        "![layer_norm plot](layer_norm.png)\n")
    readme = "<!-- BEGIN:bench_layer_norm --><!-- END:bench_layer_norm -->\n"
    updated = update_readme.update(readme, str(tmp_path), str(tmp_path), lambda m: None)
    assert "## LayerNorm: CPU X" in updated and "CPU X · 2026-01-02" in updated and "| 256 | 1.30× |" in updated
    assert "every | column" not in updated  # the full tables stay in the report...
    assert "[layer_norm.md](benchmarks/results/cpu-X/layer_norm.md)" in updated  # ...linked
    assert "](benchmarks/results/cpu-X/layer_norm.png)" in updated


def test_update_readme_snippets_come_from_the_examples(tmp_path):
    readme = "<!-- BEGIN:snippet_dropin --><!-- END:snippet_dropin -->\n"
    updated = update_readme.update(readme, ROOT, ROOT, lambda m: None)
    assert "```python\n" in updated and "ln_ext.convert_layer_norm(" in updated


def test_hf_llama_smoke(tmp_path):
    pytest.importorskip("transformers")
    run_example("hf_llama.py", tmp_path)
    results = json.loads((tmp_path / "hf_llama_cpu.json").read_text())
    assert results["converted"] == {"llama_rms": 5}  # 2 layers x 2 norms + the final one
    assert results["max_loss_gap"] < 1e-4  # same math, same steps: the same loss curve
    assert results["losses"]["ln_ext"][-1] < results["losses"]["ln_ext"][0]
    saved = results["saved_for_backward"]
    assert saved["ln_ext"]["norms"] < saved["transformers"]["norms"]  # x and a float per row, not x in fp32 + x̂
    assert "ln_ext / transformers" in (tmp_path / "hf_llama_cpu.md").read_text()
