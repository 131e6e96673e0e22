"""A state machine over writer and reader: the stream always equals a plain list.

Hypothesis appends batches of every shape, reopens the writer, tries bad
batches and bad positions, and reads from arbitrary message positions, on a
page-aligned memory backend (the tail-page rewrite is where bugs would hide).
"""

from __future__ import annotations

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from messagevault import (
    InvalidBatch,
    InvalidPosition,
    MemoryStorage,
    Reader,
    Writer,
    encode_batch,
)

keys = st.binary(max_size=20) | st.sampled_from([b"OrderPlaced", b"OrderPaid"])
values = st.binary(max_size=700)
batches = st.lists(st.tuples(keys, values), min_size=1, max_size=30)


class LogMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.storage = MemoryStorage(page_size=512)
        self.writer = Writer.open(self.storage, "orders")
        self.model: list[tuple[bytes, bytes]] = []
        self.positions: list[int] = []  # of each message in the model
        self.end = 0

    @rule(batch=batches)
    def append(self, batch: list[tuple[bytes, bytes]]) -> None:
        result = self.writer.append(batch)
        assert result.base_sequence == len(self.model)
        assert result.frame_position == self.end
        self.model.extend(batch)
        self.positions.extend(result.positions)
        self.end = result.end

    @rule(count=st.integers(1, 4), size=st.integers(0, 300))
    def group_commit(self, count: int, size: int) -> None:
        group = [[(b"g", bytes([n]) * size)] * (n + 1) for n in range(count)]
        results = self.writer.append_batches([encode_batch(batch) for batch in group])
        for batch, result in zip(group, results, strict=True):
            self.model.extend(batch)
            self.positions.extend(result.positions)
        self.end = results[-1].end

    @rule()
    def reopen_writer(self) -> None:
        self.writer.close()
        self.writer = Writer.open(self.storage, "orders")

    @rule(batch=st.sampled_from([[], [(b"k" * 256, b"")], [(b"k", "not bytes")]]))
    def bad_batch_changes_nothing(self, batch: list[tuple[bytes, object]]) -> None:
        with pytest.raises(InvalidBatch):
            self.writer.append(batch)  # type: ignore[arg-type]

    @precondition(lambda self: self.model)
    @rule(data=st.data())
    def read_from_a_message(self, data: st.DataObject) -> None:
        index = data.draw(st.integers(0, len(self.model) - 1))
        messages = list(Reader.open(self.storage, "orders").read(self.positions[index]))
        assert [(m.key, m.value) for m in messages] == self.model[index:]
        assert [m.sequence for m in messages] == list(range(index, len(self.model)))

    @rule(offset=st.integers(0, 5000))
    def read_from_a_random_offset(self, offset: int) -> None:
        reader = Reader.open(self.storage, "orders")
        if offset in self.positions or offset == self.end:
            list(reader.read(offset))
        else:
            with pytest.raises(InvalidPosition):
                reader.read(offset)

    @invariant()
    def whole_stream_matches(self) -> None:
        messages = list(Reader.open(self.storage, "orders").read())
        assert [(m.key, m.value) for m in messages] == self.model
        assert [m.position for m in messages] == self.positions
        assert self.writer.checkpoint.length == self.end

    def teardown(self) -> None:
        self.writer.close()


LogMachine.TestCase.settings = settings(max_examples=100, stateful_step_count=30, deadline=None)
test_log_state_machine = LogMachine.TestCase
