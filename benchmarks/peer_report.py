"""How benchmarks/peers.py reports: medians, the ratio table, the saved JSON and Markdown, README.

The table has one row per workload figure (msgs/s written and read, W3's ack
latency) and one column per system; every peer's cell carries the ratio
MessageVault / peer. It fits a 100-column terminal. The Durable Streams
systems have a table of their own: MessageVault's native API, its Durable
Streams endpoint and the protocol's reference server, then the two ratios
to the reference.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from benchmarks.peer_systems import NATIVE, System
from benchmarks.report import save_results
from rich.console import Console
from rich.table import Table

VAULT = "messagevault"
VAULT_DS = "messagevault-ds"
REFERENCE = "ds-reference"
TABLE_WIDTH = 100


@dataclass
class Result:
    """One system on one workload, over the runs."""

    system: str
    workload: str
    messages: int
    payload_bytes: int
    producers: int
    batch_size: int
    write_s: list[float] = field(default_factory=list)
    read_s: list[float] = field(default_factory=list)
    # MessageVault only: the same read through the server's JSON (NDJSON) route.
    read_json_s: list[float] = field(default_factory=list)
    latency_ms: dict[str, list[float]] = field(default_factory=dict)  # W3: p50, p99, max per run
    # CPU seconds per phase and run: the load client (this process) and the server.
    client_cpu_s: dict[str, list[float]] = field(default_factory=dict)
    server_cpu_s: dict[str, list[float]] = field(default_factory=dict)

    def rate(self, phase: str) -> float:
        """msgs/s of ``write``, ``read`` or ``read_json``."""
        seconds = {"write": self.write_s, "read": self.read_s, "read_json": self.read_json_s}
        return self.messages / statistics.median(seconds[phase])

    def latency(self, name: str) -> float:
        return statistics.median(self.latency_ms[name])

    def value(self, metric: str) -> float | None:
        """A table cell: ``write``/``read``/``read_json`` msgs/s, or ``p50``/``p99`` ack ms.

        ``read_json`` of a peer, which has no JSON read, is its ordinary read:
        what MessageVault's JSON read is compared with. None: not measured.
        """
        if metric == "read_json":
            if self.read_json_s:
                return self.rate("read_json")
            return None if self.system == VAULT else self.rate("read")
        return self.rate(metric) if metric in ("write", "read") else self.latency(metric)


# The table --------------------------------------------------------------------------------

# (label, workload, metric); metric "write"/"read"/"read_json" is msgs/s, "p50"/"p99" ack ms.
ROWS = (
    ("W1 write msgs/s", "W1", "write"),
    ("W1 read msgs/s", "W1", "read"),
    ("W1 read JSON msgs/s", "W1", "read_json"),
    ("W2 write msgs/s", "W2", "write"),
    ("W2 read msgs/s", "W2", "read"),
    ("W2 read JSON msgs/s", "W2", "read_json"),
    ("W4 x16 write msgs/s", "W4", "write"),
    ("W4 read msgs/s", "W4", "read"),
    ("W3 ack p50 ms", "W3", "p50"),
    ("W3 ack p99 ms", "W3", "p99"),
)
LOWER_IS_BETTER = ("p50", "p99")
RATIO_NOTE = (
    "Ratio = MessageVault / peer. msgs/s rows: above 1 means MessageVault is faster. "
    "Latency rows (ms): below 1 means MessageVault is faster. Read JSON rows: MessageVault "
    "read through the server's JSON route (Client.read_records: NDJSON, every record decoded), "
    "against each peer's ordinary read (Redis XRANGE, NATS fetch), which has no JSON route."
)


def ratio(ours: float | None, theirs: float | None) -> float | None:
    """MessageVault's figure over the peer's; None when either is missing or the peer's is 0."""
    if ours is None or theirs is None or theirs == 0:
        return None
    return ours / theirs


def format_value(value: float | None, metric: str) -> str:
    if value is None:
        return "-"
    if metric in LOWER_IS_BETTER:
        return f"{value:.2f}"
    if value >= 1e6:
        return f"{value / 1e6:.2f}M"
    if value >= 1e3:
        return f"{value / 1e3:.1f}k"
    return f"{value:.0f}"


def format_cell(value: float | None, metric: str, versus: float | None) -> str:
    """A peer's figure with MessageVault's ratio to it, e.g. ``64.5k (3.81x)``."""
    text = format_value(value, metric)
    return text if versus is None else f"{text} ({versus:.2f}x)"


