"""Shared parts of the ln_ext benchmarks: environment info, timing, bandwidth ceilings,
correctness checks, progress bar and the JSON / Markdown / PNG writers.

The benchmark scripts run as `python benchmarks/<script>.py` from a checkout, so this
module also puts the repository root on sys.path: the in-place build (ln_ext/_C*.so)
is then what gets benchmarked, even when another ln_ext is installed.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import json
import math
import os
import platform
import re
import shlex
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(1, str(REPO_ROOT))

import torch  # noqa: E402

GIB = 1 << 30
MIB = 1 << 20

# Short dtype names used on the command line, in JSON and in tables:
# name -> (input dtype, weight/bias dtype). "mixed" is the mixed-precision training case.
DTYPES = {
    "bf16": (torch.bfloat16, torch.bfloat16),
    "fp16": (torch.float16, torch.float16),
    "fp32": (torch.float32, torch.float32),
    "fp64": (torch.float64, torch.float64),
    "mixed": (torch.bfloat16, torch.float32),
}

# Relative tolerance per input dtype for (forward, backward) outputs compared with a
# float64 reference: a few units in the last place of the output dtype. Backward is
# looser because dx mixes three row reductions and dweight/dbias sum over all rows.
TOLERANCE = {
    torch.float64: (1e-10, 1e-9),
    torch.float32: (1e-4, 1e-3),
    torch.float16: (5e-3, 1e-2),
    torch.bfloat16: (2e-2, 4e-2),
}


# ----------------------------------------------------------------------------- arguments


def csv_list(kind: Callable = str) -> Callable[[str], list]:
    """argparse type for comma-separated lists: `--n 1024,4096`."""

    def parse(text: str) -> list:
        return [kind(item) for item in text.split(",") if item.strip()]

    return parse


def pick_device(requested: Optional[str]) -> torch.device:
    """--device, else the GPU when torch sees one; a CUDA device always with its index
    (torch.cuda.set_device rejects a bare 'cuda')."""
    device = torch.device(requested or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda was asked for, but torch sees no CUDA GPU")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
    return device


# ----------------------------------------------------------------------------- environment


def _run_quiet(cmd: Sequence[str], timeout: float = 10.0) -> Optional[str]:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO_ROOT)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown-cpu"


def _module_version(name: str) -> Optional[str]:
    try:
        module = __import__(name)
    except Exception:  # noqa: BLE001  (an optional package may fail to import in many ways)
        return None
    return getattr(module, "__version__", "unknown")


# glibc's malloc (under PyTorch's CPU allocator) gives every allocation of 32 MiB or more fresh
# mmap pages and trims freed heap memory, so CPU timings of large outputs measure page faults,
# for every provider alike (fp32 [2048, 4096] LayerNorm: ~7 GB/s; with these: ~36 GB/s).
STEADY_MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(1 << 30), "MALLOC_TRIM_THRESHOLD_": str(1 << 30)}


def rerun_with_steady_malloc() -> None:
    """On glibc, re-runs this script once with STEADY_MALLOC_ENV (malloc reads it only at
    start-up), so that CPU benchmarks compare kernels rather than page faults. Both
    providers run under it; the report's header says so."""
    if platform.libc_ver()[0] != "glibc" or all(os.environ.get(k) == v for k, v in STEADY_MALLOC_ENV.items()):
        return
    sys.stdout.flush()
    os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **STEADY_MALLOC_ENV})


