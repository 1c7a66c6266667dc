"""Shared by the examples: where a run happened, and writing its JSON + Markdown results.

Every result file opens with the same header (device, card, date, versions), so a table
copied into the README (scripts/update_readme.py) always says what produced it.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
from typing import Any

import torch

import ln_ext


def pick_device(requested: str) -> torch.device:
    """'auto' is the GPU when there is one and ln_ext was built with its CUDA kernels."""
    if requested == "auto":
        use_cuda = torch.cuda.is_available() and ln_ext.has_cuda_kernels()
        return torch.device("cuda" if use_cuda else "cpu")
    device = torch.device(requested)
    if device.type == "cuda" and not ln_ext.has_cuda_kernels():
        raise SystemExit("--device cuda: this ln_ext build has no CUDA kernels; rebuild with CUDA_HOME set")
    return device


def environment(device: torch.device) -> dict[str, Any]:
    """What produced a result: enough to tell two result files apart."""
    if device.type == "cuda":
        card = torch.cuda.get_device_name(device)
    else:
        card = f"{_cpu_name()}, {torch.get_num_threads()} threads"
    return {
        "device": device.type,
        "card": card,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "ln_ext_cuda_kernels": ln_ext.has_cuda_kernels(),
        "python": platform.python_version(),
        "ln_ext_commit": _git_commit(),
    }


def _cpu_name() -> str:
    """The CPU's model and widest vector extension (CPU results depend on both)."""
    fields = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())  # the first processor's
    except OSError:
        pass
    model = fields.get("model name") or platform.processor() or platform.machine()
    flags = set(fields.get("flags", "").split())
    isa = ("AVX-512" if {"avx512f", "avx512bw", "avx512dq", "avx512vl"} <= flags
           else "AVX2" if "avx2" in flags else None)
    return f"{model} CPU" + (f" ({isa})" if isa else "")


def _git_commit():
    """The checkout's commit when run from a git clone (None otherwise): which ln_ext ran."""
    try:
        done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=os.path.dirname(os.path.abspath(__file__)),
                              capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() or None


def markdown_header(title: str, env: dict[str, Any]) -> str:
    return (
        f"### {title}\n\n"
        f"*{env['card']} ({env['device']}), torch {env['torch']}, {env['date']}*\n"
    )


def markdown_table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def write_results(out_dir: str, stem: str, data: dict[str, Any], markdown: str) -> tuple[str, str]:
    """Writes OUT_DIR/STEM.json and OUT_DIR/STEM.md; returns their paths."""
    os.makedirs(out_dir, exist_ok=True)
    json_path = os.path.join(out_dir, stem + ".json")
    md_path = os.path.join(out_dir, stem + ".md")
    with open(json_path, "w") as f:
        json.dump(data, f, indent=1)
        f.write("\n")
    with open(md_path, "w") as f:
        f.write(markdown)
    return json_path, md_path
