"""Direct followers back off while a stream is idle (issue 17), and poll fast again when data comes.

Every check of an idle stream is a checkpoint read: on Azure, a billed
request. These tests see exactly which waits each follower asks for, by a
stop event whose ``wait`` records its timeout and returns at once, and how
many checkpoint reads it makes, by a thin counting wrapper around the real
store. No clock is read: a follower's pace is a function of its waits.
"""

from __future__ import annotations

import asyncio
import math
import threading
from collections.abc import Callable, Iterator
from itertools import pairwise
from pathlib import Path
from typing import Any, cast

import pytest
from click.testing import CliRunner
from hypothesis import given
from hypothesis import strategies as st

from messagevault import FileStorage, InvalidInput, Message, Reader, Writer
from messagevault.checkpoint import Checkpoint
from messagevault.cli import main
from messagevault.cli_config import Target
from messagevault.cli_sources import StorageSource
from messagevault.consumer import AsyncConsumer, Consumer
from messagevault.polling import (
    DEFAULT_MAX_POLL_INTERVAL,
    DEFAULT_POLL_INTERVAL,
    MAX_POLL_INTERVAL,
    PollBackoff,
    check_poll_options,
)
from messagevault.positions import MemoryPositionStore
from messagevault.storage.azure import AzureStorage
from messagevault.storage.base import Storage, StreamStore

STREAM = "orders"
DEFAULT_WAITS = [0.1, 0.2, 0.4, 0.8, 1.6, 2.0, 2.0, 2.0]
MAX_WAITS = 2000  # far more than any scenario here asks for
WAIT = 20.0  # upper bound on the one test that runs real waits; it takes a fraction of that


class CountingStore:
    """A real stream store that counts its checkpoint reads (instrumentation, not a stand-in)."""

    def __init__(self, store: StreamStore) -> None:
        self._store = store
        self.checkpoint_reads = 0

    def read_checkpoint(self) -> Checkpoint:
        self.checkpoint_reads += 1
        return self._store.read_checkpoint()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)


class CountingStorage:
    """A real storage whose stream handles count their checkpoint reads."""

    def __init__(self, storage: Storage) -> None:
        self.raw = storage
        self.stores: list[CountingStore] = []

    def open_stream(self, name: str, **options: Any) -> StreamStore:
        store = CountingStore(self.raw.open_stream(name, **options))
        self.stores.append(store)
        return cast(StreamStore, store)

    @property
    def checkpoint_reads(self) -> int:
        return sum(store.checkpoint_reads for store in self.stores)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.raw, name)

    def as_storage(self) -> Storage:
        return cast(Storage, self)


class RecordingStop(threading.Event):
    """A stop event whose waits return at once, recording the timeout each one asked for.

    ``on_wait(n)`` runs at the n-th wait (from 1): it may append to the
    stream, or ``set()`` the event to end the follow. ``reads()`` is read at
    each wait too, so the test knows how many checkpoint reads came between.
    """

    def __init__(self, on_wait: Callable[[int], None], reads: Callable[[], int]) -> None:
        super().__init__()
        self.waits: list[float] = []
        self.reads_at_wait: list[int] = []
        self._on_wait = on_wait
        self._reads = reads

    def wait(self, timeout: float | None = None) -> bool:
        assert timeout is not None, "a follower must never wait without a bound"
        # A follower that never reaches the scenario's next step fails, not hangs.
        assert len(self.waits) < MAX_WAITS, f"still waiting after {MAX_WAITS} waits"
        self.waits.append(timeout)
        self.reads_at_wait.append(self._reads())
        self._on_wait(len(self.waits))
        return self.is_set()


def polls_between_waits(stop: RecordingStop) -> list[int]:
    return [later - earlier for earlier, later in pairwise(stop.reads_at_wait)]


def waits_per_poll(stop: RecordingStop) -> list[float]:
    """The waits a follower asked for, added up between consecutive checkpoint reads.

    A consumer's loop wakes every 0.1 s at most (to see stops and timed
    saves), so one pause between polls may be several waits.
    """
    grouped: list[float] = []
    last_reads = None
    for wait, reads in zip(stop.waits, stop.reads_at_wait, strict=True):
        if reads == last_reads:
            grouped[-1] += wait
        else:
            grouped.append(wait)
        last_reads = reads
    return grouped


def _stream(storage: Storage, *values: bytes) -> None:
    with Writer.open(storage, STREAM, create=True) as writer:
        if values:
            writer.append([(b"k", value) for value in values])


