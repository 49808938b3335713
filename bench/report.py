"""Render a benchmark result (the JSON that bench/run.py writes) as tables and a PNG plot.

Re-render a saved run: ``.venv/bin/python -m bench.report bench/results/<timestamp>.json``.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

Summary = dict[str, dict[str, dict[str, Any]]]

REF_LABELS = (("floor", "×floor"), ("baseline", "×base"))


def fmt_num(value: float | None) -> str:
    """A figure with thousands separators and no more precision than it deserves."""
    if value is None:
        return "-"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:.3g}" if abs(value) < 1 else f"{value:.1f}"


def fmt_ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[str]], align: str = "ll") -> str:
    """A markdown table padded for reading as plain text.

    ``align`` has one letter per leading column, "l" (labels) or "r" (figures); columns past its
    end are right-aligned figures.
    """
    left = [i < len(align) and align[i] == "l" for i in range(len(headers))]
    widths = [max(len(str(cell)) for cell in column) for column in zip(headers, *rows, strict=True)]

    def line(cells: Sequence[str]) -> str:
        padded = [c.ljust(w) if is_left else c.rjust(w) for c, w, is_left in zip(cells, widths, left, strict=True)]
        return "| " + " | ".join(padded) + " |"

    rule = (
        "|"
        + "|".join("-" * (w + 2) if is_left else "-" * (w + 1) + ":" for w, is_left in zip(widths, left, strict=True))
        + "|"
    )
    return "\n".join([line(headers), rule, *(line(r) for r in rows)])


def scenario_of(summary: Summary, sid: str) -> dict[str, Any]:
    """Any entry of a scenario: its rows, conns and flavour are the same for every server."""
    return next(iter(summary[sid].values()))


def flavour_of(entry: dict[str, Any]) -> str:
    """A scenario's flavour ("json" for runs saved before flavours existed)."""
    return str(entry.get("flavour") or "json")


def metric_cells(entry: dict[str, Any], metric: str) -> list[str]:
    """A figure followed by its ratios to the floor and to the baseline."""
    return [fmt_num(entry.get(metric))] + [fmt_ratio(entry.get(f"vs_{ref}", {}).get(metric)) for ref, _ in REF_LABELS]


def metric_headers(label: str) -> list[str]:
    return [label] + [ref_label for _, ref_label in REF_LABELS]


def section(
    title: str,
    summary: Summary,
    scenario_ids: Sequence[str],
    key: tuple[str, str],
    metrics: Sequence[tuple[str, str]],
) -> str:
    """One table: a row per (scenario, server), with the wire the server spoke; ``key`` names the scenario
    column (label, field).

    Empty when there are no scenarios for it.
    """
    if not scenario_ids:
        return ""
    headers = [key[0], "server", "wire"] + [h for label, _ in metrics for h in metric_headers(label)] + ["errors"]
    rows = []
    for sid in scenario_ids:
        for name, entry in summary[sid].items():
            cells = [str(entry[key[1]]), name, entry.get("wire") or "-"]
            for _, metric in metrics:
                cells += metric_cells(entry, metric)
            cells.append(f"{entry['errors']:,}" + (" FAILED" if entry["failures"] else ""))
            rows.append(cells)
    return f"## {title}\n\n{markdown_table(headers, rows, align='lll')}"


def ordered_ids(summary: Summary, *, rows: int | None = None, conns: int | None = None) -> list[str]:
    """Scenario ids with the given rows or conns, ordered by the other dimension (JSON before binary)."""
    ids = [
        sid
        for sid in summary
        if (rows is None or scenario_of(summary, sid)["rows"] == rows)
        and (conns is None or scenario_of(summary, sid)["conns"] == conns)
    ]

    def order(sid: str) -> tuple[int, bool, int]:
        entry = scenario_of(summary, sid)
        return entry["conns"], flavour_of(entry) != "json", entry["rows"]

    return sorted(ids, key=order)


def header(result: dict[str, Any]) -> str:
    meta = result["meta"]
    lines = [
        "# simplenn-serve benchmark",
        "",
        (
            f"date: {meta['date']} | nproc: {meta['nproc']} | git: {meta['git_commit'] or 'n/a'}"
            f" | torch {meta['torch']} | {meta['wrk']}"
        ),
        (
            f"rounds: {meta['rounds']} x {meta['duration_s']} s per run"
            " | figures: median over rounds | ×floor, ×base: ratio to that server, same round"
        ),
        f"command: {meta['command']}",
    ]
    lines += [f"peer {name}: {_peer_text(peer)}" for name, peer in meta.get("peers", {}).items()]
    servers = [
        [name, fmt_num(i.get("startup_s")), fmt_num(i.get("pss_ready_mib")), fmt_num(i.get("pss_end_mib")),
         fmt_num(i.get("idle_cpu_pct")), _check_text(i),
         (i["error"] or "").split("; log tail")[0].splitlines()[0] if i["error"] else ""]
        for name, i in result["servers"].items()
    ]
    table = markdown_table(["server", "startup s", "PSS MiB ready", "PSS MiB end", "idle CPU %", "check", "error"],
                           servers, align="lrrrrll")
    roles = [[name, role, str(m["processes"]), fmt_num(m["pss_mib"]), fmt_num(m["rss_mib"])]
             for name, i in result["servers"].items() for role, m in (i.get("memory_by_role") or {}).items()]
    role_table = markdown_table(["server", "process role", "processes", "PSS MiB", "RSS MiB"], roles,
                                align="llrrr") if roles else ""
    failures = [f"### {name}: {info['error']}" for name, info in result["servers"].items() if info["error"]]
    return "\n\n".join(["\n".join(lines), table, *([role_table] if role_table else []), *failures])


