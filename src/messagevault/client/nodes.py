"""Several server nodes behind one client: which node a request goes to, and each stream's writer.

Nodes that share one storage each accept any request (docs/client.md:
several nodes). A client is given their URLs (``Client("http://a:8080,
http://b:8080")``, a list, ``MESSAGEVAULT_URL`` or a profile) and sends each
request to one of them:

* It starts at a random node and stays on it while it answers: its
  keep-alive connections stay warm (one pool in use, one TLS handshake per
  connection rather than one per node), and many clients that each start
  at random spread over the nodes. Round-robin would spread a single
  client's requests too, but that buys little where appends go to the
  stream's writer anyway (below) and reads come from the shared storage.
* A node that refuses a connection (nothing was sent) is passed over for
  ``DOWN_FOR`` seconds by every request of the client, and the request goes
  to the next node at once; only when every node of a round refused does
  the round count as one failed try of the request's retries. One node is
  then exactly the single-server client of before.
* Any other failure (a lost connection, a retriable answer) is retried, when
  the request's rules allow, on the next node, after the usual backoff.
* Answers to appends name the stream's writer (``X-MessageVault-Writer``);
  when that is one of the configured nodes, the stream's next appends go to
  it first, which saves the forwarding hop. A writer URL the user did not
  configure is ignored: a server's answer never sends the user's
  credentials anywhere else. A writer that fails is forgotten.

Nothing here does I/O; ``Nodes`` is safe to share between threads.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final
from urllib.parse import urlsplit, urlunsplit

from messagevault.errors import InvalidInput
from messagevault.wire import WRITER_HEADER as WRITER_HEADER  # noqa: PLC0414 - where it was

# Seconds a node that refused a connection is passed over: long enough that
# a dead node costs one refusal per client now and then, short enough that
# a restarted node gets its share back soon.
DOWN_FOR: Final = 2.0
# Streams whose writer a client remembers; the oldest are forgotten first.
MAX_WRITERS: Final = 10_000


@dataclass(frozen=True)
class Node:
    """One server node's address: what is compared when a writer URL is matched."""

    scheme: str
    host: str  # lower case, IPv6 without brackets
    port: int
    prefix: str  # path of the server under its host, "" at the root

    @property
    def origin(self) -> str:
        """Scheme, host and port."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"

    @property
    def url(self) -> str:
        """The node's base URL, without credentials."""
        return self.origin + self.prefix


@dataclass(frozen=True)
class ParsedUrls:
    nodes: tuple[Node, ...]
    # The user info of a lone URL (several URLs may not carry any).
    user: str | None = None
    password: str | None = None


def parse_urls(urls: str | Sequence[str]) -> ParsedUrls:
    """The nodes of a comma-separated URL list, or of a list of URLs (commas split there too).

    Every entry must be http(s)://HOST[:PORT][/PREFIX]; all must share one
    scheme (a cluster half behind TLS is a mistake that would send a
    password in clear), no node may be listed twice, and with several nodes
    no URL may carry credentials: the same user and password go to every
    node, so they are given once (``user=``/``password=``, the environment
    or a profile).
    """
    items = [urls] if isinstance(urls, str) else list(urls)
    for item in items:
        if not isinstance(item, str):
            raise InvalidInput(f"server URLs must be strings, not {type(item).__name__}")
    entries = [entry.strip() for item in items for entry in item.split(",")]
    if not entries:
        raise InvalidInput("the list of server URLs is empty")
    if "" in entries:
        raise InvalidInput(
            f"the server URL list {_shown(','.join(entries))!r} has an empty entry "
            "(URLs are separated by single commas)"
        )
    parsed = [_parse(entry) for entry in entries]
    nodes = tuple(node for node, _, _ in parsed)
    if len(nodes) == 1:
        return ParsedUrls(nodes, parsed[0][1], parsed[0][2])
    for entry, (_, user, password) in zip(entries, parsed, strict=True):
        if user is not None or password is not None:
            raise InvalidInput(
                f"server URL {_shown(entry)!r} holds credentials: with several nodes give "
                "the user and password once (user=/password=, MESSAGEVAULT_USER/"
                "MESSAGEVAULT_PASSWORD or a profile); they go to every node"
            )
    schemes = sorted({node.scheme for node in nodes})
    if len(schemes) > 1:
        raise InvalidInput(
            f"server nodes must all use one scheme, not {' and '.join(schemes)}: "
            f"{', '.join(node.url for node in nodes)}"
        )
    for index, node in enumerate(nodes):
        if node in nodes[:index]:
            raise InvalidInput(f"server node {node.url} is listed twice")
    return ParsedUrls(nodes)


def _parse(url: str) -> tuple[Node, str | None, str | None]:
    try:
        parts = urlsplit(url)
        parts.hostname  # noqa: B018 - parsing it is the check ("http://[::1" fails here)
    except ValueError as exc:
        raise InvalidInput(f"server URL {_shown(url)!r} cannot be parsed: {exc}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InvalidInput(
            f"server URL must be http://HOST[:PORT] or https://..., not {_shown(url)!r}"
        )
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise InvalidInput(f"server URL {_shown(url)!r} has a bad port") from None
    node = Node(parts.scheme, parts.hostname.lower(), port, parts.path.rstrip("/"))
    return node, parts.username, parts.password


def _shown(url: str) -> str:
    """``url`` with its password, if it has one, masked: for messages."""
    try:
        parts = urlsplit(url)
        if parts.password is None:
            return url
    except ValueError:
        return url.rsplit("@", maxsplit=1)[-1]
    host = parts.netloc.rpartition("@")[2]
    masked = f"{parts.username or ''}:***@{host}"
    return urlunsplit((parts.scheme, masked, parts.path, parts.query, parts.fragment))


