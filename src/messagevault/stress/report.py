"""A stress run's results: the table, the JSON document, and the HTML/PNG picture of runs.

The JSON document (``--json``) holds the options, the machine, the
per-second series, the histograms' percentiles, the table and the
verification; ``--report`` draws it, with any earlier documents given by
``--compare``, as throughput and latency per second, one line per run.
Drawing needs matplotlib, an optional extra: ``require_matplotlib()`` says
so before a run starts rather than after it.
"""

from __future__ import annotations

import html
import io
import json
import os
import platform
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

from rich.box import SIMPLE
from rich.console import Console
from rich.table import Table

from messagevault import __version__
from messagevault.stress.driver import Outcome
from messagevault.stress.stats import PERCENTILES, Flow

REPORT_SUFFIXES: Final = (".html", ".png")
INSTALL_HINT: Final = "pip install 'messagevault[report]'"
LATENCY_NAMES: Final = (*(name for name, _ in PERCENTILES), "max")
DOCUMENT_KIND: Final = "messagevault-stress"


class ReportError(ValueError):
    """A report or a run to compare that cannot be made or read (one line, for the user)."""


def rows(outcome: Outcome) -> list[dict[str, Any]]:
    """The table: write (ack latency), read (the read-back, time per batch), end-to-end."""
    recorder = outcome.recorder
    found = [_row("write", recorder.write, outcome.write_seconds, "publish to ack, per message")]
    if outcome.readback is not None:
        readback = outcome.readback
        found.append(
            _row(
                "read",
                _flow(readback.messages, readback.batches, readback.bytes, readback.latency),
                readback.seconds,
                "reading each batch back, per message",
            )
        )
    if recorder.seen.messages and recorder.last_seen is not None:
        seen_seconds = max(recorder.last_seen - recorder.started, 1e-9)
        found.append(_row("end-to-end", recorder.seen, seen_seconds, "built to seen, per message"))
    return found


def _flow(messages: int, batches: int, size: int, latency: Any) -> Flow:
    return Flow(messages, batches, size, latency)


def _row(phase: str, flow: Flow, seconds: float, latency_of: str) -> dict[str, Any]:
    seconds = max(seconds, 1e-9)
    return {
        "phase": phase,
        "latency_of": latency_of,
        "messages": flow.messages,
        "batches": flow.batches,
        "bytes": flow.bytes,
        "seconds": seconds,
        "msgs_per_s": flow.messages / seconds,
        "batches_per_s": flow.batches / seconds,
        "mb_per_s": flow.bytes / seconds / 1e6,
        "latency_ms": flow.latency.summary(),
    }


MAX_WIDTH: Final = 100
CAPTION: Final = (
    "latencies in ms; percentiles over messages, each with its batch's time: write = "
    "publish to ack; read = reading the batch back (the checking not included); e2e = "
    "batch built to seen, over all consumers"
)
_SHOWN_PHASES: Final = {"end-to-end": "e2e"}


def output_width() -> int:
    """The terminal's width up to ``MAX_WIDTH``; ``MAX_WIDTH`` when not a terminal."""
    terminal = Console()
    return min(terminal.width, MAX_WIDTH) if terminal.is_terminal else MAX_WIDTH


def ms(value: float) -> str:
    """Three significant figures, as the histograms hold them: 0.123, 1.23, 12.3, 123, 1,234."""
    if value >= 100:
        return f"{value:,.0f}"
    return f"{value:.1f}" if value >= 10 else f"{value:.2f}" if value >= 1 else f"{value:.3f}"