def cpu_vector_isa() -> str:
    """The widest x86 vector extension the CPU reports (CPU ratios depend on it)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.machine() or "unknown"
    flags = {f for line in text.splitlines() if line.startswith("flags") for f in line.split(":", 1)[1].split()}
    if {"avx512f", "avx512bw", "avx512dq", "avx512vl"} <= flags:
        return "AVX-512"
    if "avx2" in flags:
        return "AVX2"
    return "SSE" if "sse2" in flags else platform.machine() or "unknown"


# What caps the instruction set of ln_ext's, torch's, oneDNN's and MKL's CPU kernels: an AVX2
# comparison on an AVX-512 CPU sets them all.
ISA_CAP_ENV = ("LN_EXT_CPU_ISA", "ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")


def environment(device: torch.device) -> dict:
    """Everything needed to interpret (and reproduce) a run."""
    env = {
        "date_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
        "git_commit": _run_quiet(["git", "rev-parse", "--short=12", "HEAD"]),
        "git_dirty": bool(_run_quiet(["git", "status", "--porcelain", "--untracked-files=no"])),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda_runtime": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "triton": _module_version("triton"),
        "cpu": cpu_model(),
        "cpu_vector_isa": cpu_vector_isa(),
        # The ISA torch's own CPU kernels run (ATEN_CPU_CAPABILITY may cap it, as LN_EXT_CPU_ISA
        # caps ln_ext's: an AVX2 comparison on an AVX-512 CPU caps both).
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "device": device.type,
        "malloc_env": {k: os.environ[k] for k in STEADY_MALLOC_ENV if k in os.environ},
        "isa_caps": {k: os.environ[k] for k in ISA_CAP_ENV if k in os.environ},
    }
    try:
        import ln_ext

        env["ln_ext_cuda_kernels"] = ln_ext.has_cuda_kernels()
        env["ln_ext_cpu_kernels"] = ln_ext._C.cpu_kernel_isas()
    except Exception as exc:  # noqa: BLE001
        env["ln_ext_import_error"] = f"{type(exc).__name__}: {exc}"
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(
            gpu=props.name,
            sm_count=props.multi_processor_count,
            capability=f"{props.major}.{props.minor}",
            gpu_memory_gib=round(props.total_memory / GIB, 1),
            l2_cache_mib=round(getattr(props, "L2_cache_size", 0) / MIB, 1) or None,
            driver=_run_quiet(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]),
        )
        if env["driver"]:
            env["driver"] = env["driver"].splitlines()[0]
    return env


def card_name(env: dict) -> str:
    return env["gpu"] if env["device"] == "cuda" else f"CPU {env['cpu']}"


def card_slug(env: dict) -> str:
    """Folder name for a card: 'NVIDIA-H100-80GB-HBM3', 'cpu-AMD-EPYC'."""
    raw = env["gpu"] if env["device"] == "cuda" else f"cpu-{env['cpu']}"
    return re.sub(r"[^A-Za-z0-9._-]", "", re.sub(r"\s+", "-", raw.strip())) or "unknown"


def default_out_dir(env: dict) -> Path:
    return REPO_ROOT / "benchmarks" / "results" / card_slug(env)


def header_line(env: dict) -> str:
    """One line that makes a Markdown report self-contained."""
    parts = [card_name(env)]
    if env["device"] == "cuda":
        parts += [f"{env['sm_count']} SMs", f"driver {env.get('driver') or '?'}", f"CUDA {env['cuda_runtime']}"]
    else:
        parts += [env.get("cpu_vector_isa", "?")]
        if env.get("ln_ext_cpu_kernels"):
            parts.append("ln_ext kernels " + ", ".join(f"{k} {v}" for k, v in sorted(env["ln_ext_cpu_kernels"].items())))
        if env.get("torch_cpu_capability"):
            parts.append(f"torch kernels {env['torch_cpu_capability']}")
        parts += [f"{env['cpu_threads']} threads"]
        if env.get("isa_caps"):
            parts.append(" ".join(f"{k}={v}" for k, v in env["isa_caps"].items()))
        if env.get("malloc_env"):
            parts.append(" ".join(f"{k}={v}" for k, v in env["malloc_env"].items()))
    parts += [f"torch {env['torch']}"]
    if env.get("triton"):
        parts.append(f"triton {env['triton']}")
    if env.get("git_commit"):
        parts.append(f"ln_ext {env['git_commit']}{'+dirty' if env['git_dirty'] else ''}")
    parts += [env["date_utc"], f"`{env['command']}`"]
    return " · ".join(parts)


# ----------------------------------------------------------------------------- timing


def timing_method(device: torch.device) -> str:
    if device.type == "cpu":
        return "wall clock (time.perf_counter), median"
    if _module_version("triton") is not None:
        return "triton.testing.do_bench, median, L2 flushed before each run"
    return "CUDA events, median, L2 flushed before each run"


def _median_cuda_events_ms(fn: Callable[[], object], warmup_ms: float, rep_ms: float) -> float:
    """do_bench's method without triton: flush L2 by writing a buffer larger than it
    before each timed run, time each run with a pair of CUDA events, take the median."""
    l2 = getattr(torch.cuda.get_device_properties(torch.cuda.current_device()), "L2_cache_size", 0)
    flush = torch.empty(max(256 * MIB, 4 * l2), dtype=torch.int8, device="cuda")
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(5):
        flush.zero_()
        fn()
    end.record()
    torch.cuda.synchronize()
    estimate_ms = max(start.elapsed_time(end) / 5, 1e-3)
    for _ in range(max(1, int(warmup_ms / estimate_ms))):
        fn()
    n_rep = min(max(5, int(rep_ms / estimate_ms)), 10_000)
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(n_rep)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(n_rep)]
    for i in range(n_rep):
        flush.zero_()
        starts[i].record()
        fn()
        ends[i].record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends))


def _median_wall_ms(fn: Callable[[], object], warmup_ms: float, rep_ms: float) -> float:
    fn()
    deadline = time.perf_counter() + warmup_ms / 1e3
    while time.perf_counter() < deadline:
        fn()
    times: list[float] = []
    stop = time.perf_counter() + rep_ms / 1e3
    while (len(times) < 5 or time.perf_counter() < stop) and len(times) < 10_000:
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def time_ms(fn: Callable[[], object], device: torch.device, rep_ms: float = 100, warmup_ms: float = 25) -> float:
    """Median time of one call of `fn` in milliseconds: device time on a GPU (L2 flushed
    before each run), wall time on the CPU. `fn` runs first once as a warm-up."""
    if device.type == "cpu":
        return _median_wall_ms(fn, warmup_ms, rep_ms)
    try:
        from triton.testing import do_bench
    except ImportError:
        return _median_cuda_events_ms(fn, warmup_ms, rep_ms)
    return float(do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))


def interleaved_ms(fns: Sequence[Callable[[], object]], device: torch.device, rep_ms: float = 100,
                   warmup_ms: float = 25, rounds: int = 5) -> list[float]:
    """time_ms of each fn, taken in `rounds` interleaved rounds (fn 0, fn 1, ..., fn 0, ...) of
    rep_ms / rounds each; each fn's best round. On a shared or frequency-scaling CPU a slow
    spell then hits every fn of a comparison alike instead of whichever ran during it."""
    best = [float("inf")] * len(fns)
    for r in range(rounds):
        for i, fn in enumerate(fns):
            ms = time_ms(fn, device, rep_ms=rep_ms / rounds, warmup_ms=warmup_ms if r == 0 else 0)
            best[i] = min(best[i], ms)
    return best


def wall_us_per_call(fn: Callable[[], object], device: torch.device, calls: int = 200, repeats: int = 5) -> float:
    """Wall time per call of back-to-back calls, host (Python, dispatcher, launch) included:
    what a training loop sees when the work per call is small. Median over `repeats`."""

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(10):
        fn()
    sync()
    per_call = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        sync()
        per_call.append((time.perf_counter() - t0) / calls)
    return statistics.median(per_call) * 1e6


# Per-call cost: shapes so small that a call is all host time (Python, dispatcher, autograd,
# launch), the whole cost of a decode step's norm.
PER_CALL_SHAPES = ((1, 64), (16, 256))
PER_CALL_MODES = {"no_grad": "forward, no grad", "fwd_bwd": "forward + backward"}


def no_grad_call(fn: Callable, *args) -> Callable[[], object]:
    def call():
        with torch.no_grad():
            return fn(*args)

    return call


# Column titles of the passes in the summary tables.
MODE_SHORT = {"fwd": "fwd", "bwd": "bwd", "fwd_bwd": "fwd+bwd"}


def timed_per_call(calls: Sequence[tuple[dict, Callable[[], object]]], device: torch.device) -> list[dict]:
    """The (record, call) pairs timed by per_call_us: each record with its wall_us."""
    times = per_call_us([call for _, call in calls], device)
    return [dict(record, wall_us=us) for (record, _), us in zip(calls, times)]


def per_call_us(fns: Sequence[Callable[[], object]], device: torch.device, calls: int = 200,
                rounds: int = 9) -> list[float]:
    """Wall µs per call of back-to-back calls of each fn, host included, the fns interleaved
    round by round (each sees the same machine state) and each one's best round kept: the
    cost a small call does not go below, which noise only adds to."""

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for fn in fns:
        for _ in range(20):
            fn()
    best = [math.inf] * len(fns)
    for _ in range(rounds):
        for k, fn in enumerate(fns):
            sync()
            t0 = time.perf_counter()
            for _ in range(calls):
                fn()
            sync()
            best[k] = min(best[k], (time.perf_counter() - t0) / calls * 1e6)
    return best


def per_call_markdown(records: Iterable[dict], providers: Sequence[str], labels: dict,
                      group: Sequence[str] = ("dtype",)) -> list[str]:
    """The per-call table's lines: a row per (group fields, shape, mode), µs per provider,
    then each peer's time over ln_ext's."""
    recs = [r for r in records if r.get("kind") == "per_call"]
    if not recs:
        return []
    present = [p for p in providers if any(r["provider"] == p and "wall_us" in r for r in recs)]
    peers = [p for p in present if p != "ln_ext"]
    key = lambda r: (tuple(r[g] for g in group), r["M"], r["N"], r["mode"])  # noqa: E731
    keys = list(dict.fromkeys(key(r) for r in recs if "wall_us" in r))
    headers = [*group, "M × N", "call", *[labels[p] for p in present], *[f"ln_ext vs {labels[p]}" for p in peers]]
    rows = []
    for k in keys:
        cell = {p: next((r for r in recs if key(r) == k and r["provider"] == p and "wall_us" in r), None)
                for p in present}
        row = [*k[0], f"{k[1]} × {k[2]}", PER_CALL_MODES[k[3]]]
        row += ["—" if c is None else f"{c['wall_us']:.1f}" + ("" if c.get("correct", True) else " " + MISMATCH)
                for c in cell.values()]
        ours = cell.get("ln_ext")
        row += [fmt_ratio(cell[p]["wall_us"] / ours["wall_us"]) if ours and cell[p] else "—" for p in peers]
        rows.append(row)
    return ["### Per call: tiny shapes (µs)", "",
            "Wall time per call, best of interleaved rounds of back-to-back calls: Python, dispatcher, "
            "autograd and launch included. torch eager: nn.LayerNorm / F.rms_norm (add + norm: the add, "
            "then the norm).", "", markdown_table(headers, rows), ""]


def gbps(nbytes: float, ms: float) -> float:
    return nbytes / (ms * 1e-3) / 1e9


def measure_ceilings(device: torch.device, rep_ms: float = 100) -> dict:
    """The card's bandwidth measured now, for expressing every kernel as a fraction of it.

    copy: dst.copy_(src), bytes read + written. read2_write1: torch.add(x, y, out=z),
    the traffic shape of the LayerNorm backward (read x and dy, write dx). Buffers are
    far larger than any L2/L3 cache.
    """
    nbytes = 512 * MIB if device.type == "cuda" else 64 * MIB
    n = nbytes // 4
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    other = torch.randn(n, device=device)
    copy_ms = time_ms(lambda: dst.copy_(src), device, rep_ms=rep_ms)
    add_ms = time_ms(lambda: torch.add(src, other, out=dst), device, rep_ms=rep_ms)
    return {
        "buffer_bytes": nbytes,
        "copy_gbps": gbps(2 * nbytes, copy_ms),
        "read2_write1_gbps": gbps(3 * nbytes, add_ms),
    }


# ----------------------------------------------------------------------------- correctness


def error_ratio(out: torch.Tensor, ref: torch.Tensor, tol: float) -> float:
    """max |out - ref| / (tol * (|ref| + max(rms(ref), 1))) over all elements.

    <= 1 means within tolerance. The rms term keeps elements whose true value is near
    zero (common in dweight/dbias) from demanding an impossible relative accuracy.
    NaN/Inf anywhere gives inf: NaN never passes.
    """
    if out.shape != ref.shape:
        return math.inf
    if out.numel() == 0:
        return 0.0
    out = out.detach().to(torch.float64)
    ref = ref.detach().to(device=out.device, dtype=torch.float64)
    if not bool(torch.isfinite(out).all()):
        return math.inf
    scale = max(float(ref.square().mean().sqrt()), 1.0)
    return float(((out - ref).abs() / (tol * (ref.abs() + scale))).max())


MISMATCH = "✗"  # marks a timing whose outputs missed the reference, in every table


def mismatch_notes(records: Iterable[dict], describe: Callable[[dict], str]) -> list[str]:
    """Markdown bullets naming each provider/shape whose check failed, with its worst output."""
    notes = {}
    for r in records:
        if r.get("correct") is False:
            ratios = r["check"]["error_ratio"]
            worst = max(ratios, key=ratios.get)
            notes[describe(r)] = f"- {MISMATCH} {describe(r)}: {worst} off by {ratios[worst]:.3g}× the tolerance"
    return list(notes.values())


def error_notes(records: Iterable[dict], label: Callable[[str], str]) -> list[str]:
    """Markdown bullets for the 'n/a' cells: each provider's distinct failure reasons."""
    notes = {}
    for r in records:
        if "error" in r:
            notes.setdefault((r["provider"], r["error"]), f"- n/a, {label(r['provider'])}: {r['error']}")
    return list(notes.values())


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