def table_cells(
    results: dict[tuple[str, str], Result], systems: Sequence[System], skipped: dict[str, str]
) -> list[list[str]]:
    """The table as text: a header row, then one row per ``ROWS`` line that was measured.

    Only the systems driven through their own protocol: the Durable Streams
    ones are in ``ds_table_cells``.
    """
    systems = [s for s in systems if s.protocol == NATIVE]
    rows = [["", *(s.title for s in systems)]]
    for label, workload, metric in ROWS:
        figures = {
            s.key: results[s.key, workload].value(metric)
            for s in systems
            if (s.key, workload) in results and s.key not in skipped
        }
        if not figures or (metric == "read_json" and figures.get(VAULT) is None):
            continue  # not run; or a JSON row without MessageVault's JSON read
        ours = figures.get(VAULT)
        row = [label]
        for system in systems:
            if system.key in skipped:
                row.append("SKIPPED")
            elif system.key == VAULT:
                row.append(format_value(ours, metric))
            else:
                theirs = figures.get(system.key)
                row.append(format_cell(theirs, metric, ratio(ours, theirs)))
        rows.append(row)
    return rows


DS_COLUMNS = ("MessageVault", "MessageVault DS", "DS reference", "native / ref", "DS / ref")
DS_RATIO_NOTE = (
    "Durable Streams: native / ref = MessageVault through its own API over the protocol's "
    "Node reference server; DS / ref = MessageVault's Durable Streams endpoint over the "
    "reference server (msgs/s rows: above 1 means MessageVault is faster; latency rows: below "
    "1). Both Durable Streams systems are driven by the same Python client "
    "(benchmarks/ds_driver.py), whose reads are JSON with every element decoded; in the read "
    "JSON rows MessageVault native is its JSON read (Client.read_records)."
)


def ds_table_cells(
    results: dict[tuple[str, str], Result], systems: Sequence[System], skipped: dict[str, str]
) -> list[list[str]] | None:
    """The Durable Streams table as text, or None when neither Durable Streams system was chosen.

    A row per ``ROWS`` line that any of the three measured; a system not
    chosen shows ``-``, a skipped one SKIPPED, and a ratio needs both figures.
    """
    chosen = {s.key for s in systems}
    if not chosen & {VAULT_DS, REFERENCE}:
        return None
    rows = [["", *DS_COLUMNS]]
    for label, workload, metric in ROWS:
        figures = {
            key: results[key, workload].value(metric)
            for key in (VAULT, VAULT_DS, REFERENCE)
            if key in chosen and key not in skipped and (key, workload) in results
        }
        if not any(figure is not None for figure in figures.values()):
            continue
        row = [label]
        row += [
            "SKIPPED" if key in skipped else format_value(figures.get(key), metric)
            for key in (VAULT, VAULT_DS, REFERENCE)
        ]
        versus = [ratio(figures.get(key), figures.get(REFERENCE)) for key in (VAULT, VAULT_DS)]
        row += ["-" if each is None else f"{each:.2f}x" for each in versus]
        rows.append(row)
    return rows


def has_columns(cells: list[list[str]]) -> bool:
    """Whether a table has a system's column (not only its row labels)."""
    return len(cells[0]) > 1


def render_table(cells: list[list[str]], title: str) -> str:
    """The terminal table, at most ``TABLE_WIDTH`` columns wide."""
    table = Table(title=title, title_justify="left")
    for index, heading in enumerate(cells[0]):
        table.add_column(heading, justify="left" if index == 0 else "right", no_wrap=index == 0)
    for row in cells[1:]:
        table.add_row(*row)
    console = Console(width=TABLE_WIDTH, record=True, force_terminal=False, color_system=None)
    with console.capture() as captured:
        console.print(table)
    return captured.get()


def markdown_table(cells: list[list[str]]) -> str:
    def line(row: list[str]) -> str:
        return "| " + " | ".join(row) + " |"

    header, *rows = cells
    separator = ["---", *("---:" for _ in header[1:])]
    return "\n".join([line(header), line(separator), *(line(row) for row in rows)])


# The machine, the notes, saving --------------------------------------------------------


def machine() -> dict[str, Any]:
    """Cores, memory, CPU model and kernel (what save_results does not already record)."""
    memory_kib = cpu = None
    try:
        for text in Path("/proc/meminfo").read_text().splitlines():
            if text.startswith("MemTotal:"):
                memory_kib = int(text.split()[1])
        for text in Path("/proc/cpuinfo").read_text().splitlines():
            if text.startswith("model name"):
                cpu = text.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cores": os.cpu_count(),
        "memory_gib": None if memory_kib is None else round(memory_kib / 2**20, 1),
        "cpu_model": cpu or platform.processor() or "unknown",
        "kernel": f"{platform.system()} {platform.release()}",
    }


def describe_machine(found: dict[str, Any]) -> str:
    return (
        f"{found['cores']} cores, {found['memory_gib']} GiB, {found['cpu_model']}, "
        f"{found['kernel']}, Python {platform.python_version()}"
    )


