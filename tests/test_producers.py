"""The producer table (``producers.py``): the sequence rules, its bounds, its snapshot."""

from __future__ import annotations

import contextlib
import math
import struct
import zlib

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from messagevault.errors import CorruptData, SequenceGap, StaleSequence, UnsupportedVersion
from messagevault.producers import (
    DEFAULT_MAX_PRODUCERS,
    DEFAULT_PRODUCER_MAX_AGE,
    ProducerRecord,
    ProducerTable,
    decode_snapshot,
)

P1, P2, P3 = (bytes([n]) * 16 for n in (1, 2, 3))
DAY_MS = 24 * 3600 * 1000


def _at(sequence: int, start: int = 0, timestamp: int = 1000) -> ProducerRecord:
    return ProducerRecord(sequence, start, start + 100, timestamp)


def test_defaults_are_the_documented_bounds() -> None:
    table = ProducerTable()
    assert (DEFAULT_MAX_PRODUCERS, DEFAULT_PRODUCER_MAX_AGE) == (100_000, 7 * 24 * 3600)
    assert (table.max_producers, table.max_age) == (100_000, 7 * 24 * 3600)


@pytest.mark.parametrize("sequence", [0, 1, 41, 2**63])
def test_an_unknown_producer_starts_at_any_sequence(sequence: int) -> None:
    assert ProducerTable().check(P1, sequence) is None


def test_the_last_sequence_again_is_a_duplicate_of_its_record() -> None:
    table = ProducerTable()
    table.record(P1, _at(5, start=300))
    assert table.check(P1, 5) == _at(5, start=300)
    assert table.check(P1, 6) is None  # the next one is appended


def test_a_gap_names_the_expected_sequence() -> None:
    table = ProducerTable()
    table.record(P1, _at(5))
    with pytest.raises(SequenceGap, match=f"producer {P1.hex()}: expected batch sequence 6, got 8"):
        table.check(P1, 8)


@pytest.mark.parametrize("sequence", [0, 4])
def test_an_older_sequence_is_stale(sequence: int) -> None:
    table = ProducerTable()
    table.record(P1, _at(5))
    with pytest.raises(StaleSequence, match=f"sequence {sequence} is older than .* \\(5\\)"):
        table.check(P1, sequence)


def test_checks_change_nothing() -> None:
    table = ProducerTable()
    table.record(P1, _at(5))
    table.record(P2, _at(0))
    for sequence in (5, 6, 9, 1):
        with contextlib.suppress(SequenceGap, StaleSequence):
            table.check(P1, sequence)
    assert list(table) == [(P1, _at(5)), (P2, _at(0))]  # P1 was not moved to the end


def test_refusals_are_409_conflicts_that_a_retry_cannot_fix() -> None:
    for cls, code in ((SequenceGap, "sequence_gap"), (StaleSequence, "stale_sequence")):
        assert cls.code == code
        assert not cls.retriable


def test_count_bound_evicts_the_least_recently_committed() -> None:
    table = ProducerTable(max_producers=2)
    table.record(P1, _at(0, timestamp=1))
    table.record(P2, _at(0, timestamp=2))
    table.record(P1, _at(1, timestamp=3))  # P1 is now the most recent
    table.record(P3, _at(0, timestamp=4))
    assert [producer for producer, _ in table] == [P1, P3]
    assert table.check(P2, 17) is None  # forgotten: starts fresh


def test_age_bound_is_measured_in_commit_timestamps() -> None:
    table = ProducerTable(max_age=DAY_MS / 1000)
    table.record(P1, _at(0, timestamp=1000))
    table.record(P2, _at(0, timestamp=1000 + DAY_MS))  # exactly the max age: P1 kept
    assert len(table) == 2
    table.expire(1000 + DAY_MS + 1)  # a batch without a producer, a millisecond later
    assert [producer for producer, _ in table] == [P2]
    table.record(P3, _at(0, timestamp=1000 + 2 * DAY_MS + 1))
    assert [producer for producer, _ in table] == [P3]


