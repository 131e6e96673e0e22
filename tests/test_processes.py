"""File storage across real processes: the OS writer lock and live readers."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from pathlib import Path

from messagevault import FileStorage, Reader, Writer

FOLLOWER = textwrap.dedent(
    """
    import sys
    from messagevault import FileStorage, Reader
    reader = Reader.open(FileStorage(sys.argv[1]), "orders")
    print("ready", flush=True)
    for message in reader.follow(poll_interval=0.01):
        print(message.sequence, message.value.decode(), flush=True)
        if message.value == b"last":
            break
    """
)

SECOND_WRITER = textwrap.dedent(
    """
    import sys
    from messagevault import FileStorage, StreamLocked, Writer
    try:
        Writer.open(FileStorage(sys.argv[1]), "orders")
    except StreamLocked as exc:
        print(exc)
        sys.exit(3)
    sys.exit(0)
    """
)


def test_second_writer_process_fails_at_once(tmp_path: Path) -> None:
    storage = FileStorage(tmp_path)
    with Writer.open(storage, "orders") as writer:
        writer.append([(b"k", b"v")])
        started = time.monotonic()
        result = subprocess.run(
            [sys.executable, "-c", SECOND_WRITER, str(tmp_path)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert result.returncode == 3, result.stderr
        assert "already open for writing" in result.stdout
        assert f"pid {__import__('os').getpid()}" in result.stdout
        assert time.monotonic() - started < 30  # it did not wait for the lock
    # Once the writer is gone, another process may write.
    result = subprocess.run(
        [sys.executable, "-c", SECOND_WRITER, str(tmp_path)], timeout=60, check=False
    )
    assert result.returncode == 0


def test_writer_lock_dies_with_a_killed_process(tmp_path: Path) -> None:
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time\n"
            "from messagevault import FileStorage, Writer\n"
            "w = Writer.open(FileStorage(sys.argv[1]), 'orders')\n"
            "print('locked', flush=True)\n"
            "time.sleep(60)\n",
            str(tmp_path),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == "locked"
    finally:
        holder.kill()
        holder.wait(timeout=30)
        if holder.stdout:
            holder.stdout.close()
    with Writer.open(FileStorage(tmp_path), "orders") as writer:  # no stale lock left behind
        writer.append([(b"k", b"v")])


def test_reader_in_another_process_follows_live_commits(tmp_path: Path) -> None:
    storage = FileStorage(tmp_path)
    storage.open_stream("orders", create=True).close()
    follower = subprocess.Popen(
        [sys.executable, "-c", FOLLOWER, str(tmp_path)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert follower.stdout is not None
        assert follower.stdout.readline().strip() == "ready"
        with Writer.open(storage, "orders") as writer:
            for n in range(20):
                writer.append([(b"k", f"m{n}".encode())])
                time.sleep(0.005)
            writer.append([(b"k", b"last")])
        follower.wait(timeout=60)
        # read(), not communicate(): the latter reads the raw descriptor and
        # would lose anything readline() above had already buffered.
        output = follower.stdout.read()
    finally:
        if follower.poll() is None:
            follower.kill()
            follower.wait(timeout=30)
        if follower.stdout:
            follower.stdout.close()
    lines = output.splitlines()
    assert lines == [f"{n} m{n}" for n in range(20)] + ["20 last"]
    assert [m.sequence for m in Reader.open(storage, "orders").read()] == list(range(21))
