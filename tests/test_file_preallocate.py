"""The file backend keeps a stream's data file ahead of it in flushed zeros (fsync=always).

What must hold: the zeros are there while a writer has the stream, and only
past the committed length; readers and rolling forward never take them for
data; a writer's first commit leaves nothing but zeros past its end, so no
leftover batch can be adopted after a crash; a clean close trims the file
to the stream, but never what an unfinished commit wrote.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from messagevault import FileStorage, Reader, Writer
from messagevault.checkpoint import CHECKPOINT_SIZE
from messagevault.format import encode_batch
from messagevault.storage.file import (
    CHECKPOINT_FILE,
    DATA_FILE,
    LOCK_FILE,
    PREALLOCATE_MIN_STEP,
)

STREAM = "orders"


def _rows(number: int, count: int = 3, size: int = 100) -> list[tuple[bytes, bytes]]:
    return [(b"k%d" % number, b"%d-%d-" % (number, i) + bytes(size)) for i in range(count)]


def _data(root: Path) -> bytes:
    return (root / STREAM / DATA_FILE).read_bytes()


def _crash_copy(root: Path, copy: Path) -> FileStorage:
    """The stream's files as a SIGKILL would leave them now: the page cache outlives the process."""
    shutil.copytree(root, copy, ignore=shutil.ignore_patterns(LOCK_FILE))
    return FileStorage(copy)