@pytest.mark.parametrize(
    ("options", "error", "message"),
    [
        ({"max_producers": 0}, ValueError, "max_producers must be at least 1, not 0"),
        ({"max_producers": -5}, ValueError, "at least 1"),
        ({"max_producers": 1.5}, TypeError, "must be an int, not float"),
        ({"max_producers": True}, TypeError, "must be an int, not bool"),
        ({"max_age": 0}, ValueError, "max age must be positive and finite, not 0 seconds"),
        ({"max_age": -1.0}, ValueError, "positive"),
        ({"max_age": math.nan}, ValueError, "positive"),
        ({"max_age": math.inf}, ValueError, "positive and finite, not inf seconds"),
    ],
)
def test_bad_bounds_are_refused(
    options: dict[str, float], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        ProducerTable(**options)  # type: ignore[arg-type]


@pytest.mark.parametrize("producer", [bytes(16), b"\x01" * 15, b"\x01" * 17])
def test_record_refuses_what_is_not_a_producer_id(producer: bytes) -> None:
    table = ProducerTable()
    with pytest.raises(ValueError, match="not a producer id"):
        table.record(producer, _at(0))
    assert len(table) == 0


# Snapshots ---------------------------------------------------------------------------


def _two_entry_table() -> ProducerTable:
    table = ProducerTable()
    table.record(P1, ProducerRecord(3, 0, 96, 1_700_000_000_000))
    table.record(P2, ProducerRecord(0, 96, 500, 1_700_000_000_001))
    return table


def test_snapshot_round_trips() -> None:
    table = _two_entry_table()
    snapshot = decode_snapshot(table.snapshot(500, 12))
    assert (snapshot.position, snapshot.sequence) == (500, 12)
    assert list(snapshot.entries) == list(table)
    restored = ProducerTable()
    restored.restore(snapshot)
    assert list(restored) == list(table)


def test_empty_snapshot_round_trips() -> None:
    snapshot = decode_snapshot(ProducerTable().snapshot(0, 0))
    assert (snapshot.position, snapshot.sequence, snapshot.entries) == (0, 0, ())


def test_snapshot_bytes_are_pinned() -> None:
    """docs/FORMAT.md describes these bytes; changing them needs a new version."""
    table = ProducerTable()
    table.record(P1, ProducerRecord(3, 0, 96, 1_700_000_000_000))
    data = table.snapshot(96, 2)
    assert (
        data.hex()
        == (
            "4d56505301000000"  # MVPS, version 1, reserved
            "6000000000000000"  # position 96
            "0200000000000000"  # sequence 2
            "0100000000000000"  # 1 entry, reserved
            "01010101010101010101010101010101"  # producer id
            "0300000000000000"  # batch sequence 3
            "0000000000000000"  # start 0
            "6000000000000000"  # end 96
            "0068e5cf8b010000"  # commit timestamp 1_700_000_000_000
            + struct.pack("<I", zlib.crc32(data[:-4])).hex()
        )
    )
    assert len(data) == 32 + 48 + 4


def test_restoring_into_a_smaller_table_keeps_the_most_recent() -> None:
    small = ProducerTable(max_producers=1)
    small.restore(decode_snapshot(_two_entry_table().snapshot(500, 12)))
    assert [producer for producer, _ in small] == [P2]


def test_every_flipped_bit_of_a_snapshot_is_caught() -> None:
    data = _two_entry_table().snapshot(500, 12)
    for index in range(len(data)):
        for bit in (0x01, 0x80):
            damaged = bytearray(data)
            damaged[index] ^= bit
            with pytest.raises(CorruptData):
                decode_snapshot(bytes(damaged))


@pytest.mark.parametrize("size", [0, 3, 31, 35, 36 + 47, 36 + 48 + 47])
def test_a_truncated_snapshot_is_corrupt(size: int) -> None:
    data = _two_entry_table().snapshot(500, 12)
    with pytest.raises(CorruptData, match=r"too short|should be"):
        decode_snapshot(data[:size])


def test_a_longer_snapshot_is_corrupt() -> None:
    with pytest.raises(CorruptData, match="should be 132 bytes, not 133"):
        decode_snapshot(_two_entry_table().snapshot(500, 12) + b"\0")


def _with_crc(body: bytes) -> bytes:
    return body + struct.pack("<I", zlib.crc32(body))


def test_a_newer_snapshot_version_is_unsupported() -> None:
    data = bytearray(_two_entry_table().snapshot(500, 12)[:-4])
    data[4] = 2
    with pytest.raises(UnsupportedVersion, match="version 2"):
        decode_snapshot(_with_crc(bytes(data)))


def _entry(producer: bytes, sequence: int, start: int, end: int, timestamp: int) -> bytes:
    return struct.pack("<16sQQQQ", producer, sequence, start, end, timestamp)


@pytest.mark.parametrize(
    ("entries", "message"),
    [
        ([_entry(bytes(16), 0, 0, 10, 1)], "entry 0: has no producer id"),
        ([_entry(P1, 0, 0, 10, 1), _entry(P1, 1, 10, 20, 2)], "entry 1: repeats producer"),
        ([_entry(P1, 0, 0, 101, 1)], r"batch \[0, 101\) is not within \[0, 100\)"),
        ([_entry(P1, 0, 10, 10, 1)], "is not within"),
        ([_entry(P1, 0, 0, 10, 5), _entry(P2, 0, 10, 20, 4)], "entry 1: was committed before"),
    ],
)
def test_impossible_entries_with_a_good_crc_are_corrupt(entries: list[bytes], message: str) -> None:
    header = struct.pack("<4sB3xQQI4x", b"MVPS", 1, 100, 7, len(entries))
    with pytest.raises(CorruptData, match=message):
        decode_snapshot(_with_crc(header + b"".join(entries)))


def test_wrong_magic_is_corrupt() -> None:
    with pytest.raises(CorruptData, match="magic b'MVLB'"):
        decode_snapshot(_with_crc(struct.pack("<4sB3xQQI4x", b"MVLB", 1, 0, 0, 0)))


# The table against a model ------------------------------------------------------------

PRODUCERS = [bytes([n]) * 16 for n in range(1, 6)]


class ProducerTableMachine(RuleBasedStateMachine):
    """Random commits and expiries: the table must act as a plain list would.

    The model is a list of (producer, record), least recently committed
    first, trimmed from the front after every step: the obvious, slow way.
    """

    table: ProducerTable
    model: list[tuple[bytes, ProducerRecord]]

    @initialize(max_producers=st.integers(1, 4), max_age_ms=st.integers(1, 50))
    def start(self, max_producers: int, max_age_ms: int) -> None:
        self.table = ProducerTable(max_producers=max_producers, max_age=max_age_ms / 1000)
        self.max_producers = max_producers
        self.max_age_ms = max_age_ms
        self.model = []
        self.now = 1_000
        self.position = 0
        self.sequence = 0

    def _model_last(self, producer: bytes) -> ProducerRecord | None:
        return next((record for p, record in self.model if p == producer), None)

    def _model_trim(self) -> None:
        while len(self.model) > self.max_producers:
            self.model.pop(0)
        while self.model and self.model[0][1].timestamp < self.now - self.max_age_ms:
            self.model.pop(0)

    @rule(
        producer=st.sampled_from(PRODUCERS),
        step=st.integers(-1, 2),
        elapsed=st.integers(0, 30),
        size=st.integers(1, 200),
    )
    def commit(self, producer: bytes, step: int, elapsed: int, size: int) -> None:
        """A batch ``step`` sequences after the producer's last (or a fresh one) arrives."""
        last = self._model_last(producer)
        sequence = (last.sequence if last else 10) + step
        if sequence < 0:
            return
        if last is None or step == 1:
            expected: object = None
        elif step == 0:
            expected = last
        else:
            expected = SequenceGap if step > 1 else StaleSequence
        try:
            outcome: object = self.table.check(producer, sequence)
        except (SequenceGap, StaleSequence) as exc:
            outcome = type(exc)
        assert outcome == expected
        if outcome is not None:
            return
        self.now += elapsed
        record = ProducerRecord(sequence, self.position, self.position + size, self.now)
        self.position += size
        self.table.record(producer, record)
        self.model = [(p, r) for p, r in self.model if p != producer] + [(producer, record)]
        self._model_trim()

    @rule(elapsed=st.integers(0, 60), size=st.integers(1, 200))
    def commit_without_producer(self, elapsed: int, size: int) -> None:
        self.now += elapsed
        self.position += size
        self.table.expire(self.now)
        self._model_trim()

    @precondition(lambda self: self.position > 0)
    @rule()
    def reopen_from_snapshot(self) -> None:
        """A writer reopening from a snapshot carries on with the very same table."""
        snapshot = decode_snapshot(self.table.snapshot(self.position, self.sequence))
        assert (snapshot.position, snapshot.sequence) == (self.position, self.sequence)
        self.table = ProducerTable(max_producers=self.max_producers, max_age=self.max_age_ms / 1000)
        self.table.restore(snapshot)

    @invariant()
    def table_matches_model(self) -> None:
        assert list(self.table) == self.model
        assert len(self.table) <= self.max_producers


TestProducerTableMachine = ProducerTableMachine.TestCase
TestProducerTableMachine.settings = settings(
    max_examples=150, stateful_step_count=40, deadline=None
)