def _append(storage: Storage, value: bytes) -> None:
    with Writer.open(storage, STREAM) as writer:
        writer.append([(b"k", value)])


# The policy ---------------------------------------------------------------------------


def test_default_backoff_doubles_to_two_seconds_and_resets_on_data() -> None:
    backoff = PollBackoff()
    assert (backoff.poll_interval, backoff.max_poll_interval) == (0.1, 2.0)
    assert [backoff.idle() for _ in range(8)] == DEFAULT_WAITS
    backoff.found()
    assert [backoff.idle() for _ in range(3)] == [0.1, 0.2, 0.4]
    backoff.found()
    backoff.found()  # data twice in a row: still the first interval
    assert backoff.idle() == 0.1


def test_an_idle_minute_costs_at_most_one_request_per_second_after_ten_seconds() -> None:
    """The issue's target, counted in the waits asked for: polls are what the waits allow."""
    backoff, idle, polls, slow_after_ten = PollBackoff(), 0.0, 0, True
    while idle < 60:
        wait = backoff.idle()
        polls += 1
        if idle >= 10 and wait < 1.0:
            slow_after_ten = False
        idle += wait
    assert slow_after_ten
    assert polls <= 34  # ~600 at a fixed 0.1 s
    assert max(PollBackoff().idle() for _ in range(1000)) <= DEFAULT_MAX_POLL_INTERVAL


def test_without_a_ceiling_a_slow_first_interval_is_kept() -> None:
    """``poll_interval=5`` was valid before ceilings existed: it still is, and stays at 5."""
    backoff = PollBackoff(5)
    assert [backoff.idle() for _ in range(3)] == [5.0, 5.0, 5.0]
    assert check_poll_options(0.5, None) == (0.5, DEFAULT_MAX_POLL_INTERVAL)


intervals = st.floats(min_value=0.001, max_value=MAX_POLL_INTERVAL)


@given(first=intervals, ceiling=intervals, empty=st.integers(0, 40))
def test_any_backoff_doubles_within_its_bounds_and_resets(
    first: float, ceiling: float, empty: int
) -> None:
    first, ceiling = min(first, ceiling), max(first, ceiling)
    backoff = PollBackoff(first, ceiling)
    waits = [backoff.idle() for _ in range(empty + 1)]
    assert waits[0] == first
    for earlier, later in pairwise(waits):
        assert later == min(earlier * 2, ceiling)
    assert all(first <= wait <= ceiling for wait in waits)
    # The ceiling is reached after at most log2(ceiling/first) + 1 doublings.
    reach = math.ceil(math.log2(ceiling / first)) + 1
    if empty >= reach:
        assert waits[-1] == ceiling
    backoff.found()
    assert backoff.idle() == first


BAD_OPTIONS: dict[str, tuple[object, object, str]] = {
    "zero": (0, None, "poll_interval must be more than 0"),
    "negative": (-0.1, None, "poll_interval must be more than 0"),
    "nan": (math.nan, None, "poll_interval must be more than 0"),
    "infinite": (math.inf, None, "poll_interval must be more than 0"),
    "over a minute": (61, None, "poll_interval must be more than 0 and at most 60"),
    "bool": (True, None, "poll_interval must be a number of seconds, not bool"),
    "text": ("0.1", None, "poll_interval must be a number of seconds, not str"),
    "none": (None, None, "poll_interval must be a number of seconds, not NoneType"),
    "ceiling zero": (0.1, 0, "max_poll_interval must be more than 0"),
    "ceiling negative": (0.1, -2, "max_poll_interval must be more than 0"),
    "ceiling nan": (0.1, math.nan, "max_poll_interval must be more than 0"),
    "ceiling over a minute": (0.1, 3600, "max_poll_interval must be more than 0"),
    "ceiling bool": (0.1, True, "max_poll_interval must be a number of seconds, not bool"),
    "ceiling text": (0.1, "2", "max_poll_interval must be a number of seconds, not str"),
    "ceiling below first": (1.0, 0.5, r"max_poll_interval \(0.5\) must be at least poll_interval"),
}


@pytest.mark.parametrize(("first", "ceiling", "expected"), BAD_OPTIONS.values(), ids=BAD_OPTIONS)
def test_bad_poll_options_are_refused_naming_the_option(
    first: object, ceiling: object, expected: str
) -> None:
    with pytest.raises(InvalidInput, match=expected) as raised:
        PollBackoff(first, ceiling)  # type: ignore[arg-type]
    assert "\n" not in str(raised.value)