def _peer_text(peer: dict[str, Any]) -> str:
    """A peer's versions (and Java's, for TorchServe) and how long its first install took."""
    versions = ", ".join(f"{name} {version}" for name, version in peer.get("versions", {}).items()) or "not installed"
    extra = [f"java: {peer['java']}"] if peer.get("java") else []
    extra += [f"first install {peer['install_s']:.0f} s"] if peer.get("install_s") is not None else []
    return "; ".join([versions, *extra])


def _check_text(info: dict[str, Any]) -> str:
    check = info.get("check")
    if check is None:
        return "-"
    text = "ok" if check["ok"] else "BAD: " + check["detail"][:60]
    if "agrees_with_baseline" in check:  # every server but the references
        text += ", = baseline" if check["agrees_with_baseline"] else ", != baseline"
    return text


def format_report(result: dict[str, Any]) -> str:
    """Header plus three tables: single-row latency/throughput, rows/s, CPU per request."""
    summary: Summary = result["summary"]
    if not summary:
        return header(result) + "\n\n(no measurements)"
    rows_conns = max((s["conns"] for s in result["meta"]["scenarios"] if s["rows"] > 1), default=None)
    parts = [
        header(result),
        section(
            "Single-row requests",
            summary,
            ordered_ids(summary, rows=1),
            ("conns", "conns"),
            [("req/s", "req_s"), ("p50 µs", "p50_us"), ("p99 µs", "p99_us")],
        ),
        section(
            f"Rows per second ({rows_conns} connections)" if rows_conns else "Rows per second",
            summary,
            ordered_ids(summary, conns=rows_conns) if rows_conns else [],
            ("rows/req", "rows"),
            [("rows/s", "rows_s"), ("p50 µs", "p50_us"), ("p99 µs", "p99_us")],
        ),
        section(
            "Server CPU per request (whole process tree)",
            summary,
            list(summary),
            ("scenario", "scenario"),
            [("CPU µs/req", "cpu_us_per_req")],
        ),
    ]
    return "\n\n".join(part for part in parts if part)


def _tick(summary: Summary, sid: str, group_key: str) -> str:
    """The x label of a scenario: its rows or conns, and its flavour unless JSON."""
    entry = scenario_of(summary, sid)
    return str(entry[group_key]) + ("" if flavour_of(entry) == "json" else f"\n{flavour_of(entry)}")


def _bars(ax: Any, summary: Summary, ids: Sequence[str], group_key: str, metric: str, title: str, ylabel: str) -> None:
    """Grouped bars: one group per scenario in ``ids``, one bar per server (none where it sat out); log scale."""
    names = list(dict.fromkeys(name for by_server in summary.values() for name in by_server))
    width = 0.8 / max(1, len(names))
    for i, name in enumerate(names):
        values = [(summary[sid].get(name) or {}).get(metric) or math.nan for sid in ids]  # nan: no bar
        xs = [x + (i - (len(names) - 1) / 2) * width for x in range(len(ids))]
        ax.bar(xs, values, width, label=name)
    ax.set_xticks(range(len(ids)), [_tick(summary, sid, group_key) for sid in ids])
    ax.set_yscale("log")
    ax.set_title(title)
    ax.set_ylabel(ylabel)
    ax.grid(axis="y", which="both", alpha=0.3)


def plot(result: dict[str, Any], path: Path) -> Path:
    """Draw a 2x2 PNG: req/s and p99 by connections, rows/s by rows/request, CPU per request."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary: Summary = result["summary"]
    single = ordered_ids(summary, rows=1)
    rows_conns = max((s["conns"] for s in result["meta"]["scenarios"] if s["rows"] > 1), default=16)
    batched = ordered_ids(summary, conns=rows_conns)
    every = list(summary)
    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    _bars(axes[0][0], summary, single, "conns", "req_s", "Single-row req/s", "req/s (log)")
    axes[0][0].set_xlabel("connections")
    _bars(axes[0][1], summary, single, "conns", "p99_us", "Single-row p99 latency", "µs (log)")
    axes[0][1].set_xlabel("connections")
    _bars(axes[1][0], summary, batched, "rows", "rows_s", f"Rows/s at {rows_conns} connections", "rows/s (log)")
    axes[1][0].set_xlabel("rows per request")
    _bars(axes[1][1], summary, every, "rows", "cpu_us_per_req", "Server CPU per request", "µs (log)")
    axes[1][1].set_xticks(range(len(every)), [sid.replace("_", "\n") for sid in every], fontsize=7)
    axes[0][0].legend()
    meta = result["meta"]
    fig.suptitle(
        f"simplenn-serve benchmark {meta['date']} (nproc {meta['nproc']}, "
        f"{meta['rounds']}x{meta['duration_s']} s, git {(meta['git_commit'] or 'n/a')[:12]})"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def main(argv: Sequence[str] | None = None) -> int:
    """Print the tables of a saved run and redraw its PNG next to it."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1:
        print("usage: python -m bench.report RESULT.json", file=sys.stderr)
        return 2
    path = Path(args[0])
    result = json.loads(path.read_text())
    print(format_report(result))
    print(f"plot: {plot(result, path.with_suffix('.png'))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
