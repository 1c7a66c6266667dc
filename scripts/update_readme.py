"""Fill the generated sections of README.md from the results the scripts wrote.

No number in the README is typed by hand: each generated section sits between two marker
comments and is replaced wholesale by this script,

    <!-- BEGIN:transformer_dropin -->
    ...generated text...
    <!-- END:transformer_dropin -->

Text outside the markers is never touched. A BEGIN marker may name its source explicitly,
`<!-- BEGIN:transformer_dropin src=examples/results/transformer_dropin_cpu.md -->`;
otherwise the source is found by the rules in SECTIONS below: among the matching result
files, GPU results win over CPU ones, then the newest by the date in the file's header.
Relative links and images in a source file are rewritten to stay valid from the README.

    python scripts/update_readme.py            # rewrite README.md in place
    python scripts/update_readme.py --check    # exit 1 if README.md is out of date
    python scripts/update_readme.py --list     # the marker names and what fills them
"""
from __future__ import annotations

import argparse
import datetime
import glob
import os
import re
import sys
import textwrap
from dataclasses import dataclass
from typing import Callable, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass(frozen=True)
class Section:
    what: str
    patterns: tuple[str, ...] = ()  # result files (globs relative to the repo root)
    snippet: Optional[tuple[str, str]] = None  # (source file, snippet name) for code snippets


SECTIONS = {
    "bench_layer_norm": Section("LayerNorm benchmark table and plots (benchmarks/bench_layer_norm.py)",
                                ("benchmarks/results/**/*layer_norm*.md",)),
    "bench_rnn": Section("LN-RNN benchmark table and plots (benchmarks/bench_rnn.py)",
                         ("benchmarks/results/**/*rnn*.md",)),
    "bench_norm_family": Section("RMSNorm and fused add + norm benchmark tables (benchmarks/bench_norm_family.py)",
                                 ("benchmarks/results/**/*norm_family*.md",)),
    "transformer_dropin": Section("drop-in on a Transformer: agreement, steps/s, LayerNorm share, checkpoints "
                                  "(examples/transformer_dropin.py)",
                                  ("examples/results/transformer_dropin_*.md",)),
    "ln_rnn_stability": Section("LN-RNN vs RNN/LSTM on digits: accuracy tables, curves, verdicts "
                                "(examples/ln_rnn_stability.py)",
                                ("examples/results/ln_rnn_stability_*.md",)),
    "snippet_dropin": Section("the conversion line of examples/transformer_dropin.py",
                              snippet=("examples/transformer_dropin.py", "dropin")),
    "snippet_ln_rnn": Section("the LN-RNN construction of examples/ln_rnn_stability.py",
                              snippet=("examples/ln_rnn_stability.py", "ln_rnn")),
    "bench_model_norms": Section("the norms of transformers and timm as they are vs converted "
                                 "(benchmarks/bench_model_norms.py)", ("benchmarks/results/**/*model_norms*.md",)),
    "hf_llama": Section("a transformers Llama trained as it is and converted (examples/hf_llama.py)",
                        ("examples/results/hf_llama_*.md",)),
    "snippet_hf_llama": Section("the conversion line of examples/hf_llama.py",
                                snippet=("examples/hf_llama.py", "hf_convert")),
}

MARKER = re.compile(
    r"(?P<begin><!--\s*BEGIN:(?P<name>[\w-]+)(?:\s+src=(?P<src>\S+))?\s*-->)"
    r"(?P<body>.*?)"
    r"(?P<end><!--\s*END:(?P=name)\s*-->)",
    re.DOTALL,
)
HEADER_DATE = re.compile(r"(\d{4}-\d{2}-\d{2})(?:[ T](\d{2}:\d{2}))?")
MD_LINK = re.compile(r"(!?\[[^\]]*\]\()([^)\s]+)(\))")


# ---------------------------------------------------------------- choosing a source
def is_cpu_result(path: str) -> bool:
    """CPU results are named or filed as such: a path part or a `_`-separated name part 'cpu'."""
    parts = os.path.normpath(path).split(os.sep)
    stem_parts = os.path.splitext(parts[-1])[0].split("_")
    return "cpu" in [p.lower() for p in parts[:-1] + stem_parts]


def header_date(path: str) -> datetime.datetime:
    """The first date in the file's first lines (the header every result file opens with)."""
    with open(path) as f:
        head = "".join(f.readline() for _ in range(8))
    match = HEADER_DATE.search(head)
    if not match:
        return datetime.datetime.fromtimestamp(os.path.getmtime(path))
    return datetime.datetime.fromisoformat(f"{match.group(1)} {match.group(2) or '00:00'}")


def choose_source(root: str, patterns: tuple[str, ...]) -> Optional[str]:
    found = sorted({p for pattern in patterns for p in glob.glob(os.path.join(root, pattern), recursive=True)})
    if not found:
        return None
    # GPU before CPU, then newest, then path order (for a stable choice).
    return max(found, key=lambda p: (not is_cpu_result(os.path.relpath(p, root)), header_date(p), p))