def print_table(outcome: Outcome, title: str, console: Console | None = None) -> None:
    """One table of rates and latency percentiles; fits 80 columns, numbers never cut."""
    if console is None:
        console = Console(width=output_width())
    if outcome.error is not None:
        title = f"PARTIAL (a producer failed: the error is below) {title}"
    elif outcome.partial:
        title = f"PARTIAL (interrupted) {title}"
    table = Table(
        title=title,
        caption=CAPTION,
        box=SIMPLE,
        pad_edge=False,
        collapse_padding=True,  # two spaces between columns, not three: 80 columns fit
        title_justify="left",
        caption_justify="left",
    )
    # Folded, never ellipsized: a number cut short is a wrong number.
    table.add_column("phase", overflow="fold")
    for column in ("msgs/s", "batch/s", "MB/s", *LATENCY_NAMES):
        table.add_column(column, justify="right", overflow="fold")
    for row in rows(outcome):
        latency = row["latency_ms"]
        table.add_row(
            _SHOWN_PHASES.get(row["phase"], row["phase"]),
            f"{row['msgs_per_s']:,.0f}",
            f"{row['batches_per_s']:,.0f}",
            f"{row['mb_per_s']:,.1f}",
            *(ms(latency[name]) if name in latency else "-" for name in LATENCY_NAMES),
        )
    console.print(table, markup=False, highlight=False)


def document(outcome: Outcome, label: str, settings: dict[str, Any]) -> dict[str, Any]:
    """The run as JSON (``--json``): what ``--compare`` reads back."""
    readback = outcome.readback
    return {
        "kind": DOCUMENT_KIND,
        "version": __version__,
        "time": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "label": label,
        "partial": outcome.partial,
        "error": outcome.error,
        "options": {**outcome.plan.to_json(), **settings},
        "machine": {
            "cpus": os.cpu_count(),
            "python": sys.version.split()[0],
            "platform": platform.platform(),
        },
        "write_seconds": outcome.write_seconds,
        "cpu_share": {"stress": outcome.cpu_share, "server": outcome.server_cpu_share},
        "table": rows(outcome),
        "series": outcome.recorder.series_json(),
        "verification": readback.to_json()
        if readback is not None
        else {"ok": None, "skipped": "stopped early" if outcome.error else "interrupted"},
        "consumers": {"complete": outcome.consumers_done, "errors": outcome.consumer_errors},
    }


def save_json(path: Path, run: dict[str, Any]) -> None:
    path.write_text(json.dumps(run, indent=2) + "\n")


def load_run(path: Path) -> dict[str, Any]:
    """An earlier ``--json`` document, for ``--compare``; ``ReportError`` if it is not one."""
    try:
        run = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError) as exc:
        raise ReportError(f"--compare {path}: cannot read it ({exc})") from None
    except json.JSONDecodeError as exc:
        raise ReportError(f"--compare {path}: not JSON ({exc.msg} at line {exc.lineno})") from None
    if (
        not isinstance(run, dict)
        or run.get("kind") != DOCUMENT_KIND
        or not isinstance(run.get("series"), list)
    ):
        raise ReportError(f"--compare {path}: not a `messagevault stress --json` document")
    return run


def check_report_path(path: Path) -> None:
    if path.suffix.lower() not in REPORT_SUFFIXES:
        raise ReportError(f"--report {path}: the name must end in .html or .png")
    require_matplotlib()


def require_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ReportError(f"--report needs matplotlib: {INSTALL_HINT}") from None


# The picture ------------------------------------------------------------------------------

_PANELS: Final = (
    ("write_msgs_per_s", "writes, msgs/s"),
    ("ack_p99_ms", "ack latency p99 of each second, ms"),
    ("e2e_p99_ms", "end-to-end latency p99 of each second, ms"),
)


