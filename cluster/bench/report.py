"""Shared plumbing for benchmarks: write the JSON, refresh a section of docs/benchmarks.md."""

from __future__ import annotations

import json
import platform
import re
import subprocess
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parents[2] / "docs" / "benchmarks.md"


def machine_description() -> str:
    """E.g. 'cpu: 2 cores, Intel Xeon ..., CPython 3.11.2 (/usr/bin/python3.11)' or 'cuda:
    NVIDIA H100 80GB HBM3'. On a CPU the interpreter is named: its build moves every CPU
    figure of Python code (docs/benchmarks.md, "Runs 32 to 39")."""
    try:
        import torch

        if torch.cuda.is_available():
            return f"cuda: {torch.cuda.get_device_name(0)}"
    except ImportError:  # pragma: no cover - torch is a hard dependency
        pass
    import os

    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    python = os.path.realpath(getattr(sys, "_base_executable", None) or sys.executable)
    return f"cpu: {os.cpu_count()} cores, {model}, {platform.python_implementation()} {platform.python_version()} ({python})"


def git_revision() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True,
            cwd=DOCS.parent,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def write_json(path: str | Path, data: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    return path


def update_docs_section(name: str, markdown: str, docs: Path = DOCS) -> None:
    """Replace (or append) the block between `<!-- bench:NAME -->` and `<!-- /bench:NAME -->`."""
    begin, end = f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"
    block = f"{begin}\n{markdown.rstrip()}\n{end}"
    text = docs.read_text() if docs.exists() else "# Benchmarks\n"
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    docs.parent.mkdir(parents=True, exist_ok=True)
    docs.write_text(text)
