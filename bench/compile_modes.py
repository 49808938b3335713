"""SimpleNN forward pass in-process: eager vs TorchScript vs torch.compile, at batch 1 and 64.

For each mode the model is prepared once (compile time is reported separately), checked against
eager, then timed timeit-style: ``autorange`` picks a loop count worth >= 0.2 s, the loop runs
``--repeats`` times, and the table shows the median microseconds per call, all under
``torch.inference_mode()``. A mode that fails to build or run (torch.compile needs a working C++
toolchain on CPU) is reported with its error instead of figures.

    .venv/bin/python bench/compile_modes.py [--repeats 7] [--threads 1] [--weights weights/model.pth]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import timeit
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # as a script: import bench, models

from bench.model import IN_FEATURES, load_model
from bench.report import fmt_num, markdown_table

REPO_ROOT = Path(__file__).resolve().parents[1]

BATCHES = (1, 64)
Forward = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class ModeResult:
    """One mode: build time, µs per call by batch size, max abs difference from eager, or error."""

    mode: str
    build_s: float | None = None
    us_per_call: dict[int, float] | None = None
    max_abs_diff: float | None = None
    error: str | None = None


def build_modes(model: nn.Module) -> dict[str, Callable[[], Forward]]:
    """Mode name -> a function that builds that mode's forward callable (may raise)."""
    return {
        "eager": lambda: model,
        "torchscript": lambda: torch.jit.script(model),
        "torch.compile": lambda: torch.compile(model),
    }


def time_call(fn: Forward, x: torch.Tensor, repeats: int) -> float:
    """Median microseconds per ``fn(x)`` over ``repeats`` timeit loops."""
    timer = timeit.Timer(lambda: fn(x))
    number, _ = timer.autorange()  # the loop count that takes >= 0.2 s
    return statistics.median(t / number for t in timer.repeat(repeat=repeats, number=number)) * 1e6


def run_mode(name: str, build: Callable[[], Forward], eager: nn.Module, repeats: int) -> ModeResult:
    """Build one mode, check it against eager, and time it at every batch size."""
    result = ModeResult(name)
    inputs = {b: torch.randn(b, IN_FEATURES, generator=torch.Generator().manual_seed(b)) for b in BATCHES}
    try:
        with torch.inference_mode(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            began = time.perf_counter()
            fn = build()
            for x in inputs.values():  # first calls: tracing/compiling happens here
                fn(x)
            result.build_s = time.perf_counter() - began
            result.max_abs_diff = max(float((fn(x) - eager(x)).abs().max()) for x in inputs.values())
            result.us_per_call = {b: time_call(fn, x, repeats) for b, x in inputs.items()}
    except Exception as exc:  # noqa: BLE001 - any failure of a mode is a result to report
        result.error = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
    return result


def format_table(results: Sequence[ModeResult]) -> str:
    """Markdown table: mode, build time, µs/call per batch (and ratio to eager), max abs diff."""
    eager = next((r.us_per_call for r in results if r.mode == "eager" and r.us_per_call), None)
    headers = ["mode", "build s"]
    for b in BATCHES:
        headers += [f"batch {b} µs/call", "×eager"]
    headers += ["max abs diff vs eager", "error"]
    rows = []
    for r in results:
        cells = [r.mode, fmt_num(r.build_s)]
        for b in BATCHES:
            us = r.us_per_call.get(b) if r.us_per_call else None
            cells += [fmt_num(us), f"{us / eager[b]:.2f}" if us and eager else "-"]
        cells += ["-" if r.max_abs_diff is None else f"{r.max_abs_diff:.1e}", r.error or ""]
        rows.append(cells)
    return markdown_table(headers, rows, align="l" + "r" * (len(headers) - 2) + "l")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7, help="timing loops per figure (median)")
    default_weights = REPO_ROOT / "weights" / "model.pth"
    parser.add_argument(
        "--weights", type=Path, default=default_weights, help="state_dict to load (random init if the file is missing)"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1, as served)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    weights = args.weights if args.weights.exists() else None
    model = load_model(weights)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} intra-op threads, "
        f"weights: {weights or 'random init'}, median of {args.repeats} repeats\n"
    )
    results = [run_mode(name, build, model, args.repeats) for name, build in build_modes(model).items()]
    print(format_table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
