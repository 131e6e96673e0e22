"""How the ``messagevault`` command prints: NDJSON, terminal tables, raw values, progress.

Messages go to stdout through its binary buffer, written a page at a time and
flushed by the caller at the end of each page (and each batch that arrives
while following), never per line: one flush per message was most of the cost
of printing NDJSON.
"""

from __future__ import annotations

import codecs
import contextlib
import json
import sys
from collections.abc import Callable, Iterable, Iterator
from itertools import islice
from typing import Any, BinaryIO, Protocol

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table

from messagevault.format import Message
from messagevault.wire import iso_time, records_ndjson

FORMATS = ("ndjson", "table", "value")
_LINES_PER_WRITE = 4096
# Values per write, in bytes: a page of large values is not held at once
# (a page has at least one message, whatever its size).
_BYTES_PER_WRITE = 4 * 1024 * 1024


def human_bytes(size: float) -> str:
    """1536 -> '1.5 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def stdout_is_terminal() -> bool:
    return sys.stdout.isatty()


def default_format(chosen: str | None) -> str:
    """``--format`` as given, else a table on a terminal and NDJSON when piped."""
    if chosen is not None:
        return chosen
    return "table" if stdout_is_terminal() else "ndjson"


def pages(messages: Iterable[Message], count: int) -> Iterator[list[Message]]:
    """``messages`` in lists of at most ``count``, and of ``_BYTES_PER_WRITE`` of values."""
    iterator = iter(messages)
    while True:
        page: list[Message] = []
        size = 0
        for message in iterator:
            page.append(message)
            size += len(message[4])  # the value
            if size >= _BYTES_PER_WRITE or len(page) >= count:
                break
        if not page:
            return
        yield page


def print_json(value: Any) -> None:
    """One JSON document on stdout: indented on a terminal, one line when piped."""
    indent = 2 if stdout_is_terminal() else None
    sys.stdout.write(json.dumps(value, indent=indent) + "\n")
    sys.stdout.flush()


class MessagePrinter(Protocol):
    def write(self, messages: Iterable[Message]) -> int:
        """Print ``messages``; return how many."""
        ...

    def flush(self) -> None: ...


class NdjsonPrinter:
    def __init__(self, out: BinaryIO) -> None:
        self._out = out

    def write(self, messages: Iterable[Message]) -> int:
        count = 0
        for page in pages(messages, _LINES_PER_WRITE):
            self._out.write(records_ndjson(page))
            count += len(page)
        return count

    def flush(self) -> None:
        self._out.flush()


class ValuePrinter:
    """Each value's bytes as stored, one per line (for piping values on)."""

    def __init__(self, out: BinaryIO) -> None:
        self._out = out

    def write(self, messages: Iterable[Message]) -> int:
        count = 0
        for page in pages(messages, _LINES_PER_WRITE):
            if len(page) == 1:  # a large value: written as it is, not copied into a join
                self._out.write(page[0].value)
                self._out.write(b"\n")
            else:
                self._out.write(b"\n".join([message.value for message in page]) + b"\n")
            count += len(page)
        return count

    def flush(self) -> None:
        self._out.flush()


def printable(data: bytes, width: int) -> str:
    """Text safe for a terminal: control characters escaped, binary summarised.

    Only as much of a long value is decoded as the column can show.
    """
    try:
        if len(data) > 4 * width + 4:
            # A character cut at the end is held back, not an error.
            text = codecs.getincrementaldecoder("utf-8")().decode(data[: 4 * width + 4])
            text += "…"
        else:
            text = data.decode("utf-8")
    except UnicodeDecodeError:
        return f"<{len(data)} bytes: {data[: max(width // 2, 4)].hex()}>"
    if not text.isprintable():
        # A stored value must not move the cursor or recolour the terminal.
        text = "".join(
            char if char.isprintable() else char.encode("unicode_escape").decode("ascii")
            for char in text
        )
    return text if len(text) <= width else text[: max(width - 1, 0)] + "…"


class TablePrinter:
    """Rows of fixed-width columns, so pages printed one after another line up."""

    def __init__(self, console: Console | None = None) -> None:
        self._console = console or Console(highlight=False, soft_wrap=False)
        self._header = True

    def write(self, messages: Iterable[Message]) -> int:
        count = 0
        iterator = iter(messages)
        width = self._console.width
        # A narrow terminal gets the time of day only (the date is in --format ndjson).
        time_from, time_width, key_width = (0, 23, 22) if width >= 120 else (11, 12, 14)
        value_width = max(width - 10 - 8 - time_width - key_width - 4 * 2, 16)
        while page := list(islice(iterator, 1000)):
            table = Table(
                box=None,
                show_header=self._header,
                header_style="bold",
                pad_edge=False,
                collapse_padding=True,
            )
            table.add_column("position", justify="right", width=10, no_wrap=True)
            table.add_column("seq", justify="right", width=8, no_wrap=True)
            table.add_column("time (UTC)", width=time_width, no_wrap=True)
            table.add_column("key", width=key_width, no_wrap=True)
            table.add_column("value", no_wrap=True)
            for message in page:
                table.add_row(
                    str(message.position),
                    str(message.sequence),
                    iso_time(message.timestamp)[time_from:23].replace("T", " "),
                    printable(message.key, key_width),
                    printable(message.value, value_width),
                )
            self._console.print(table, markup=False)
            self._header = False
            count += len(page)
        return count

    def flush(self) -> None:
        self._console.file.flush()


def message_printer(kind: str) -> MessagePrinter:
    out: BinaryIO = sys.stdout.buffer
    if kind == "ndjson":
        return NdjsonPrinter(out)
    if kind == "value":
        return ValuePrinter(out)
    sys.stdout.flush()
    return TablePrinter()


def print_table(columns: list[str], rows: list[list[str]]) -> None:
    table = Table(*columns)
    for row in rows:
        table.add_row(*row)
    Console().print(table, markup=False)


Update = Callable[..., None]  # update(done) or update(done, total)


@contextlib.contextmanager
def progress_bar(description: str, total: int, *, unit: str) -> Iterator[Update]:
    """A progress bar on stderr when it is a terminal; ``update(done[, total])`` either way.

    ``unit`` is ``"bytes"`` (sizes and a rate) or ``"messages"`` (a count).
    """
    if not sys.stderr.isatty():
        yield lambda done, total=None: None
        return
    columns = (
        [DownloadColumn(), TransferSpeedColumn()] if unit == "bytes" else [MofNCompleteColumn()]
    )
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        *columns,
        TimeRemainingColumn(),
        console=Console(stderr=True),
        transient=True,
    ) as progress:
        task = progress.add_task(description, total=total or None)

        def update(done: int, total: int | None = None) -> None:
            progress.update(task, completed=done, total=total)

        yield update