# Reader.follow --------------------------------------------------------------------------


def _idle_then_data(storage: CountingStorage) -> RecordingStop:
    """A stop for a follower of a one-message stream: a commit at the 8th wait, stop at the 11th."""

    def on_wait(count: int) -> None:
        if count == 8:
            _append(storage.raw, b"second")  # committed while the follower waits
        elif count == 11:
            stop.set()

    stop = RecordingStop(on_wait, lambda: storage.checkpoint_reads)
    return stop


def _follow_idle_then_data(
    storage: CountingStorage, poll_interval: float = 0.1, max_poll_interval: float | None = None
) -> RecordingStop:
    stop = _idle_then_data(storage)
    with Reader.open(storage.as_storage(), STREAM) as reader:
        followed = reader.follow(
            0, poll_interval=poll_interval, max_poll_interval=max_poll_interval, stop=stop
        )
        assert [m.value for m in followed] == [b"first", b"second"]
    return stop


def test_reader_follow_backs_off_while_idle_and_resets_on_a_commit(tmp_path: Path) -> None:
    storage = CountingStorage(FileStorage(tmp_path))
    _stream(storage.as_storage(), b"first")
    stop = _follow_idle_then_data(storage)
    assert stop.waits == [*DEFAULT_WAITS, 0.1, 0.2, 0.4]
    # One checkpoint read per wait while idle; two around the commit (the
    # read that found it, then the one that found nothing more).
    assert polls_between_waits(stop) == [1] * 7 + [2] + [1] * 2


def test_reader_follow_takes_its_own_interval_and_ceiling(tmp_path: Path) -> None:
    storage = CountingStorage(FileStorage(tmp_path))
    _stream(storage.as_storage(), b"first")
    stop = _follow_idle_then_data(storage, poll_interval=0.25, max_poll_interval=1.5)
    assert stop.waits == [0.25, 0.5, 1.0, 1.5, 1.5, 1.5, 1.5, 1.5, 0.25, 0.5, 1.0]


def test_reader_follow_on_azurite_costs_few_requests_an_idle_minute(
    azure_storage: AzureStorage,
) -> None:
    """An idle minute of a direct follower on Azure: its requests, and the first message after."""
    storage = CountingStorage(azure_storage)
    _stream(azure_storage)
    appended_at = 0  # the wait during which the message was committed

    def on_wait(count: int) -> None:
        nonlocal appended_at
        if not appended_at and sum(stop.waits) >= 60:
            _append(azure_storage, b"after a minute")
            appended_at = count
        elif appended_at:
            stop.set()  # the follower has read it and is idle again

    stop = RecordingStop(on_wait, lambda: storage.checkpoint_reads)
    with Reader.open(storage.as_storage(), STREAM) as reader:
        seen = [m.value for m in reader.follow(0, stop=stop)]
    assert seen == [b"after a minute"]
    idle_waits = stop.waits[:appended_at]
    # One checkpoint read per wait, and so few: a fixed 0.1 s made ~600 a minute.
    assert polls_between_waits(stop)[: appended_at - 1] == [1] * (appended_at - 1)
    assert len(idle_waits) <= 34
    idle = 0.0
    for wait in idle_waits:
        if idle >= 10:
            assert wait >= 1.0  # at most one request a second once idle for 10 s
        idle += wait
    # The message committed during the last idle wait was read by the poll
    # that ended it: seen within that wait, at most the ceiling.
    assert idle_waits[-1] <= DEFAULT_MAX_POLL_INTERVAL
    assert stop.waits[appended_at:] == [DEFAULT_POLL_INTERVAL]  # fast again once data came


def test_reader_follow_refuses_bad_options_before_reading(tmp_path: Path) -> None:
    storage = CountingStorage(FileStorage(tmp_path))
    _stream(storage.as_storage(), b"first")
    with Reader.open(storage.as_storage(), STREAM) as reader:
        before = storage.checkpoint_reads
        for first, ceiling, expected in BAD_OPTIONS.values():
            with pytest.raises(InvalidInput, match=expected):
                reader.follow(0, poll_interval=first, max_poll_interval=ceiling)  # type: ignore[arg-type]
        assert storage.checkpoint_reads == before


# Consumers ------------------------------------------------------------------------------


