"""Write one benchmark's section of BENCHMARKS.md, leaving the other sections as they are."""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import time
from collections.abc import Callable
from pathlib import Path

import torch

BENCHMARKS_MD = Path(__file__).resolve().parents[1] / "BENCHMARKS.md"
HEADER = ("# Benchmarks\n\nEach section is rewritten by the script it names (`make bench` runs "
          "them all). Figures are medians of repeated runs on the machine shown; ratios are "
          "measured side by side in one run.\n")


def machine() -> str:
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
            f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
            f"{time.strftime('%Y-%m-%d')}")


def write_section(name: str, body: str) -> None:
    """Replace (or append) the section between ``<!-- name -->`` markers."""
    text = BENCHMARKS_MD.read_text() if BENCHMARKS_MD.exists() else HEADER
    start, end = f"<!-- {name} -->", f"<!-- /{name} -->"
    block = f"{start}\n{body.strip()}\n{end}"
    pattern = re.compile(re.escape(start) + ".*?" + re.escape(end), re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else f"{text}\n{block}\n"
    BENCHMARKS_MD.write_text(text)


def parts_cli(doc: str, parts: tuple[str, ...], results: Path,
              options: Callable[[argparse.ArgumentParser], None] | None = None
              ) -> tuple[argparse.Namespace, dict]:
    """A benchmark's command line: the parts to measure (all when none is named), the
    benchmark's own ``options``, and ``--report`` (re-render BENCHMARKS.md from ``results``
    only). The arguments, ``parts`` filled in, and the results saved so far."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("parts", nargs="*", help=f"any of {', '.join(parts)}; all when none "
                        "is named")
    if options is not None:
        options(parser)
    parser.add_argument("--report", action="store_true",
                        help=f"re-render BENCHMARKS.md from {results.name}; measure nothing")
    args = parser.parse_args()
    if unknown := set(args.parts) - set(parts):
        parser.error(f"unknown part {sorted(unknown)[0]}; choose from {', '.join(parts)}")
    args.parts = args.parts or list(parts)
    return args, json.loads(results.read_text()) if results.is_file() else {}