def cpu_note(results: dict[tuple[str, str], Result], systems: Sequence[System]) -> str | None:
    """Who was busy while writing W1 and W4: the load client (this process) or the server."""
    parts = []
    for workload in ("W1", "W4"):
        shares = []
        for system in systems:
            result = results.get((system.key, workload))
            if result is not None and result.write_s:
                client, server = (
                    statistics.median(
                        cpu / wall for cpu, wall in zip(spent["write"], result.write_s, strict=True)
                    )
                    for spent in (result.client_cpu_s, result.server_cpu_s)
                )
                shares.append(f"{system.title} {client:.0%} / {server:.0%}")
        if shares:
            parts.append(f"{workload}: " + ", ".join(shares))
    if not parts:
        return None
    return "CPU while writing, share of one core, load client / server: " + "; ".join(parts)


def notes(
    systems: Sequence[System], skipped: dict[str, str], found: dict[str, dict[str, str]]
) -> list[str]:
    """One line per system: durability, or why it was skipped; then versions."""
    lines = []
    for system in systems:
        if system.key in skipped:
            lines.append(f"SKIPPED {system.title}: {skipped[system.key]}")
        else:
            listed = ", ".join(f"{k} {v}" for k, v in found.get(system.key, {}).items())
            lines.append(
                f"{system.title}: {system.durability}. Driven: {system.driven}. Versions: {listed}"
            )
    return lines


def save(
    output: Path,
    runs: int,
    scale: float,
    results: dict[tuple[str, str], Result],
    systems: Sequence[System],
    skipped: dict[str, str],
    found: dict[str, dict[str, str]],
    cells: list[list[str]],
    title: str,
    ds_cells: list[list[str]] | None = None,
) -> tuple[Path, Path]:
    """benchmarks/results/peers-<time>.json and the same as Markdown beside it.

    ``cells`` with no system's column (only Durable Streams systems ran) is
    left out of the Markdown; ``ds_cells`` is the Durable Streams table, if any.
    """
    the_machine = machine()
    records = []
    for result in results.values():
        record: dict[str, Any] = asdict(result)
        record["write_msgs_per_s"] = result.rate("write")
        record["read_msgs_per_s"] = result.rate("read")
        if result.read_json_s:
            record["read_json_msgs_per_s"] = result.rate("read_json")
        if result.latency_ms:
            record["median_latency_ms"] = {n: result.latency(n) for n in result.latency_ms}
        records.append(record)
    path = save_results(
        output,
        "peers",
        {
            "runs": runs,
            "scale": scale,
            "systems": {
                s.key: {
                    "title": s.title,
                    "durability": s.durability,
                    "skipped": skipped.get(s.key),
                    "versions": found.get(s.key, {}),
                }
                for s in systems
            },
            "table": cells,
            "ratio": RATIO_NOTE,
            **({"ds_table": ds_cells, "ds_ratio": DS_RATIO_NOTE} if ds_cells else {}),
        },
        records,
        the_machine,
    )
    stamp = datetime.strptime(json.loads(path.read_text())["time"], "%Y%m%dT%H%M%SZ")
    lines = [
        f"MessageVault against its peers, {stamp:%Y-%m-%d %H:%M} UTC",
        "",
        f"Machine: {describe_machine(the_machine)}. {title}.",
        "",
        *([markdown_table(cells), "", RATIO_NOTE, ""] if has_columns(cells) else []),
        *([markdown_table(ds_cells), "", DS_RATIO_NOTE, ""] if ds_cells else []),
        *([cpu, ""] if (cpu := cpu_note(results, systems)) else []),
        *(f"- {text}" for text in notes(systems, skipped, found)),
        "",
    ]
    markdown = path.with_suffix(".md")
    markdown.write_text("\n".join(lines))
    return path, markdown


# The README's copy --------------------------------------------------------------------------

README = Path(__file__).resolve().parent.parent / "README.md"
README_BEGIN = "<!-- bench-peers: the latest table; make readme-peers puts it here -->"
README_END = "<!-- bench-peers: end -->"


def latest_markdown(folder: Path) -> Path:
    found = sorted(folder.glob("peers-*.md"))  # the names sort by their UTC time
    if not found:
        raise SystemExit(f"no peers-*.md in {folder}: run make bench-peers first")
    return found[-1]


def with_table(readme: str, markdown: str) -> str:
    """``readme`` with ``markdown`` between its two bench-peers markers, instead of what was."""
    begin, end = readme.find(README_BEGIN), readme.find(README_END)
    if begin < 0 or end < begin:
        raise ValueError(f"README.md lacks the markers {README_BEGIN} ... {README_END}")
    return f"{readme[: begin + len(README_BEGIN)]}\n{markdown.strip()}\n{readme[end:]}"


def refresh_readme(folder: Path, readme: Path) -> None:
    source = latest_markdown(folder)
    try:
        updated = with_table(readme.read_text(), source.read_text())
    except ValueError as error:
        raise SystemExit(str(error)) from None
    readme.write_text(updated)
    print(f"{readme.name}: the peers table from {source.name}")