@contextlib.contextmanager
def sigterm_as_interrupt():
    """Within the block, SIGTERM (what `timeout` sends) raises KeyboardInterrupt, so that a
    benchmark stopped early can still write the shapes it finished."""
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


# ----------------------------------------------------------------------------- progress


class _PlainProgress:
    """Stand-in for tqdm when it is not installed: a line every 10%."""

    def __init__(self, total: int, desc: str):
        self.total, self.desc, self.done, self.next_pct = max(total, 1), desc, 0, 10

    def update(self, n: int = 1):
        self.done += n
        pct = 100 * self.done // self.total
        if pct >= self.next_pct:
            print(f"{self.desc}: {pct}% ({self.done}/{self.total})", file=sys.stderr, flush=True)
            self.next_pct = pct - pct % 10 + 10

    def set_postfix_str(self, text: str):
        pass

    def close(self):
        pass


def progress(total: int, desc: str):
    try:
        from tqdm import tqdm
    except ImportError:
        return _PlainProgress(total, desc)
    # In a log file (not a terminal) redraw rarely: each redraw is another line there.
    return tqdm(total=total, desc=desc, file=sys.stderr, dynamic_ncols=True,
                mininterval=0.2 if sys.stderr.isatty() else 15.0)


# ----------------------------------------------------------------------------- writers


