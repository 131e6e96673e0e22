"""Consumer: handles every message in order, saves its position (with state), resumes exactly."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from messagevault import (
    CorruptData,
    InvalidInput,
    InvalidPosition,
    MemoryStorage,
    Message,
    Reader,
    StaleWriter,
    StreamNotFound,
    Writer,
)
from messagevault.client import AsyncClient, Client
from messagevault.consumer import AsyncConsumer, Consumer
from messagevault.positions import (
    AzurePositionStore,
    FilePositionStore,
    MemoryPositionStore,
    SavedPosition,
)
from messagevault.server import Limits, StreamHub, create_app
from messagevault.storage import FileStorage
from messagevault.storage.base import Storage
from tests.azurite import Azurite
from tests.served import ServedApp

STREAM = "orders"
WAIT = 10.0  # bound on every poll loop below; none comes near it when things work


class RecordingStore(MemoryPositionStore):
    """A memory store that keeps every save, in order."""

    def __init__(self) -> None:
        super().__init__()
        self.saves: list[SavedPosition] = []

    def save(self, saved: SavedPosition, *, replaces: SavedPosition | None) -> SavedPosition:
        stored = super().save(saved, replaces=replaces)
        self.saves.append(stored)
        return stored


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def write(storage: Storage, count: int, *, start: int = 0, batch: int = 4) -> None:
    with Writer.open(storage, STREAM) as writer:
        for first in range(start, start + count, batch):
            last = min(first + batch, start + count)
            writer.append([(f"k{i % 3}", f"v{i}".encode()) for i in range(first, last)])


def all_messages(storage: Storage) -> list[Message]:
    with Reader.open(storage, STREAM) as reader:
        return list(reader.read())


def wait_until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting until {what}")
        time.sleep(0.01)


@pytest.fixture
def storage() -> MemoryStorage:
    storage = MemoryStorage()
    write(storage, 20)
    return storage


class Crash(Exception):
    """What a handler raises to play a process dying in the middle of its work."""


# -- resuming ------------------------------------------------------------------------


def test_resumes_exactly_after_the_last_saved_message(storage: MemoryStorage) -> None:
    messages = all_messages(storage)
    positions = RecordingStore()
    handled: list[int] = []

    def dies_at_eight(message: Message) -> None:
        if message.sequence == 8:
            raise Crash
        handled.append(message.sequence)

    consumer = Consumer(storage, STREAM, "audit", positions, save_every=3, save_interval=None)
    with pytest.raises(Crash):
        consumer.run(dies_at_eight, follow=False)
    assert handled == list(range(8))
    # Saved at start, after 3 and after 6 messages; a failed handler saves nothing.
    assert [s.position for s in positions.saves] == [
        0,
        messages[2].next_position,
        messages[5].next_position,
    ]
    again: list[int] = []
    restarted = Consumer(storage, STREAM, "audit", positions, save_every=3, save_interval=None)
    restarted.run(lambda m: again.append(m.sequence), follow=False)
    assert again == list(range(6, 20))  # 6 and 7 again: handled after the last save
    assert positions.saves[-1].position == messages[-1].next_position


def test_a_finished_consumer_handles_nothing_twice(storage: MemoryStorage) -> None:
    positions = MemoryPositionStore()
    seen: list[int] = []
    for _ in range(2):
        with Consumer(storage, STREAM, "audit", positions, save_every=1000) as consumer:
            consumer.run(lambda m: seen.append(m.sequence), follow=False)
    write(storage, 5, start=20)
    with Consumer(storage, STREAM, "audit", positions) as consumer:
        consumer.run(lambda m: seen.append(m.sequence), follow=False)
    assert seen == list(range(25))


# -- save cadence --------------------------------------------------------------------


def test_saves_every_n_messages(storage: MemoryStorage) -> None:
    messages = all_messages(storage)
    positions = RecordingStore()
    consumer = Consumer(storage, STREAM, "audit", positions, save_every=6, save_interval=None)
    consumer.run(lambda m: None, follow=False)
    # The start, every 6th message, then what was left when the stream ended.
    expected = [0] + [messages[i].next_position for i in (5, 11, 17, 19)]
    assert [s.position for s in positions.saves] == expected


def test_saves_every_t_seconds_by_the_clock(storage: MemoryStorage) -> None:
    messages = all_messages(storage)
    positions = RecordingStore()
    clock = FakeClock()

    def slow_handler(message: Message) -> None:
        clock.now += 1.0  # each message "takes" a second

    consumer = Consumer(
        storage, STREAM, "audit", positions, save_every=None, save_interval=2.5, clock=clock
    )
    consumer.run(slow_handler, follow=False)
    # Saved at 1000 (start); due again from 1002.5: after messages 2 (t=1003), 5, 8, ...
    expected = [0] + [messages[i].next_position for i in (2, 5, 8, 11, 14, 17, 19)]
    assert [s.position for s in positions.saves] == expected


def test_interval_counts_from_the_start_of_a_resumed_run(storage: MemoryStorage) -> None:
    messages = all_messages(storage)
    positions = RecordingStore()
    positions.save(SavedPosition("audit", STREAM, messages[9].next_position), replaces=None)
    clock = FakeClock()

    def slow_handler(message: Message) -> None:
        clock.now += 1.0

    consumer = Consumer(
        storage, STREAM, "audit", positions, save_every=None, save_interval=2.5, clock=clock
    )
    consumer.run(slow_handler, follow=False)
    expected = [messages[i].next_position for i in (9, 12, 15, 18, 19)]
    assert [s.position for s in positions.saves] == expected


def test_count_or_time_whichever_comes_first(storage: MemoryStorage) -> None:
    messages = all_messages(storage)
    positions = RecordingStore()
    clock = FakeClock()

    def handler(message: Message) -> None:
        clock.now += 10.0 if message.sequence == 10 else 0.0

    consumer = Consumer(
        storage, STREAM, "audit", positions, save_every=4, save_interval=5.0, clock=clock
    )
    consumer.run(handler, follow=False)
    expected = [0] + [messages[i].next_position for i in (3, 7, 10, 14, 18, 19)]
    assert [s.position for s in positions.saves] == expected


def test_timed_save_while_waiting_at_the_tail(storage: MemoryStorage) -> None:
    """Nothing new arrives, yet handled messages are saved once the interval has passed."""
    messages = all_messages(storage)
    positions = RecordingStore()
    clock = FakeClock()
    consumer = Consumer(
        storage, STREAM, "audit", positions, save_every=1000, save_interval=30.0, clock=clock
    )
    runner = threading.Thread(target=consumer.run, args=(lambda m: None,))
    runner.start()
    try:
        wait_until(lambda: consumer.position == messages[-1].next_position, "all handled")
        assert [s.position for s in positions.saves] == [0]
        clock.now += 29.0
        time.sleep(0.3)  # a few idle wake-ups: not yet due
        assert [s.position for s in positions.saves] == [0]
        clock.now += 1.0
        wait_until(lambda: len(positions.saves) == 2, "the timed save")
        assert positions.saves[1].position == messages[-1].next_position
    finally:
        consumer.stop()
        runner.join(WAIT)
    assert not runner.is_alive()
    assert len(positions.saves) == 2  # nothing new to save at the stop


# -- state saved with the position ---------------------------------------------------


def test_state_is_saved_with_the_position_it_belongs_to(storage: MemoryStorage) -> None:
    messages = all_messages(storage)
    by_position = {m.next_position: m.sequence + 1 for m in messages}
    positions = RecordingStore()
    counts: dict[str, int] = {}

    def count(message: Message) -> None:
        key = message.key.decode()
        counts[key] = counts.get(key, 0) + 1

    consumer = Consumer(
        storage, STREAM, "audit", positions, save_every=3, state=lambda: dict(counts)
    )
    consumer.run(count, follow=False)
    assert len(positions.saves) == 8  # the start, every 3rd message, the end
    for saved in positions.saves:
        # In every save, the counts cover exactly the messages before its position.
        handled = by_position.get(saved.position, 0)
        assert sum(saved.state.values()) == handled
    reloaded = Consumer(storage, STREAM, "audit", positions).load()
    assert reloaded is not None and reloaded.state == {"k0": 7, "k1": 7, "k2": 6}


def test_state_restored_after_a_crash_gives_exact_counts(tmp_path: Path) -> None:
    storage = FileStorage(tmp_path / "data")
    write(storage, 50)
    positions = FilePositionStore(tmp_path / "positions")

    def run_until_crash(crash_at: int) -> None:
        counts: dict[str, int] = {}
        consumer = Consumer(
            storage, STREAM, "counts", positions, save_every=4, state=lambda: counts
        )
        saved = consumer.load()
        counts.update(saved.state if saved else {})

        def count(message: Message) -> None:
            if message.sequence == crash_at:
                raise Crash
            counts[message.key.decode()] = counts.get(message.key.decode(), 0) + 1

        with pytest.raises(Crash):
            consumer.run(count, follow=False)

    for crash_at in (7, 13, 14, 31, 49):
        run_until_crash(crash_at)
    final = Consumer(storage, STREAM, "counts", positions).load()
    assert final is not None
    expected: dict[str, int] = {}
    for message in all_messages(storage):
        if message.next_position <= final.position:
            expected[message.key.decode()] = expected.get(message.key.decode(), 0) + 1
    assert final.state == expected
    assert sum(expected.values()) > 40  # the last crash came late: most were counted


# -- batches -------------------------------------------------------------------------


def test_batch_handler(storage: MemoryStorage) -> None:
    messages = all_messages(storage)
    positions = RecordingStore()
    batches: list[list[int]] = []
    consumer = Consumer(storage, STREAM, "audit", positions, save_every=5, save_interval=None)
    consumer.run_batches(
        lambda b: batches.append([m.sequence for m in b]), max_batch=7, follow=False
    )
    assert [n for batch in batches for n in batch] == list(range(20))
    assert all(1 <= len(batch) <= 7 for batch in batches)
    saved = {s.position for s in positions.saves}
    boundaries = {messages[batch[-1]].next_position for batch in batches} | {0}
    assert saved <= boundaries  # only ever between batches


def test_a_failed_batch_is_not_saved(storage: MemoryStorage) -> None:
    positions = RecordingStore()
    batches: list[list[int]] = []

    def handler(batch: list[Message]) -> None:
        if len(batches) == 2:
            raise Crash
        batches.append([m.sequence for m in batch])

    consumer = Consumer(storage, STREAM, "audit", positions, save_every=1, save_interval=None)
    with pytest.raises(Crash):
        consumer.run_batches(handler, max_batch=3, follow=False)
    assert batches == [[0, 1, 2], [3, 4, 5]]
    after_second = all_messages(storage)[5].next_position
    assert [s.position for s in positions.saves][-1] == after_second


def _run_batches_until_all(consumer: Consumer, batches: list[list[int]], total: int) -> None:
    def handler(batch: list[Message]) -> None:
        batches.append([m.sequence for m in batch])
        if batch[-1].sequence == total - 1:
            consumer.stop()

    consumer.run_batches(handler, max_batch=7)


def test_batch_handler_follow(storage: MemoryStorage) -> None:
    positions = RecordingStore()
    batches: list[list[int]] = []
    consumer = Consumer(storage, STREAM, "audit", positions, save_every=5, save_interval=None)
    _run_batches_until_all(consumer, batches, 20)
    assert [n for batch in batches for n in batch] == list(range(20))
    assert positions.saves[-1].position == all_messages(storage)[-1].next_position


# -- where a new consumer starts -----------------------------------------------------


def test_start_at_the_end_is_saved_at_once(storage: MemoryStorage) -> None:
    positions = MemoryPositionStore()
    end = all_messages(storage)[-1].next_position
    seen: list[int] = []
    consumer = Consumer(storage, STREAM, "late", positions, start="end")
    consumer.run(lambda m: seen.append(m.sequence), follow=False)
    assert seen == []
    saved = positions.load("late")
    assert saved is not None and saved.position == end
    write(storage, 3, start=20)  # a restart must not pick a new end
    Consumer(storage, STREAM, "late", positions, start="end").run(
        lambda m: seen.append(m.sequence), follow=False
    )
    assert seen == [20, 21, 22]


def test_start_at_a_position(storage: MemoryStorage) -> None:
    messages = all_messages(storage)
    seen: list[int] = []
    consumer = Consumer(storage, STREAM, "mid", MemoryPositionStore(), start=messages[5].position)
    consumer.run(lambda m: seen.append(m.sequence), follow=False)
    assert seen == list(range(5, 20))


def test_start_inside_a_message_is_refused(storage: MemoryStorage) -> None:
    positions = MemoryPositionStore()
    consumer = Consumer(storage, STREAM, "mid", positions, start=3)
    with pytest.raises(InvalidPosition, match="consumer 'mid' cannot resume at position 3"):
        consumer.run(lambda m: None, follow=False)


# -- following and stopping ----------------------------------------------------------


def test_follows_new_messages_and_stops_from_another_thread(storage: MemoryStorage) -> None:
    positions = MemoryPositionStore()
    seen: list[int] = []
    stop = threading.Event()
    consumer = Consumer(storage, STREAM, "tail", positions, stop=stop, poll_interval=0.01)
    runner = threading.Thread(target=consumer.run, args=(lambda m: seen.append(m.sequence),))
    runner.start()
    try:
        wait_until(lambda: len(seen) == 20, "the first 20")
        write(storage, 30, start=20)
        wait_until(lambda: len(seen) == 50, "all 50")
    finally:
        stop.set()
        runner.join(WAIT)
    assert not runner.is_alive()
    assert seen == list(range(50))
    saved = positions.load("tail")
    assert saved is not None and saved.position == all_messages(storage)[-1].next_position


def test_stop_from_the_handler_finishes_the_message_in_hand(storage: MemoryStorage) -> None:
    messages = all_messages(storage)
    positions = MemoryPositionStore()
    seen: list[int] = []
    consumer = Consumer(storage, STREAM, "audit", positions, save_every=1000)

    def handler(message: Message) -> None:
        seen.append(message.sequence)
        if message.sequence == 11:
            consumer.stop()

    consumer.run(handler)
    assert seen == list(range(12))
    saved = positions.load("audit")
    assert saved is not None and saved.position == messages[11].next_position


def test_sigint_stops_cleanly_and_saves(storage: MemoryStorage) -> None:
    """Ctrl-C in the main thread: the message in hand is finished, the position saved."""
    messages = all_messages(storage)
    positions = MemoryPositionStore()
    seen: list[int] = []
    before = signal.getsignal(signal.SIGINT)

    def handler(message: Message) -> None:
        if message.sequence == 4:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)  # the signal is handled here, inside the handler
        seen.append(message.sequence)

    Consumer(storage, STREAM, "audit", positions).run(handler)
    assert seen == list(range(5))
    saved = positions.load("audit")
    assert saved is not None and saved.position == messages[4].next_position
    assert signal.getsignal(signal.SIGINT) is before


def test_handler_error_is_raised_and_nothing_saved(storage: MemoryStorage) -> None:
    positions = RecordingStore()

    def handler(message: Message) -> None:
        if message.sequence == 2:
            raise ValueError("bad message")

    with pytest.raises(ValueError, match="bad message"):
        Consumer(storage, STREAM, "audit", positions, save_every=1).run(handler)
    assert [s.position for s in positions.saves][-1] == all_messages(storage)[1].next_position


def test_source_failure_saves_what_was_handled_then_raises(tmp_path: Path) -> None:
    storage = FileStorage(tmp_path / "data")
    write(storage, 20)
    messages = all_messages(storage)
    data = tmp_path / "data" / STREAM / "data"
    raw = bytearray(data.read_bytes())
    raw[messages[12].position + 3] ^= 0xFF  # damage a frame in the middle
    data.write_bytes(bytes(raw))
    positions = MemoryPositionStore()
    seen: list[int] = []
    with pytest.raises(CorruptData):
        Consumer(storage, STREAM, "audit", positions, save_every=1000).run(
            lambda m: seen.append(m.sequence), follow=False
        )
    saved = positions.load("audit")
    assert seen and saved is not None
    assert saved.position == messages[seen[-1]].next_position


# -- two consumers, one name ---------------------------------------------------------


def test_two_consumers_under_one_name_fail_loudly(tmp_path: Path) -> None:
    storage = MemoryStorage()
    write(storage, 20)
    one = Consumer(storage, STREAM, "dup", FilePositionStore(tmp_path), save_every=2)
    two = Consumer(storage, STREAM, "dup", FilePositionStore(tmp_path), save_every=2)
    assert one.load() is None and two.load() is None  # both start before either saved
    one.run(lambda m: None, follow=False)
    with pytest.raises(StaleWriter, match=r"consumer 'dup' .* exists although"):
        two.run(lambda m: None, follow=False)

    write(storage, 10, start=20)
    three = Consumer(storage, STREAM, "dup", FilePositionStore(tmp_path), save_every=2)
    four = Consumer(storage, STREAM, "dup", FilePositionStore(tmp_path), save_every=2)
    assert three.load() == four.load()
    three.run(lambda m: None, follow=False)
    handled: list[int] = []
    with pytest.raises(StaleWriter, match="was saved by someone else"):
        four.run(lambda m: handled.append(m.sequence), follow=False)
    assert handled == [20, 21]  # its first save failed
    saved = FilePositionStore(tmp_path).load("dup")
    assert saved == three.saved


def test_saved_for_another_stream(storage: MemoryStorage) -> None:
    positions = MemoryPositionStore()
    positions.save(SavedPosition("audit", "payments", 0), replaces=None)
    consumer = Consumer(storage, STREAM, "audit", positions)
    with pytest.raises(InvalidInput, match="follows stream 'payments', not 'orders'"):
        consumer.run(lambda m: None, follow=False)


def test_saved_position_beyond_the_stream(storage: MemoryStorage) -> None:
    positions = MemoryPositionStore()
    positions.save(SavedPosition("audit", STREAM, 10**9), replaces=None)
    with pytest.raises(InvalidPosition, match="consumer 'audit' cannot resume at position"):
        Consumer(storage, STREAM, "audit", positions).run(lambda m: None, follow=False)


def test_corrupt_position_file_is_named(storage: MemoryStorage, tmp_path: Path) -> None:
    (tmp_path / "audit.json").write_text('{"hello": "world"}')
    consumer = Consumer(storage, STREAM, "audit", FilePositionStore(tmp_path))
    with pytest.raises(CorruptData, match=r"audit\.json is not a usable consumer position"):
        consumer.run(lambda m: None, follow=False)


# -- sources -------------------------------------------------------------------------


def test_reader_and_read_access_sources(tmp_path: Path) -> None:
    storage = FileStorage(tmp_path / "data")
    write(storage, 10)
    positions = MemoryPositionStore()
    with Reader.open(storage, STREAM) as reader:
        seen: list[int] = []
        Consumer(reader, STREAM, "a", positions).run(
            lambda m: seen.append(m.sequence), follow=False
        )
        assert seen == list(range(10))
        with pytest.raises(InvalidInput, match="the reader reads stream 'orders'"):
            Consumer(reader, "payments", "b", positions)
    store = storage.open_stream(STREAM)
    access = store.read_access()
    store.close()
    seen = []
    Consumer(access, STREAM, "c", positions).run(lambda m: seen.append(m.sequence), follow=False)
    assert seen == list(range(10))
    with pytest.raises(InvalidInput, match="the read access reads stream 'orders'"):
        Consumer(access, "payments", "d", positions).run(lambda m: None, follow=False)
    assert positions.load("d") is None


def test_missing_stream_saves_nothing(tmp_path: Path) -> None:
    positions = FilePositionStore(tmp_path)
    with pytest.raises(StreamNotFound):
        Consumer(MemoryStorage(), STREAM, "audit", positions).run(lambda m: None)
    assert list(tmp_path.iterdir()) == []


# -- bad inputs ----------------------------------------------------------------------

BAD_OPTIONS: dict[str, tuple[dict[str, Any], type[Exception], str]] = {
    "name-upper": ({"name": "Audit"}, InvalidInput, "consumer name"),
    "name-empty": ({"name": ""}, InvalidInput, "consumer name"),
    "name-slash": ({"name": "../x"}, InvalidInput, "consumer name"),
    "stream": ({"stream": "Orders"}, InvalidInput, "stream name"),
    "every-zero": ({"save_every": 0}, InvalidInput, "save_every must be"),
    "every-negative": ({"save_every": -5}, InvalidInput, "save_every must be"),
    "every-float": ({"save_every": 2.5}, InvalidInput, "save_every must be"),
    "every-bool": ({"save_every": True}, InvalidInput, "save_every must be"),
    "every-huge": ({"save_every": 10**10}, InvalidInput, "save_every must be"),
    "interval-zero": ({"save_interval": 0}, InvalidInput, "save_interval must be"),
    "interval-negative": ({"save_interval": -1.0}, InvalidInput, "save_interval must be"),
    "interval-huge": ({"save_interval": 1e9}, InvalidInput, "save_interval must be"),
    "interval-str": ({"save_interval": "5"}, InvalidInput, "save_interval must be"),
    "interval-nan": ({"save_interval": float("nan")}, InvalidInput, "save_interval must be"),
    "neither": ({"save_every": None, "save_interval": None}, InvalidInput, "give save_every"),
    "start-word": ({"start": "middle"}, InvalidInput, "start must be"),
    "start-negative": ({"start": -1}, InvalidInput, "start must be"),
    "poll-zero": ({"poll_interval": 0}, InvalidInput, "poll_interval must be"),
    "poll-huge": ({"poll_interval": 3600}, InvalidInput, "poll_interval must be"),
    "state": ({"state": {"not": "callable"}}, TypeError, "state must be a function"),
    "positions": ({"positions": "positions/"}, TypeError, "positions must be a PositionStore"),
    "source": ({"source": "http://127.0.0.1:1"}, TypeError, "reads from a Client"),
}


@pytest.mark.parametrize("case", sorted(BAD_OPTIONS))
def test_bad_options(storage: MemoryStorage, tmp_path: Path, case: str) -> None:
    options, error, message = BAD_OPTIONS[case]
    arguments: dict[str, Any] = {
        "source": storage,
        "stream": STREAM,
        "name": "audit",
        "positions": FilePositionStore(tmp_path),
    }
    arguments.update(options)
    with pytest.raises(error, match=message) as caught:
        Consumer(**arguments)
    assert "\n" not in str(caught.value)
    assert list(tmp_path.iterdir()) == []  # nothing written


@pytest.mark.parametrize("max_batch", [0, -1, 10**6, 1.5])
def test_bad_max_batch(storage: MemoryStorage, max_batch: Any) -> None:
    positions = MemoryPositionStore()
    consumer = Consumer(storage, STREAM, "audit", positions)
    with pytest.raises(InvalidInput, match="max_batch must be"):
        consumer.run_batches(lambda b: None, max_batch=max_batch)
    assert positions.load("audit") is None


def test_handler_must_be_callable(storage: MemoryStorage) -> None:
    consumer = Consumer(storage, STREAM, "audit", MemoryPositionStore())
    with pytest.raises(TypeError, match="handler must be a function"):
        consumer.run("print")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="handler must be a function"):
        consumer.run_batches(None)  # type: ignore[arg-type]


def test_run_twice_at_once_is_refused(storage: MemoryStorage) -> None:
    consumer = Consumer(storage, STREAM, "audit", MemoryPositionStore())
    errors: list[BaseException] = []

    def handler(message: Message) -> None:
        try:
            consumer.run(lambda m: None)
        except RuntimeError as exc:
            errors.append(exc)
        consumer.stop()

    consumer.run(handler)
    assert len(errors) == 1 and "already running" in str(errors[0])


# -- asyncio -------------------------------------------------------------------------


async def test_async_consumer_on_storage(storage: MemoryStorage) -> None:
    messages = all_messages(storage)
    positions = RecordingStore()
    seen: list[int] = []

    async def handler(message: Message) -> None:
        await asyncio.sleep(0)
        seen.append(message.sequence)
        if message.sequence == 8:
            raise Crash

    consumer = AsyncConsumer(storage, STREAM, "audit", positions, save_every=3)
    with pytest.raises(Crash):
        await consumer.run(handler, follow=False)
    assert [s.position for s in positions.saves] == [0] + [
        messages[i].next_position for i in (2, 5)
    ]
    again: list[int] = []
    async with AsyncConsumer(storage, STREAM, "audit", positions, save_every=3) as consumer:
        await consumer.run(lambda m: again.append(m.sequence), follow=False)
    assert again == list(range(6, 20))
    assert positions.saves[-1].position == messages[-1].next_position


async def test_async_batches_follow_and_stop(storage: MemoryStorage) -> None:
    positions = MemoryPositionStore()
    seen: list[int] = []
    consumer = AsyncConsumer(storage, STREAM, "audit", positions, poll_interval=0.01)

    def handler(batch: list[Message]) -> None:
        seen.extend(m.sequence for m in batch)
        if len(seen) == 25:
            consumer.stop()

    task = asyncio.create_task(consumer.run_batches(handler, max_batch=4))
    deadline = time.monotonic() + WAIT
    while len(seen) < 20 and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    await asyncio.to_thread(write, storage, 5, start=20)
    await asyncio.wait_for(task, WAIT)
    assert seen == list(range(25))
    saved = positions.load("audit")
    assert saved is not None and saved.position == all_messages(storage)[-1].next_position


def test_async_bad_source(storage: MemoryStorage) -> None:
    with pytest.raises(TypeError, match="async consumer reads from an AsyncClient"):
        AsyncConsumer(42, STREAM, "audit", MemoryPositionStore())  # type: ignore[arg-type]
    with pytest.raises(InvalidInput, match="poll_interval"):
        AsyncConsumer(storage, STREAM, "audit", MemoryPositionStore(), poll_interval=-1)


# -- a longer replay: the hand-over between threads keeps order and loses nothing -----


def test_long_replay_in_order(tmp_path: Path) -> None:
    storage = FileStorage(tmp_path / "data", fsync="never")
    with Writer.open(storage, STREAM) as writer:
        for first in range(0, 30_000, 1000):
            writer.append([(b"k", b"%d" % i) for i in range(first, first + 1000)])
    seen: list[int] = []
    positions = FilePositionStore(tmp_path / "positions")
    Consumer(storage, STREAM, "replay", positions, save_every=7000).run(
        lambda m: seen.append(m.sequence), follow=False
    )
    assert seen == list(range(30_000))
    saved = positions.load("replay")
    with Reader.open(storage, STREAM) as reader:
        assert saved is not None and saved.position == reader.checkpoint().length


# -- through a server ----------------------------------------------------------------


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[ServedApp, FileStorage]]:
    """A server on file storage in a thread; reads come in pages of ~1 KB (paging exercised)."""
    storage = FileStorage(tmp_path / "data", fsync="never")
    server = ServedApp(create_app(StreamHub(storage), Limits(max_read_bytes=1024))).start()
    yield server, storage
    server.stop()


def test_consumer_through_a_client(served: tuple[ServedApp, FileStorage]) -> None:
    server, storage = served
    positions = RecordingStore()
    with Client(server.url) as client:
        client.publish(STREAM, [(b"k", b"%d" % i) for i in range(30)])
        seen: list[int] = []

        def dies_at_twelve(message: Message) -> None:
            if message.sequence == 12:
                raise Crash
            seen.append(message.sequence)

        with pytest.raises(Crash):
            Consumer(client, STREAM, "audit", positions, save_every=5).run(dies_at_twelve)
        messages = all_messages(storage)
        assert positions.saves[-1].position == messages[9].next_position
        consumer = Consumer(client, STREAM, "audit", positions, save_every=5)

        def handler(message: Message) -> None:
            seen.append(message.sequence)
            if message.sequence == 29:
                client.publish(STREAM, [b"late"])  # followed through a long poll
            if message.sequence == 30:
                consumer.stop()

        consumer.run(handler)
    assert seen == list(range(12)) + list(range(10, 31))
    assert positions.saves[-1].position == all_messages(storage)[-1].next_position


def test_client_source_start_at_end_and_missing_stream(
    served: tuple[ServedApp, FileStorage], tmp_path: Path
) -> None:
    server, storage = served
    positions = FilePositionStore(tmp_path / "positions")
    with Client(server.url) as client:
        with pytest.raises(StreamNotFound):
            Consumer(client, STREAM, "late", positions, start="end").run(lambda m: None)
        assert positions.load("late") is None
        client.publish(STREAM, [b"early"])
        consumer = Consumer(client, STREAM, "late", positions, start="end")
        consumer.run(lambda m: pytest.fail("nothing new to handle"), follow=False)
        assert consumer.position == all_messages(storage)[-1].next_position
        positions.save(
            SavedPosition("late", STREAM, 5, version=""),
            replaces=positions.load("late"),
        )
        with pytest.raises(InvalidPosition, match="consumer 'late' cannot resume at position 5"):
            Consumer(client, STREAM, "late", positions).run(lambda m: None)


async def test_async_consumer_through_an_async_client(
    served: tuple[ServedApp, FileStorage],
) -> None:
    server, storage = served
    positions = RecordingStore()
    async with AsyncClient(server.url) as client:
        await client.publish(STREAM, [(b"k", b"%d" % i) for i in range(40)])
        seen: list[int] = []
        consumer = AsyncConsumer(client, STREAM, "audit", positions, save_every=8)

        async def handler(batch: list[Message]) -> None:
            seen.extend(m.sequence for m in batch)
            if seen[-1] == 39:
                await client.publish(STREAM, [b"late"])
            if seen[-1] == 40:
                consumer.stop()

        await asyncio.wait_for(consumer.run_batches(handler, max_batch=16), WAIT)
        assert seen == list(range(41))
        assert positions.saves[-1].position == all_messages(storage)[-1].next_position
        again = AsyncConsumer(client, STREAM, "audit", positions, start="end")
        await again.run(lambda m: pytest.fail("all was handled"), follow=False)
        with pytest.raises(StreamNotFound):
            await AsyncConsumer(client, "missing", "other", positions).run(lambda m: None)
        assert positions.load("other") is None


def test_two_consumers_under_one_name_on_azure(storage: MemoryStorage, azurite: Azurite) -> None:
    """The ETag condition, end to end: the second consumer's save fails, the first's stands."""
    from azure.storage.blob import BlobServiceClient

    container = "consumer-test-positions"
    one_store = AzurePositionStore.from_connection_string(azurite.connection_string, container)
    two_store = AzurePositionStore.from_connection_string(azurite.connection_string, container)
    try:
        one = Consumer(storage, STREAM, "dup", one_store, save_every=5)
        two = Consumer(storage, STREAM, "dup", two_store, save_every=5)
        assert one.load() is None and two.load() is None
        one.run(lambda m: None, follow=False)
        with pytest.raises(StaleWriter, match=f"position blob .*/{container}/dup.json"):
            two.run(lambda m: None, follow=False)
        saved = one_store.load("dup")
        assert saved is not None and saved == one.saved
    finally:
        one_store.close()
        two_store.close()
        BlobServiceClient.from_connection_string(azurite.connection_string).delete_container(
            container
        )