def test_the_data_file_runs_ahead_in_zeros_while_written_and_is_trimmed_on_close(
    tmp_path: Path,
) -> None:
    storage = FileStorage(tmp_path, preallocate=256 * 1024)
    with Writer.open(storage, STREAM) as writer:
        written, sizes = [], set()
        for n in range(60):  # ~150 KB in all
            written.append(writer.append(_rows(n, count=20)))
            sizes.add(len(_data(tmp_path)))
        # Extended in steps, not commit by commit: the point is that most
        # commits leave the file's size alone.
        assert len(sizes) <= 60 // 5
        end = writer.checkpoint.length
        raw = _data(tmp_path)
        assert len(raw) > end, "no zeros ahead of the stream"
        assert raw[end:] == bytes(len(raw) - end)
        # Steps of an eighth of the stream, at least the minimum, at most ``preallocate``.
        assert len(raw) - end <= max(PREALLOCATE_MIN_STEP, end // 8) + 4096
        with Reader.open(storage, STREAM) as reader:
            assert [m.key for m in reader.read()] == [
                b"k%d" % n for n in range(60) for _ in range(20)
            ]
    assert len(_data(tmp_path)) == end == written[-1].end


def test_a_stream_far_past_the_largest_step_keeps_at_most_that_much_ahead(tmp_path: Path) -> None:
    storage = FileStorage(tmp_path, preallocate=PREALLOCATE_MIN_STEP)
    with Writer.open(storage, STREAM) as writer:
        for n in range(40):
            writer.append(_rows(n, count=50, size=500))  # ~1 MB in all
        ahead = len(_data(tmp_path)) - writer.checkpoint.length
    assert 0 < ahead <= PREALLOCATE_MIN_STEP + 4096


def test_commits_larger_than_half_a_step_are_not_followed_by_zeros(tmp_path: Path) -> None:
    # They would outrun the zeros anyway (large values): zeros would only double the writes.
    storage = FileStorage(tmp_path, preallocate=PREALLOCATE_MIN_STEP)
    with Writer.open(storage, STREAM) as writer:
        for n in range(3):
            writer.append(_rows(n, count=1, size=PREALLOCATE_MIN_STEP // 2))
            assert len(_data(tmp_path)) == writer.checkpoint.length
        writer.append(_rows(3))  # a small one after them: zeros again
        assert len(_data(tmp_path)) > writer.checkpoint.length


@pytest.mark.parametrize(
    ("fsync", "preallocate"), [("never", 1 << 20), ("batch", 1 << 20), ("always", 0)]
)
def test_no_zeros_ahead_unless_fsync_always_and_preallocate(
    tmp_path: Path, fsync: str, preallocate: int
) -> None:
    storage = FileStorage(tmp_path, fsync=fsync, preallocate=preallocate)
    with Writer.open(storage, STREAM) as writer:
        for n in range(5):
            writer.append(_rows(n))
        assert len(_data(tmp_path)) == writer.checkpoint.length


def test_the_first_commit_leaves_only_zeros_past_it_so_a_crash_adopts_no_leftovers(
    tmp_path: Path,
) -> None:
    """A whole batch left past the checkpoint (a torn group commit's) must go at the first commit.

    Preallocation means the file is longer than the stream anyway: the
    leftovers must not survive as the tail a crash would then leave for the
    next writer to roll forward.
    """
    storage = FileStorage(tmp_path)
    with Writer.open(storage, STREAM) as writer:
        writer.append(_rows(0))
        start = writer.checkpoint
    new_batch = encode_batch(_rows(1))
    # A whole, valid batch just where the next commit will end: it continues the chain.
    leftover = encode_batch(_rows(7)).frame(
        start.length + new_batch.frame_size, start.next_sequence + 3, start.last_timestamp
    )
    with (tmp_path / STREAM / DATA_FILE).open("r+b") as file:
        file.seek(start.length + new_batch.frame_size)
        file.write(leftover)
    with Writer.open(storage, STREAM) as writer:
        assert writer.checkpoint == start
        end = writer.append(_rows(1)).end
        assert end == start.length + new_batch.frame_size  # the leftover would have fitted
        raw = _data(tmp_path)
        assert len(raw) > end and raw[end:] == bytes(len(raw) - end)
        crashed = _crash_copy(tmp_path, tmp_path / "crashed")
    with Writer.open(crashed, STREAM) as writer:
        assert writer.checkpoint.length == end, "a leftover batch was rolled forward"
    with Reader.open(crashed, STREAM) as reader:
        assert [m.key for m in reader.read()] == [b"k0"] * 3 + [b"k1"] * 3


def test_rolling_forward_after_a_crash_stops_at_the_zeros(tmp_path: Path) -> None:
    storage = FileStorage(tmp_path)
    with Writer.open(storage, STREAM) as writer:
        writer.append(_rows(0))
        stale_checkpoint = (tmp_path / STREAM / CHECKPOINT_FILE).read_bytes()
        ends = [writer.append(_rows(n)).end for n in range(1, 4)]
        assert len(_data(tmp_path)) > ends[-1]
        crashed = _crash_copy(tmp_path, tmp_path / "crashed")
    # A power cut may leave a checkpoint older than the data it lost the flush of.
    (tmp_path / "crashed" / STREAM / CHECKPOINT_FILE).write_bytes(stale_checkpoint)
    with Writer.open(crashed, STREAM) as writer:
        assert writer.checkpoint.length == ends[-1]
        writer.append(_rows(4))
    with Reader.open(crashed, STREAM) as reader:
        assert [m.key for m in reader.read()] == [b"k%d" % n for n in range(5) for _ in range(3)]
    assert len(_data(tmp_path / "crashed")) == writer.checkpoint.length


def test_a_clean_close_keeps_what_an_unfinished_commit_wrote(tmp_path: Path) -> None:
    storage = FileStorage(tmp_path)
    with Writer.open(storage, STREAM) as writer:
        writer.append(_rows(0))
        start = writer.checkpoint
    store = storage.open_stream(STREAM, write=True)
    frame = encode_batch(_rows(1)).frame(start.length, start.next_sequence, start.last_timestamp)
    whole = start.length + len(frame)
    try:
        checkpoint = store.read_checkpoint()
        # A commit of nothing new: this handle has committed, as a writer's has.
        store.advance_checkpoint(
            dataclasses.replace(checkpoint, commit=checkpoint.commit + 1), expected=checkpoint
        )
        store.write(start.length, frame)  # its commit never comes
    finally:
        store.close()
    assert len(_data(tmp_path)) >= whole
    assert _data(tmp_path)[start.length : whole] == frame
    with Writer.open(storage, STREAM) as writer:  # a whole batch: rolled forward
        assert writer.checkpoint.length == whole


def test_the_checkpoint_file_is_never_preallocated(tmp_path: Path) -> None:
    with Writer.open(FileStorage(tmp_path), STREAM) as writer:
        writer.append(_rows(0))
        assert os.stat(tmp_path / STREAM / CHECKPOINT_FILE).st_size == 2 * CHECKPOINT_SIZE


@pytest.mark.parametrize("bad", [-1, 1.5, True, "8M", None])
def test_a_bad_preallocate_is_refused_in_one_line(tmp_path: Path, bad: object) -> None:
    with pytest.raises(ValueError, match=r"^preallocate must be a whole number of bytes") as info:
        FileStorage(tmp_path / "data", preallocate=bad)  # type: ignore[arg-type]
    assert "\n" not in str(info.value)
    assert not (tmp_path / "data").exists()


# A child with a file size limit (RLIMIT_FSIZE, SIGXFSZ ignored): its writes
# past the limit fail with EFBIG, as they would with ENOSPC on a full disk.
_LIMITED_WRITER = """
import resource, signal, sys
from messagevault import FileStorage, Reader, Writer
from messagevault.errors import StorageError

root, limit = sys.argv[1], int(sys.argv[2])
storage = FileStorage(root)
with Writer.open(storage, "orders", create=True, commit_timeout=0.2) as writer:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    for n in range(10):
        writer.append([(b"k%d" % n, bytes(1000))])
    try:
        writer.append([(b"too big", bytes(limit))])
    except StorageError:
        print("refused")
with Reader.open(storage, "orders") as reader:
    print(len(list(reader.read())))
"""


def test_no_room_for_zeros_leaves_room_for_commits(tmp_path: Path) -> None:
    limit = 20_000  # far less than the zeros of a first step (PREALLOCATE_MIN_STEP)
    result = subprocess.run(
        [sys.executable, "-c", _LIMITED_WRITER, str(tmp_path), str(limit)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["refused", "10"]
    assert len(_data(tmp_path)) <= limit
