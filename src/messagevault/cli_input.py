"""What ``messagevault publish`` is given, checked and encoded in batches.

Input comes from VALUES arguments, lines of stdin, whole files or NDJSON
records. All of it is read and checked before the first batch is sent, so
bad input (a malformed line, a key over the limit) publishes nothing, and
the error names where it is (``line 7 of stdin``). A value of any size is
taken: one larger than a batch goes as a batch of its own (in pieces, if
over ``MAX_VALUE_SIZE``), as large as the server's ``--max-body`` allows.
"""

from __future__ import annotations

import itertools
import json
import os
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import BinaryIO

import click

from messagevault.errors import InvalidBatch
from messagevault.format import (
    FRAME_HEADER_SIZE,
    MAX_KEY_SIZE,
    PER_MESSAGE_OVERHEAD,
    EncodedBatch,
    encode_batch,
)
from messagevault.wire import record_pairs

DEFAULT_BATCH_MESSAGES = 10_000
DEFAULT_BATCH_BYTES = 4 * 1024 * 1024  # far under the server's default --max-body (512 MiB)

Located = tuple[str, tuple[bytes, bytes]]  # (where it came from, (key, value))


def publish_input(
    values: tuple[str, ...],
    key: str,
    files: tuple[Path, ...],
    *,
    from_stdin: bool,
    ndjson: BinaryIO | None,
    batch_bytes: int,
    compress: bool = False,
) -> list[EncodedBatch]:
    """The whole input, in batches of at most ``batch_bytes`` and 10,000 messages.

    ``batch_bytes`` counts values before compression (``compress``), so a
    batch never grows past it on the wire.
    """
    if from_stdin and ndjson is sys.stdin.buffer:
        raise click.UsageError("--stdin and --ndjson - both read stdin; choose one")
    # argv arrives decoded with surrogateescape: fsencode gives back the user's bytes.
    key_bytes = os.fsencode(key)
    inputs: list[Iterable[Located]] = [
        (
            (f"VALUES argument {number}", (key_bytes, os.fsencode(value)))
            for number, value in enumerate(values, 1)
        ),
        ((f"--file {path}", (key_bytes, _file_bytes(path))) for path in files),
    ]
    if from_stdin:
        inputs.append(
            (f"line {number} of stdin", (key_bytes, line.removesuffix(b"\n").removesuffix(b"\r")))
            for number, line in enumerate(sys.stdin.buffer, 1)
        )
    if ndjson is not None:
        inputs.append(_ndjson_pairs(ndjson))
    return encode_batches(itertools.chain.from_iterable(inputs), batch_bytes, compress=compress)


def _file_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise click.FileError(str(path), exc.strerror) from exc


def _ndjson_pairs(source: BinaryIO) -> Iterator[Located]:
    name = "stdin" if source is sys.stdin.buffer else getattr(source, "name", "--ndjson")
    for number, line in enumerate(source, 1):
        if not line.strip():
            continue
        where = f"line {number} of {name}"
        try:
            record = json.loads(line)
        except ValueError as exc:
            raise click.ClickException(f"{where} is not JSON: {exc}") from None
        try:
            [pair] = record_pairs([record])
        except InvalidBatch as exc:
            detail = str(exc).replace("message 0: ", "").replace("message 0 ", "the record ")
            raise click.ClickException(f"{where}: {detail}") from None
        yield where, pair


def _check_key(where: str, key: bytes) -> None:
    if len(key) > MAX_KEY_SIZE:
        raise click.ClickException(
            f"{where}: the key is {len(key):,} bytes; keys hold at most {MAX_KEY_SIZE}"
        )


def encode_batches(
    messages: Iterable[Located], batch_bytes: int, *, compress: bool = False
) -> list[EncodedBatch]:
    """Check each message and cut batches by count and by frame bytes.

    A message larger than ``batch_bytes`` on its own makes a batch alone.
    """
    batches: list[EncodedBatch] = []
    pending: list[tuple[bytes, bytes]] = []
    size = FRAME_HEADER_SIZE
    for where, (key, value) in messages:
        _check_key(where, key)
        added = PER_MESSAGE_OVERHEAD + len(key) + len(value)
        if pending and (size + added > batch_bytes or len(pending) == DEFAULT_BATCH_MESSAGES):
            batches.append(encode_batch(pending, compress=compress))
            pending, size = [], FRAME_HEADER_SIZE
        pending.append((key, value))
        size += added
    if pending:
        batches.append(encode_batch(pending, compress=compress))
    return batches