def test_consumer_on_storage_backs_off_while_idle_and_resets_on_a_commit(tmp_path: Path) -> None:
    storage = CountingStorage(FileStorage(tmp_path))
    _stream(storage.as_storage(), b"first")
    handled: list[bytes] = []
    appended = False

    def on_wait(count: int) -> None:
        nonlocal appended
        pauses = waits_per_poll(stop)
        # The 7th pause (the second at the 2 s ceiling) ends: commit, then idle again.
        if len(pauses) == 7 and math.isclose(pauses[-1], 2.0) and not appended:
            _append(storage.raw, b"second")
            appended = True
        elif len(pauses) == 10 and math.isclose(pauses[-1], 0.4):
            stop.set()

    stop = RecordingStop(on_wait, lambda: storage.checkpoint_reads)
    consumer = Consumer(
        storage.as_storage(),
        STREAM,
        "audit",
        MemoryPositionStore(),
        save_every=1,
        save_interval=None,
        stop=stop,
    )
    with consumer:
        consumer.run(lambda message: handled.append(message.value), handle_signals=False)
    assert handled == [b"first", b"second"]
    # The consumer's loop wakes every 0.1 s at most; storage is read only when the backoff says.
    assert max(stop.waits) <= 0.1 + 1e-12
    pauses = waits_per_poll(stop)
    assert pauses == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.6, 2.0, 2.0, 0.1, 0.2, 0.4])
    # One checkpoint read ends each pause; two around the commit.
    assert [step for step in polls_between_waits(stop) if step] == [1] * 6 + [2] + [1] * 2


def test_reader_feed_takes_the_consumers_interval_and_ceiling(tmp_path: Path) -> None:
    storage = CountingStorage(FileStorage(tmp_path))
    _stream(storage.as_storage(), b"first")

    def on_wait(count: int) -> None:
        pauses = waits_per_poll(stop)
        if len(pauses) == 6 and math.isclose(pauses[-1], 0.3):
            stop.set()

    stop = RecordingStop(on_wait, lambda: storage.checkpoint_reads)
    with Consumer(
        storage.as_storage(),
        STREAM,
        "audit",
        MemoryPositionStore(),
        save_every=1,
        save_interval=None,
        stop=stop,
        poll_interval=0.05,
        max_poll_interval=0.3,
    ) as consumer:
        consumer.run(lambda message: None, handle_signals=False)
    assert waits_per_poll(stop) == pytest.approx([0.05, 0.1, 0.2, 0.3, 0.3, 0.3])


def test_async_consumer_on_storage_follows_with_a_ceiling(tmp_path: Path) -> None:
    """The async consumer reads storage through the same feed: it still sees what comes."""
    storage = CountingStorage(FileStorage(tmp_path))
    _stream(storage.as_storage(), b"first")
    raw = storage.raw

    async def scenario() -> list[bytes]:
        handled: list[bytes] = []
        consumer = AsyncConsumer(
            storage.as_storage(),
            STREAM,
            "audit",
            MemoryPositionStore(),
            poll_interval=0.001,
            max_poll_interval=0.004,
        )

        def handle(message: Message) -> None:
            handled.append(message.value)
            if len(handled) == 2:
                consumer.stop()

        running = asyncio.create_task(consumer.run(handle))
        reads = storage.checkpoint_reads

        async def backed_off() -> None:
            while storage.checkpoint_reads < reads + 8:  # polls enough to reach the ceiling
                await asyncio.sleep(0.001)

        await asyncio.wait_for(backed_off(), WAIT)
        await asyncio.to_thread(_append, raw, b"second")
        await asyncio.wait_for(running, WAIT)
        await consumer.aclose()
        return handled

    assert asyncio.run(scenario()) == [b"first", b"second"]


@pytest.mark.parametrize(("first", "ceiling", "expected"), BAD_OPTIONS.values(), ids=BAD_OPTIONS)
def test_consumers_refuse_bad_poll_options(
    tmp_path: Path, first: object, ceiling: object, expected: str
) -> None:
    storage = FileStorage(tmp_path)
    options: dict[str, Any] = {"poll_interval": first, "max_poll_interval": ceiling}
    with pytest.raises(InvalidInput, match=expected):
        Consumer(storage, STREAM, "audit", MemoryPositionStore(), **options)
    with pytest.raises(InvalidInput, match=expected):
        AsyncConsumer(storage, STREAM, "audit", MemoryPositionStore(), **options)
    assert not any(tmp_path.iterdir())  # nothing opened, nothing created


# The CLI's storage follow ---------------------------------------------------------------


def _source_runs(
    source: StorageSource, stop: RecordingStop, backoff: PollBackoff | None
) -> list[bytes]:
    seen: list[bytes] = []
    for run in source.follow(STREAM, 0, stop, backoff):
        seen += [m.value for m in run]
    return seen