def write_json(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)

    def clean(value):
        if isinstance(value, float) and not math.isfinite(value):
            return None if math.isnan(value) else str(value)
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [clean(v) for v in value]
        return value

    path.write_text(json.dumps(clean(payload), indent=1) + "\n")


def write_results(payload: dict, stem: str, out_dir: Optional[Path], report: Callable[[dict], str],
                  plot: Callable[[dict, Path], Optional[Path]], reference: str, total: int) -> int:
    """Write <stem>.json/.md/.png under out_dir, print the report, and return the exit
    status: 130 when stopped early, 1 when ln_ext missed `reference`, else 0 (a peer
    that misses it is only reported)."""
    out_dir = out_dir or default_out_dir(payload["env"])
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / f"{stem}.json", payload)
    png = plot(payload, out_dir / f"{stem}.png")
    text = report(payload) + (f"\n\n![{stem} plot]({png.name})" if png else "")
    (out_dir / f"{stem}.md").write_text(text + "\n")
    print(text)
    print(f"\nwrote {out_dir / (stem + '.json')}, {stem}.md" + (f", {stem}.png" if png else ""), file=sys.stderr)
    wrong = sorted({r["provider"] for r in payload["results"] if r.get("correct") is False})
    if wrong:
        print(f"outputs that did not match {reference}: {', '.join(wrong)}", file=sys.stderr)
    if payload["completed"]["shapes"] < total:
        return 130
    return 1 if "ln_ext" in wrong else 0


