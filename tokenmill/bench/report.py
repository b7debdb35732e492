"""What a bench run prints and writes: a table per level with each target's figures and its
ratio to the first target, the JSON of every summary, and a throughput-latency plot."""

from __future__ import annotations

import json
import platform
from datetime import datetime, timezone
from pathlib import Path

COLUMNS = (("output_throughput", "out tok/s", "{:.1f}"),
           ("request_throughput", "req/s", "{:.2f}"),
           ("median_ttft_ms", "TTFT p50 ms", "{:.0f}"),
           ("p99_ttft_ms", "TTFT p99 ms", "{:.0f}"),
           ("median_tpot_ms", "TPOT p50 ms", "{:.1f}"),
           ("median_itl_ms", "ITL p50 ms", "{:.1f}"),
           ("failed", "errors", "{}"))


def cpu_model() -> str:
    """This machine's CPU model name, as /proc/cpuinfo has it (else platform's guess)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cell(value, fmt: str) -> str:
    return "-" if value is None else fmt.format(value)


def table(summaries: list[dict]) -> str:
    """One block per level: a row per target, the first target's output throughput over each
    other's as "x" (above 1: the first is faster)."""
    lines = []
    levels = list(dict.fromkeys((s["mode"], s["level"]) for s in summaries))
    for mode, level in levels:
        rows = [s for s in summaries if (s["mode"], s["level"]) == (mode, level)]
        label = f"concurrency {level:g}" if mode == "concurrency" else f"{level:g} requests/s"
        lines.append(f"== {label} ==")
        header = f"{'target':<24}" + "".join(f"{title:>14}" for _, title, _ in COLUMNS)
        lines.append(header + f"{'first / this':>14}")
        first = rows[0]["output_throughput"]
        for row in rows:
            ratio = first / row["output_throughput"] if row["output_throughput"] else None
            lines.append(f"{row['target'][:24]:<24}"
                         + "".join(f"{_cell(row[key], fmt):>14}" for key, _, fmt in COLUMNS)
                         + f"{_cell(ratio, '{:.2f}x'):>14}")
        lines.append("")
    return "\n".join(lines)


def write_json(path: Path, summaries: list[dict], workload: dict) -> None:
    path.write_text(json.dumps({
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "cpu": cpu_model(), "workload": workload, "results": summaries}, indent=2) + "\n")


def require_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise SystemExit("tokenmill bench: --plot needs matplotlib "
                         "(pip install 'tokenmill[bench]')") from None


def plot(path: Path, summaries: list[dict], title: str) -> None:
    """Output tokens/s against median TPOT and median TTFT, one line per target through its
    levels (each point labelled with its level)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 5), constrained_layout=True)
    for target in dict.fromkeys(s["target"] for s in summaries):
        rows = sorted((s for s in summaries if s["target"] == target),
                      key=lambda s: (s["mode"], s["level"]))
        for ax, key in zip(axes, ("median_tpot_ms", "median_ttft_ms")):
            points = [(r[key], r["output_throughput"], r["level"]) for r in rows
                      if r[key] is not None]
            if not points:
                continue
            xs, ys, levels = zip(*points)
            ax.plot(xs, ys, marker="o", label=target)
            for x, y, level in points:
                ax.annotate(f"{level:g}", (x, y), textcoords="offset points", xytext=(4, 4),
                            fontsize=8)
    for ax, name in zip(axes, ("median TPOT (ms)", "median TTFT (ms)")):
        ax.set_xlabel(name)
        ax.set_ylabel("output tokens/s")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.savefig(path, dpi=120)
    plt.close(fig)
