"""Fencing, proven with real node processes (issue 13 §3).

A stream's writer W is paused with SIGSTOP while appends sent straight to it
are in flight; the other nodes take the stream once W's lease has run out
and acknowledge appends to it; then W is resumed (SIGCONT) and made to write:
its queued appends resume and more are sent to it. None of them may be
committed by W: each fails (409 ``stale_writer``, 503 ``not_writer`` /
``committer_closed``) or is forwarded to the new writer, W logs that it
stopped writing the stream, and the stream, read from storage, holds every
acknowledged batch once and in order, no refused one, and no in-doubt one
twice. Every batch not acknowledged is then sent again, the same bytes
(the same producer id and batch number), until acknowledged: the stream
then holds each exactly once.

That a writer holding a lease no longer current cannot change the stream,
below the server (a ``Writer`` in this process, another taking the lease,
``StaleWriter``), is tested in ``tests/test_lease_fencing.py``
(``test_a_deposed_lease_holders_writer_appends_nothing`` on every backend,
and ``test_a_writer_stopped_past_a_takeover_cannot_change_the_stream_when_resumed``
with a real process and SIGSTOP on files).
"""

from __future__ import annotations

import json
import signal
import threading
import time
import uuid
from collections import Counter
from pathlib import Path

import pytest

from messagevault.client import Client
from messagevault.storage import open_storage
from messagevault.storage.base import Storage
from tests.azurite import Azurite
from tests.cluster_load import (
    DirectAppend,
    DirectSender,
    message_value,
    node_logs,
    stream_values,
    wait_for,
)
from tests.cluster_nodes import Node, clear_leases, cluster_of, credentials

SENDERS = 8  # threads keeping appends in flight to the writer while it is stopped
AFTER_RESUME = 5  # appends sent to the resumed writer, one after another
# On files a writer stopped in the middle of a write holds its lease file's
# shared flock, and no node can take the lease (which needs it exclusively)
# until it resumes: the pause is then tried again, at another moment.
STOP_ATTEMPTS = 3
# Answers that say a batch was not committed (it never reached storage).
REFUSED = frozenset({"not_writer", "committer_closed", "no_writer"})
# Answers of a deposed writer that may leave the batch in storage (a takeover
# rolls forward over frames written past the checkpoint): in doubt.
FENCED = frozenset({"stale_writer"})


def _stopped_writing(node: Node, stream: str) -> list[str]:
    """The reasons ``node``'s log gives for having stopped writing ``stream``."""
    entries = [
        json.loads(line)
        for line in node.log.read_text(errors="replace").splitlines()
        if '"stopped writing stream"' in line
    ]
    return [e["reason"] for e in entries if e.get("stream") == stream and e.get("reason")]


def _send_in_background(append: DirectAppend, stream: str, timeout: float) -> threading.Thread:
    thread = threading.Thread(
        target=append.send, args=(stream, credentials(), timeout), daemon=True
    )
    thread.start()
    return thread


def _occurrences(values: list[bytes], append: DirectAppend) -> list[int]:
    """Where ``append``'s batch starts in ``values``, once per whole copy; [] if absent.

    A part of the batch found alone (not its whole run) counts as a copy at -1.
    """
    first = message_value(append.tag, 0)
    run = [message_value(append.tag, n) for n in range(append.count)]
    starts = [i for i, value in enumerate(values) if value == first]
    copies = [i if values[i : i + append.count] == run else -1 for i in starts]
    strays = sum(value in run for value in values) - append.count * len(starts)
    return copies + [-1] * max(strays, 0)


def _judge_stream(
    values: list[bytes], appends: list[DirectAppend], senders: list[DirectSender]
) -> list[str]:
    """Faults of the stream after the pause: [] when it holds exactly what it may."""
    faults = []
    known = {message_value(a.tag, n) for a in appends for n in range(a.count)}
    foreign = [value for value in values if value not in known]
    if foreign:
        faults.append(f"{len(foreign)} messages nobody sent: {foreign[:5]}")
    for append in appends:
        copies = _occurrences(values, append)
        if append.acknowledged and (len(copies) != 1 or -1 in copies):
            faults.append(f"acknowledged {append.tag} is there {len(copies)} times: {copies}")
        elif append.code in REFUSED and copies:
            faults.append(f"{append.tag} was refused ({append.code}) but is in the stream")
        elif len(copies) > 1 or -1 in copies:
            faults.append(f"{append.tag} ({append.code or append.failure}) is there as {copies}")
    for sender in senders:  # one sender's acknowledged batches, in the order it sent them
        found = [_occurrences(values, a) for a in sender.sent if a.acknowledged]
        starts = [copies[0] for copies in found if copies]  # the missing ones: faults above
        if starts != sorted(starts):
            faults.append(f"sender {sender.tag}'s acknowledged batches are out of order")
    return faults