# ---------------------------------------------------------------- generating a section
def rebase_links(text: str, source_dir: str, readme_dir: str) -> str:
    """Relative link targets in `text` (written next to source_dir) made relative to readme_dir."""
    def fix(match):
        target = match.group(2)
        if re.match(r"^([a-z][a-z0-9+.-]*:|/|#)", target, re.IGNORECASE):
            return match.group(0)  # absolute URL, absolute path or in-page anchor
        rebased = os.path.relpath(os.path.join(source_dir, target), readme_dir)
        return match.group(1) + rebased.replace(os.sep, "/") + match.group(3)
    return MD_LINK.sub(fix, text)


def read_snippet(path: str, name: str) -> str:
    """Lines between `# --8<-- [start:NAME]` and `# --8<-- [end:NAME]`, dedented, as a code block."""
    with open(path) as f:
        lines = f.read().splitlines()
    try:
        start = next(i for i, line in enumerate(lines) if line.strip() == f"# --8<-- [start:{name}]")
        end = next(i for i, line in enumerate(lines) if line.strip() == f"# --8<-- [end:{name}]")
    except StopIteration:
        raise SystemExit(f"update_readme: {path} has no snippet markers '# --8<-- [start:{name}]' / '[end:{name}]'")
    return "```python\n" + textwrap.dedent("\n".join(lines[start + 1:end])) + "\n```"


SUMMARY = re.compile(r"<!-- summary -->\n(?P<table>.*?)\n<!-- /summary -->", re.DOTALL)


def summary_of(text: str, name: str) -> str:
    """A report with a summary block (benchmarks/common.py summary_block): its title, header
    line, the summary table, a link to the whole report (`name`, beside it) and its plots;
    any other text as it is."""
    match = SUMMARY.search(text)
    if not match:
        return text
    lines = text.splitlines()
    title, header = lines[0], next((line for line in lines[1:] if line.strip()), "")
    images = [line for line in lines if line.startswith("![")]
    more = f"All tables (GB/s, % of copy, every peer, per-call costs): [{name}]({name})."
    return "\n\n".join([title, header, match.group("table"), more] + images)


def generate(name: str, src: Optional[str], root: str, readme_dir: str) -> tuple[Optional[str], str]:
    """(new section body or None when there is nothing to put in, where it came from)."""
    section = SECTIONS[name]
    if section.snippet and not src:
        path = os.path.join(root, section.snippet[0])
        body = read_snippet(path, section.snippet[1])
    else:
        path = os.path.join(root, src) if src else choose_source(root, section.patterns)
        if path is None or not os.path.exists(path):
            return None, src or " or ".join(section.patterns)
        with open(path) as f:
            text = f.read().strip()
        body = rebase_links(summary_of(text, os.path.basename(path)), os.path.dirname(path), readme_dir)
    origin = os.path.relpath(path, root).replace(os.sep, "/")
    note = f"<!-- generated by scripts/update_readme.py from {origin}; edit that, not this -->"
    return f"\n{note}\n{body}\n", origin


def update(readme_text: str, root: str, readme_dir: str, say: Callable[[str], None]) -> str:
    seen = set()

    def replace(match):
        name, src = match.group("name"), match.group("src")
        seen.add(name)
        if name not in SECTIONS:
            say(f"unknown marker '{name}': left as it is (known: {', '.join(SECTIONS)})")
            return match.group(0)
        body, origin = generate(name, src, root, readme_dir)
        if body is None:
            say(f"{name}: no source found ({origin}): section left as it is")
            return match.group(0)
        say(f"{name}: from {origin}")
        return match.group("begin") + body + match.group("end")

    updated = MARKER.sub(replace, readme_text)
    for name in SECTIONS:
        if name not in seen:
            say(f"{name}: README has no <!-- BEGIN:{name} --> ... <!-- END:{name} --> markers: not generated")
    unpaired = set(re.findall(r"<!--\s*BEGIN:([\w-]+)", readme_text)) - seen
    for name in sorted(unpaired):
        say(f"{name}: BEGIN marker without a matching END: left as it is")
    return updated


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--readme", default=os.path.join(ROOT, "README.md"))
    parser.add_argument("--root", default=ROOT, help="where the results are looked up (the repository root)")
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if the README is out of date")
    parser.add_argument("--list", action="store_true", help="print the marker names and their sources")
    args = parser.parse_args(argv)

    if args.list:
        for name, section in SECTIONS.items():
            print(f"<!-- BEGIN:{name} --> ... <!-- END:{name} -->\n    {section.what}")
        return 0

    def say(msg):
        print(f"update_readme: {msg}", file=sys.stderr)

    if not os.path.exists(args.readme):
        say(f"{args.readme} does not exist: nothing to update")
        return 1
    with open(args.readme) as f:
        before = f.read()
    after = update(before, os.path.abspath(args.root), os.path.dirname(os.path.abspath(args.readme)), say)
    if args.check:
        if after != before:
            say(f"{args.readme} is out of date: run python scripts/update_readme.py")
            return 1
        return 0
    if after != before:
        with open(args.readme, "w") as f:
            f.write(after)
        say(f"updated {args.readme}")
    else:
        say(f"{args.readme} already up to date")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