@pytest.mark.parametrize(
    ("backoff", "expected"),
    [
        (None, [*DEFAULT_WAITS, 0.1, 0.2, 0.4]),
        (PollBackoff(0.5, 4), [0.5, 1, 2, 4, 4, 4, 4, 4, 0.5, 1, 2]),
    ],
    ids=["defaults", "--poll 0.5 --max-poll 4"],
)
def test_cli_storage_follow_backs_off_while_idle_and_resets_on_a_commit(
    tmp_path: Path, backoff: PollBackoff | None, expected: list[float]
) -> None:
    storage = CountingStorage(FileStorage(tmp_path))
    _stream(storage.as_storage(), b"first")

    def on_wait(count: int) -> None:
        if count == 8:
            _append(storage.raw, b"second")
        elif count == 11:
            stop.set()

    stop = RecordingStop(on_wait, lambda: storage.checkpoint_reads)
    source = StorageSource(storage.as_storage(), Target(storage=f"file:{tmp_path}"))
    try:
        assert _source_runs(source, stop, backoff) == [b"first", b"second"]
    finally:
        source.close()
    assert stop.waits == expected
    assert polls_between_waits(stop) == [1] * 7 + [2] + [1] * 2


def _cli(tmp_path: Path, *args: str) -> tuple[int, str, str]:
    runner = CliRunner()
    result = runner.invoke(
        main,
        list(args),
        env={
            "MESSAGEVAULT_CONFIG": str(tmp_path / "no-config.toml"),
            "MESSAGEVAULT_URL": None,
            "MESSAGEVAULT_STORAGE": None,
            "MESSAGEVAULT_PROFILE": None,
        },
    )
    return result.exit_code, result.stdout, result.stderr


def test_cli_read_follow_passes_poll_and_max_poll_to_the_storage_follow(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The options reach the real storage follow (which the test above shows obeys them)."""
    _stream(FileStorage(tmp_path / "data"), b"first")
    given: list[PollBackoff | None] = []
    real_follow = StorageSource.follow

    def recording_follow(
        self: StorageSource,
        stream: str,
        position: int,
        stop: threading.Event,
        backoff: PollBackoff | None = None,
    ) -> Iterator[Any]:
        given.append(backoff)
        return real_follow(self, stream, position, stop, backoff)

    monkeypatch.setattr(StorageSource, "follow", recording_follow)
    storage = f"file:{tmp_path / 'data'}"
    code, out, err = _cli(
        tmp_path, "read", "--storage", storage, STREAM, "--follow", "--limit", "1",
        "--poll", "0.3", "--max-poll", "5", "--format", "value",
    )  # fmt: skip
    assert (code, out, err) == (0, "first\n", "")
    backoff = given[0]
    assert backoff is not None
    assert (backoff.poll_interval, backoff.max_poll_interval) == (0.3, 5.0)


BAD_CLI: dict[str, tuple[list[str], str]] = {
    "zero": (["--poll", "0"], "Invalid value for '--poll': 0 must be more than 0"),
    "negative": (["--poll", "-1"], "Invalid value for '--poll': -1 must be more than 0"),
    "text": (["--poll", "soon"], "Invalid value for '--poll': 'soon' is not a valid float"),
    "nan": (["--poll", "nan"], "Invalid value for '--poll': nan must be more than 0"),
    "too long": (["--poll", "120"], "Invalid value for '--poll': 120 must be more than 0"),
    "ceiling zero": (["--max-poll", "0"], "Invalid value for '--max-poll': 0 must be more"),
    "ceiling text": (["--max-poll", "2s"], "Invalid value for '--max-poll': '2s' is not a valid"),
    "ceiling below": (
        ["--poll", "1", "--max-poll", "0.5"],
        "--max-poll (0.5) must be at least --poll (1.0)",
    ),
}


@pytest.mark.parametrize("command", ["read --follow", "tail"])
@pytest.mark.parametrize(("options", "expected"), BAD_CLI.values(), ids=BAD_CLI)
def test_cli_bad_poll_options_are_one_line_usage_errors_before_anything_is_read(
    tmp_path: Path, command: str, options: list[str], expected: str
) -> None:
    # The storage does not exist: an error about it would mean it was opened first.
    missing = tmp_path / "nowhere"
    name, *flags = command.split()
    code, out, err = _cli(tmp_path, name, "--storage", f"file:{missing}", STREAM, *flags, *options)
    assert code == 2
    assert out == ""
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert expected in err
    assert not missing.exists()