def _until_taken(
    writer: Node,
    others: list[Node],
    stream: str,
    sent: list[tuple[DirectAppend, threading.Thread]],
    timeout: float,
    hang: float,
) -> DirectAppend | None:
    """Append through ``others`` (added to ``sent``) until one is acknowledged by a new writer."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        node = others[len(sent) % len(others)]
        append = DirectAppend(f"o{len(sent)}", 2, uuid.uuid4().bytes, node.url)
        sent.append((append, _send_in_background(append, stream, hang)))
        time.sleep(0.3)
        for append, _ in sent:
            if append.acknowledged and append.writer and append.writer != writer.url:
                return append
    return None


def _fencing(url: str, storage: Storage, root: Path, lease_duration: float) -> None:
    stream = f"fence-{uuid.uuid4().hex[:8]}"
    move_timeout = 3 * lease_duration + 10  # expiry, the others noticing, taking
    hang = move_timeout + 60  # a request to the stopped writer waits this long at most
    user, password = credentials()
    appends: list[DirectAppend] = []
    with cluster_of(3, root, storage=url, lease_duration=lease_duration) as cluster:
        first = DirectAppend("setup", 1, uuid.uuid4().bytes, cluster.urls[0])
        appends.append(first.send(stream, credentials(), 30))
        assert first.acknowledged, f"{first}\n{node_logs(cluster)}"
        writer: Node = wait_for(lambda: cluster.writer_of(stream), 10, what="the writer")
        others = [node for node in cluster.nodes if node is not writer]

        stop = threading.Event()
        senders = [
            DirectSender(f"w{i}", writer.url, stream, credentials(), stop, timeout=hang)
            for i in range(SENDERS)
        ]
        for sender in senders:
            sender.start()
        wait_for(
            lambda: all(any(a.acknowledged for a in s.sent) for s in senders),
            10,
            what="the writer acknowledging every sender",
        )
        # A producer whose batches go to W, then to the new writer, then to W
        # again: W, resumed, has not seen the middle one, and must not judge
        # the last by its own stale table (409 sequence_gap) but step aside.
        producer = uuid.uuid4().bytes
        appends.append(DirectAppend("seq0", 2, producer, writer.url, 0))
        assert appends[-1].send(stream, credentials(), 30).acknowledged, appends[-1]

        # Through the others, until one of them acknowledges: the lease moved.
        through_others: list[tuple[DirectAppend, threading.Thread]] = []
        taker: DirectAppend | None = None
        pauses = 0
        for pauses in range(1, STOP_ATTEMPTS + 1):  # noqa: B007 - printed below
            writer.signal(signal.SIGSTOP)
            stopped_at = time.monotonic()
            try:
                taker = _until_taken(writer, others, stream, through_others, move_timeout, hang)
                if taker is not None:
                    new_writer = cluster.by_url(taker.writer or "")
                    appends.append(DirectAppend("seq1", 2, producer, new_writer.url, 1))
                    assert appends[-1].send(stream, credentials(), 30).acknowledged, appends[-1]
            finally:
                writer.signal(signal.SIGCONT)
            if taker is not None:
                break
            # Stopped inside a write, W holds its lease file's flock: no node
            # can take the lease until it resumes (see STOP_ATTEMPTS).
            time.sleep(0.5)
        assert taker is not None, (
            f"the lease did not move in {STOP_ATTEMPTS} pauses of {move_timeout:g} s: "
            f"{sorted({a.detail for a, _ in through_others if a.detail})}\n{node_logs(cluster)}"
        )
        resumed_at = time.monotonic()

        after = [DirectAppend("seq2", 2, producer, writer.url, 2).send(stream, credentials(), 30)]
        after += [
            DirectAppend(f"after{i}", 2, uuid.uuid4().bytes, writer.url).send(
                stream, credentials(), 30
            )
            for i in range(AFTER_RESUME)
        ]
        time.sleep(0.5)  # the senders' next appends, after the resume, too
        stop.set()
        for sender in senders:
            sender.join(timeout=hang)
        for _, thread in through_others:
            thread.join(timeout=hang)
        assert not any(s.is_alive() for s in senders), "a sender hangs"
        assert not any(t.is_alive() for _, t in through_others), "an append hangs"

        to_writer = [a for s in senders for a in s.sent] + after
        appends += to_writer + [a for a, _ in through_others]
        logs = node_logs(cluster)
        print(
            f"\n{writer.node_id} stopped {resumed_at - stopped_at:.1f} s (pause {pauses}); "
            f"{new_writer.node_id} took over at {taker.position}; answers: "
            + ", ".join(
                f"{where} {code}: {n}"
                for (where, code), n in sorted(
                    Counter(
                        (
                            "to writer" if a in to_writer else "to others",
                            a.code
                            or a.failure
                            or f"ok by {cluster.by_url(a.writer or '').node_id}",
                        )
                        for a in appends
                    ).items()
                )
            )
        )
        # Answers W gave itself after the pause: only for batches it committed
        # before it (their answers were on the way), below the new writer's first.
        assert taker.position is not None
        late_own = [
            a
            for a in to_writer
            if a.acknowledged and a.writer == writer.url and (a.answered_at or 0) > stopped_at
        ]
        assert all(a.position is not None and a.position < taker.position for a in late_own), (
            f"the resumed writer committed {[(a.tag, a.position) for a in late_own]} "
            f"after {new_writer.node_id} took over at {taker.position}\n{logs}"
        )
        # Every append sent to W after the resume failed or went to the new writer.
        for append in [a for a in to_writer if a.sent_at > resumed_at]:
            assert append.code in REFUSED | FENCED or (
                append.acknowledged and append.writer == new_writer.url
            ), f"{append} after the resume\n{logs}"
        # Every append got an answer, and no other answer than these (no 500).
        unexpected = [
            (a.tag, a.url, a.status, a.code, a.failure)
            for a in appends
            if not a.acknowledged and a.code not in REFUSED | FENCED
        ]
        assert not unexpected, f"{unexpected}\n{logs}"
        wait_for(  # the node writes its log lines from a queue, a moment later
            lambda: _stopped_writing(writer, stream), 10, what=f"W's log saying so\n{logs}"
        )

        acknowledged = {a.tag for a in appends if a.acknowledged}
        wait_for(  # a direct reader sees Azure's checkpoint a little after the ack
            lambda: (
                acknowledged
                <= {v.decode().rpartition("/")[0] for v in stream_values(storage, stream)}
            ),
            15,
            what="every acknowledged batch in storage",
        )
        faults = _judge_stream(stream_values(storage, stream), appends, senders)
        assert not faults, "\n".join([*faults, logs])

        # Each batch not acknowledged, again until it is: then each is there once.
        with Client(
            ",".join(cluster.urls), user=user, password=password, retry_timeout=60
        ) as client:
            for append in appends:
                if not append.acknowledged:
                    client.publish_batch(stream, append.batch)
        for node in cluster.nodes:
            node.stop()
    values = stream_values(storage, stream)
    counts = {a.tag: _occurrences(values, a) for a in appends}
    wrong = {tag: copies for tag, copies in counts.items() if len(copies) != 1 or -1 in copies}
    assert not wrong, wrong
    assert len(values) == sum(a.count for a in appends)


@pytest.mark.slow
def test_a_stopped_writer_resumed_after_a_takeover_changes_nothing_on_files(
    tmp_path: Path,
) -> None:
    root = tmp_path / "data"
    _fencing(f"file:{root}", open_storage(f"file:{root}"), tmp_path, lease_duration=2)


@pytest.mark.slow
def test_a_stopped_writer_resumed_after_a_takeover_changes_nothing_on_azurite(
    azurite: Azurite, azure_storage: Storage, tmp_path: Path
) -> None:
    clear_leases(azure_storage)
    try:
        _fencing(f"azure:{azurite.connection_string}", azure_storage, tmp_path, lease_duration=15)
    finally:
        clear_leases(azure_storage)


def test_a_writer_deposed_unawares_answers_a_producers_next_batch_retriably(
    tmp_path: Path,
) -> None:
    """A writer that lost its lease and has not noticed yet must not judge by its stale state.

    Another node takes the stream while the writer W is alive (as after a
    fault that made W look dead to the others), and commits a producer's
    batch 1; the producer's batch 2 then reaches W, whose producer table
    still says batch 0 came last. A ``sequence_gap`` (409, not retriable)
    from W would stop an exactly-once producer for good although nothing is
    wrong: W must fail the batch retriably or forward it to the new writer.
    """
    root = tmp_path / "data"
    storage = open_storage(f"file:{root}")
    stream = f"fence-{uuid.uuid4().hex[:8]}"
    producer = uuid.uuid4().bytes
    with cluster_of(3, tmp_path, storage=f"file:{root}", lease_duration=60) as cluster:
        seq0 = DirectAppend("seq0", 2, producer, cluster.urls[0], 0).send(stream, credentials(), 30)
        assert seq0.acknowledged and seq0.writer, seq0
        writer = cluster.by_url(seq0.writer)
        # Not the node seq0 went through: that one trusts its record of the
        # lease (W's) for a second, and would forward seq1 to W, telling it.
        entry = cluster.by_url(cluster.urls[0])
        other = next(node for node in cluster.nodes if node not in (writer, entry))
        leases = storage.leases()  # type: ignore[attr-defined]
        leases.break_(f"streams/{stream}")
        leases.acquire(
            f"streams/{stream}", holder=other.node_id, address=other.url, duration=60
        )  # the other node's by name: it takes it over at its next append
        seq1 = DirectAppend("seq1", 2, producer, other.url, 1).send(stream, credentials(), 30)
        assert seq1.acknowledged and seq1.writer == other.url, f"{seq1}\n{node_logs(cluster)}"
        seq2 = DirectAppend("seq2", 2, producer, writer.url, 2).send(stream, credentials(), 30)
        assert (seq2.acknowledged and seq2.writer == other.url) or seq2.code in REFUSED | FENCED, (
            f"{seq2}\n{node_logs(cluster)}"
        )
        if not seq2.acknowledged:
            user, password = credentials()
            with Client(",".join(cluster.urls), user=user, password=password) as client:
                client.publish_batch(stream, seq2.batch)
    values = stream_values(storage, stream)
    assert values == [message_value(f"seq{n}", i) for n in range(3) for i in range(2)]