def nodes_within(urls: str | Sequence[str], known: str) -> bool:
    """Whether every node ``urls`` names is one of ``known``'s (unparsable lists: never).

    Credentials saved for ``known`` (a profile's) may go to those nodes only.
    """
    try:
        return set(parse_urls(urls).nodes) <= set(parse_urls(known).nodes)
    except InvalidInput:
        return False


def _start(count: int) -> int:
    """The node a new client starts at."""
    return random.randrange(count)  # noqa: S311 - spreading load, not a secret


class Nodes:
    """The client's nodes, the one its requests go to, those refusing, and streams' writers."""

    def __init__(self, nodes: Sequence[Node], *, down_for: float = DOWN_FOR) -> None:
        if not nodes:
            raise ValueError("no nodes")
        self.nodes = tuple(nodes)
        self._down_for = down_for
        self._lock = threading.Lock()
        self._current = _start(len(self.nodes))
        self._down_until = [0.0] * len(self.nodes)
        self._writers: dict[str, int] = {}

    def route(self, stream: str | None = None) -> Route:
        """A new request's way: to ``stream``'s known writer, else to the client's node."""
        with self._lock:
            writer = self._writers.get(stream) if stream is not None else None
            if writer is not None and not self._is_down(writer, time.monotonic()):
                return Route(self, stream, writer, hinted=True)
            return Route(self, stream, self._next_up(self._current, include=True), hinted=False)

    def writer(self, stream: str) -> Node | None:
        """The node ``stream``'s appends go to first, if one is known."""
        with self._lock:
            index = self._writers.get(stream)
        return None if index is None else self.nodes[index]

    def match(self, url: str) -> int | None:
        """The index of the configured node ``url`` names, else None (credentials in it: None)."""
        try:
            node, user, password = _parse(url.strip())
        except InvalidInput:
            return None
        if user is not None or password is not None:
            return None
        try:
            return self.nodes.index(node)
        except ValueError:
            return None

    # For ``Route``, under the lock -----------------------------------------------------

    def _is_down(self, index: int, now: float) -> bool:
        return self._down_until[index] > now

    def _next_up(self, index: int, *, include: bool) -> int:
        """The first node from ``index`` on (or after it) not passed over; all are: the next."""
        count = len(self.nodes)
        now = time.monotonic()
        start = 0 if include else 1
        for step in range(start, start + count):
            candidate = (index + step) % count
            if not self._is_down(candidate, now):
                return candidate
        return (index + start) % count

    def _refused(self, index: int, stream: str | None) -> None:
        with self._lock:
            self._down_until[index] = time.monotonic() + self._down_for
            self._forget(stream, index)

    def _forget(self, stream: str | None, index: int) -> None:
        if stream is not None and self._writers.get(stream) == index:
            del self._writers[stream]

    def _answered(self, index: int, hinted: bool, stream: str | None, writer: str | None) -> None:
        learned = None if writer is None or stream is None else self.match(writer)
        with self._lock:
            self._down_until[index] = 0.0
            if not hinted:
                self._current = index
            if stream is None or writer is None:
                return
            self._writers.pop(stream, None)  # re-inserted last: the most recently used
            if learned is not None:
                self._writers[stream] = learned
                if len(self._writers) > MAX_WRITERS:
                    del self._writers[next(iter(self._writers))]


class Route:
    """One request's way through the nodes: where to try now, and where next after a failure.

    A round tries each node at most once while they refuse connections;
    ``refused`` says whether a node of the round is left to try.
    """

    def __init__(self, nodes: Nodes, stream: str | None, index: int, *, hinted: bool) -> None:
        self._nodes = nodes
        self._stream = stream
        self._index = index
        self._hinted = hinted
        self._tried: list[int] = []
        self.refusals: list[tuple[Node, BaseException]] = []  # this round's, in order

    @property
    def node(self) -> Node:
        """The node to try now."""
        return self._nodes.nodes[self._index]

    def refused(self, failure: BaseException) -> bool:
        """The node could not be connected to: True, and ``node`` is the next one, if any is left.

        Nodes passed over (refused lately) come last in a round, so that a
        request fails only once every node has been tried.
        """
        nodes = self._nodes
        nodes._refused(self._index, self._stream)
        self._tried.append(self._index)
        self.refusals.append((self.node, failure))
        self._hinted = False
        count = len(nodes.nodes)
        now = time.monotonic()
        untried = [
            (self._index + step) % count
            for step in range(1, count)
            if (self._index + step) % count not in self._tried
        ]
        if not untried:
            return False
        with nodes._lock:
            up = [index for index in untried if not nodes._is_down(index, now)]
        self._index = (up or untried)[0]
        return True

    def retry(self, *, refused: bool) -> None:
        """Go on to the request's next try, after a failure and its backoff.

        ``refused``: every node of the round refused, and all are tried
        again, the client's node first. Otherwise the try may have reached
        its node, and the retry goes to another node; a writer that failed
        is forgotten, the retry going the ordinary way.
        """
        nodes = self._nodes
        if refused:
            with nodes._lock:
                self._index = nodes._next_up(nodes._current, include=True)
            self._tried = []
            self.refusals = []
            return
        with nodes._lock:
            if self._hinted:
                nodes._forget(self._stream, self._index)
                following = nodes._next_up(nodes._current, include=True)
                if following == self._index:
                    following = nodes._next_up(self._index, include=False)
            else:
                following = nodes._next_up(self._index, include=False)
        self._index = following
        self._hinted = False
        self._tried = []
        self.refusals = []

    def answered(self, writer: str | None) -> None:
        """The node answered; ``writer``: the append answer's ``X-MessageVault-Writer``."""
        self._nodes._answered(self._index, self._hinted, self._stream, writer)