def draw(path: Path, runs: list[dict[str, Any]]) -> None:
    """Throughput and latency per second, one line per run, as ``path`` (.png or .html)."""
    import matplotlib

    runs = distinct_labels(runs)
    matplotlib.use("Agg")  # no display needed, and no window
    from matplotlib import pyplot

    panels = [panel for panel in _PANELS if any(_points(run, panel[0])[0] for run in runs)]
    figure, axes = pyplot.subplots(
        len(panels), 1, figsize=(10, 3.2 * len(panels)), sharex=True, squeeze=False
    )
    for (field, title), ax in zip(panels, axes[:, 0], strict=True):
        for index, run in enumerate(runs):
            xs, ys = _points(run, field)
            if xs:
                # The gid names the line in the SVG: one per run and panel.
                ax.plot(
                    xs,
                    ys,
                    color=f"C{index % 10}",
                    marker="o",
                    markersize=3,
                    linewidth=1.5,
                    label=run["label"],
                    gid=f"run-{index}-{field}",
                )
        ax.set_title(title, loc="left", fontsize=11)
        ax.grid(True, alpha=0.3)
        ax.margins(y=0.08)
        ax.set_xlim(left=0)
        ax.set_ylim(bottom=0)
        ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(_thousands))
    handles, labels = axes[0, 0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="upper center", ncol=min(len(runs), 2), frameon=False)
    axes[-1, 0].set_xlabel("seconds since the start of the run")
    legend_rows = (len(runs) + 1) // 2
    figure.tight_layout(rect=(0, 0, 1, 1 - 0.035 * legend_rows * 3 / len(panels)))
    if path.suffix.lower() == ".png":
        figure.savefig(path, dpi=100)
    else:
        picture = io.StringIO()
        figure.savefig(picture, format="svg")
        path.write_text(_html(runs, picture.getvalue()))
    pyplot.close(figure)


def distinct_labels(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The runs, a label met again made distinct (" (2)", " (3)"): lines must be told apart."""
    seen: dict[str, int] = {}
    named = []
    for run in runs:
        label = str(run.get("label", ""))
        seen[label] = seen.get(label, 0) + 1
        named.append(run if seen[label] == 1 else {**run, "label": f"{label} ({seen[label]})"})
    return named


def _thousands(value: float, _position: object) -> str:
    if value >= 1000:
        return f"{value / 1000:,.0f}k"
    return f"{value:,.0f}" if value >= 10 or value == 0 else f"{value:g}"


def _points(run: dict[str, Any], field: str) -> tuple[list[float], list[float]]:
    xs: list[float] = []
    ys: list[float] = []
    for point in run["series"]:
        value = point.get(field)
        if value is not None and point.get("write_msgs_per_s", 1) is not None:
            if field.endswith("_ms") and value <= 0:
                continue
            xs.append(point["t"])
            ys.append(value)
    return xs, ys


def _html(runs: list[dict[str, Any]], svg: str) -> str:
    svg = svg[svg.index("<svg") :]  # drop the XML prologue: inline in HTML
    head = ["run", "phase", "msgs/s", "batches/s", "MB/s", *(f"{n} ms" for n in LATENCY_NAMES)]
    lines = []
    for run in runs:
        for row in run.get("table", []):
            latency = row.get("latency_ms", {})
            cells = [
                run["label"] + (" (partial)" if run.get("partial") else ""),
                f"{row['phase']} ({row.get('latency_of', '')})",
                f"{row['msgs_per_s']:,.0f}",
                f"{row['batches_per_s']:,.0f}",
                f"{row['mb_per_s']:,.1f}",
                *(f"{latency[n]:.2f}" if n in latency else "-" for n in LATENCY_NAMES),
            ]
            lines.append("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>")
    header = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    runs_list = "".join(
        f"<li>{html.escape(run['label'])}: {html.escape(run.get('time', ''))}, "
        f"{html.escape(json.dumps(run.get('options', {})))}</li>"
        for run in runs
    )
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>messagevault stress</title>
<style>
body {{ font-family: sans-serif; margin: 2em; }}
table {{ border-collapse: collapse; font-size: 0.9em; }}
td, th {{ padding: 0.2em 0.7em; border-bottom: 1px solid #ddd; text-align: right; }}
td:first-child, td:nth-child(2), th:first-child, th:nth-child(2) {{ text-align: left; }}
li {{ font-size: 0.85em; }}
</style></head>
<body>
<h1>messagevault stress</h1>
{svg}
<h2>Totals</h2>
<table><tr>{header}</tr>
{"".join(lines)}
</table>
<h2>Runs</h2>
<ul>{runs_list}</ul>
</body></html>
"""