SUMMARY_BEGIN, SUMMARY_END = "<!-- summary -->", "<!-- /summary -->"


def summary_block(title: str, text: str, headers: Sequence[str], rows: Iterable[Sequence[object]]) -> list[str]:
    """A report's one summary table, between markers: scripts/update_readme.py puts it (and
    a link to the whole report) in the README instead of every table."""
    return [SUMMARY_BEGIN, f"### {title}", "", text, "", markdown_table(headers, rows), SUMMARY_END, ""]


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---:" if i else "---" for i in range(len(headers))) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def pyplot():
    """matplotlib's pyplot with a file-only backend, or None when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def figure_legend(fig, axes) -> None:
    """One legend under all panels (each label once, as many columns as the width holds),
    then lay the panels out above it."""
    handles = {}
    for ax in axes.flat:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, handle)
    ncol = max(1, min(len(handles), int(fig.get_figwidth() // 3.3)))
    rows = -(-len(handles) // ncol)
    fig.legend(handles.values(), handles.keys(), loc="lower center", ncol=ncol, fontsize=8)
    fig.tight_layout(rect=(0, (0.1 + 0.2 * rows) / fig.get_figheight(), 1, 1))


def fmt_ms(ms: Optional[float]) -> str:
    if ms is None:
        return "—"
    return f"{ms * 1e3:.1f} µs" if ms < 1 else f"{ms:.2f} ms"


def fmt_ratio(value: Optional[float]) -> str:
    return "—" if value is None else f"{value:.2f}×"
