"""The HTTP API (aiohttp): append, read, stream info, health, metrics, OpenAPI.

Errors are JSON, one shape everywhere: ``{"error": code, "detail": text}``
with ``code`` the stable ``MessageVaultError.code`` (or an HTTP-level one
such as ``unsupported_media_type``). docs/HTTP.md describes every route.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Final

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from messagevault.errors import (
    AccessDenied,
    CommitterClosed,
    CorruptData,
    InvalidInput,
    InvalidPosition,
    MessageVaultError,
    NotReady,
    NotWriter,
    NoWriter,
    Overloaded,
    PositionTrimmed,
    SequenceGap,
    StaleSequence,
    StorageError,
    StreamNotFound,
    UnsupportedMediaType,
    WriterConflict,
    WriterUnreachable,
)
from messagevault.format import EncodedBatch, parse_batch, read_header
from messagevault.names import validate_stream_name
from messagevault.server.auth import Authenticator, Forbidden, Principal, Unauthenticated
from messagevault.server.cluster import NODE_HEADER, ON_BEHALF_HEADER, Cluster
from messagevault.server.hub import StreamHub
from messagevault.server.logs import REQUEST_ID, request_id
from messagevault.server.metrics import DEFAULT_MAX_STREAM_SERIES, Metrics
from messagevault.server.openapi import openapi_document
from messagevault.server.retention_task import (
    RetentionSettings,
    RetentionTask,
    delete_stream_policy,
    retention_answer,
    set_stream_policy,
)
from messagevault.server.served import RequestObserver as RequestObserver  # noqa: PLC0414
from messagevault.server.served import Served as Served  # noqa: PLC0414
from messagevault.server.tls import refuse_plain_basic
from messagevault.server.viewer import add_viewer_routes, is_viewer_path
from messagevault.times import parse_time
from messagevault.wire import (
    BATCH_CONTENT_TYPE,
    DEFAULT_MAX_BODY,
    DUPLICATE_HEADER,
    EVENT_STREAM,
    JSON,
    NDJSON,
    POSITION_HEADER,
    WRITER_HEADER,
    Records,
    StreamInfo,
    appended_json,
    appended_minimal,
    error_body,
    iso_time,
    json_append,
    parse_json,
    read_answer_json,
    record_json,
    records_ndjson_of,
    records_of_frames,
    records_of_messages,
)

log = logging.getLogger("messagevault.server")


MAX_WAIT_ASKED = 3600  # seconds: a larger ``wait`` is a mistake, whatever the server holds


@dataclass(frozen=True)
class Limits:
    max_body: int = DEFAULT_MAX_BODY  # bytes of one request body: values of any size need room
    max_read_messages: int = 10_000  # per read request
    max_read_bytes: int = 8 * 1024 * 1024  # of values, per read request
    max_wait: float = 60.0  # seconds of long-poll


@dataclass
class _Notes:
    """What a handler tells the middleware about its request, for ``Served``."""

    kind: str = ""
    messages: int | None = None
    sent: int | None = None  # body bytes of a streamed answer


HUB = web.AppKey("hub", StreamHub)
RETENTION = web.AppKey("retention", RetentionTask)
CLUSTER = web.AppKey("cluster", Cluster)
AUTH = web.AppKey("auth", Authenticator)
PUBLIC_PATHS = frozenset({"/health", "/ready", "/metrics", "/openapi.json"})
METRICS = web.AppKey("metrics", Metrics)
# Called after every request, on the event loop: must be quick (no I/O).
REQUEST_OBSERVERS = web.AppKey("request_observers", list[RequestObserver])
LIMITS = web.AppKey("limits", Limits)
VERIFYING = web.AppKey("verifying", dict[str | None, "asyncio.Future[Principal]"])
REQUEST_ID_KEY = web.RequestKey("request_id", str)
NOTES = web.RequestKey("notes", _Notes)
REQUEST_ID_HEADER = "X-Request-Id"

_STATUS = {  # the first class an error is an instance of decides
    UnsupportedMediaType: 415,  # before InvalidInput, its base
    Unauthenticated: 401,
    Forbidden: 403,
    PositionTrimmed: 410,  # before InvalidPosition, its base: those messages are gone for good
    InvalidPosition: 400,
    InvalidInput: 400,
    CorruptData: 400,  # on the request path, corrupt bytes are a bad request body
    AccessDenied: 403,
    StreamNotFound: 404,
    WriterConflict: 409,
    Overloaded: 503,
    StorageError: 503,
    # Retriable: the append never reached storage (queued behind a commit
    # that found the stream taken over, or the server is shutting down).
    CommitterClosed: 503,
    NoWriter: 503,
    NotWriter: 503,
    # A gateway's answer: the writer may have acted (the client's retry rules know 502).
    WriterUnreachable: 502,
}


def _status_for(exc: MessageVaultError) -> int:
    for cls, status in _STATUS.items():
        if isinstance(exc, cls):
            return status
    return 500


def error_response(
    status: int, code: str, detail: str, fields: dict[str, object] | None = None
) -> web.Response:
    return web.Response(body=error_body(code, detail, fields), status=status, content_type=JSON)


def _error_fields(exc: MessageVaultError) -> dict[str, object] | None:
    """What an error's JSON carries besides code and detail, for a client to act on."""
    if isinstance(exc, PositionTrimmed) and exc.first_position is not None:
        return {"first_position": exc.first_position}
    return None


@web.middleware
async def errors_and_metrics(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Map every failure to the JSON error shape; tell the observers of each answer.

    Each request gets its id here, for its answer's ``X-Request-Id`` and
    every log line written while it is handled.
    """
    route = (
        request.match_info.route.resource.canonical if request.match_info.route.resource else "?"
    )
    started = time.perf_counter()
    request[REQUEST_ID_KEY] = identity = request_id(request.headers.get(REQUEST_ID_HEADER))
    request[NOTES] = notes = _Notes()
    logged_as = REQUEST_ID.set(identity)
    metrics = request.app[METRICS]
    metrics.started(route)
    try:
        try:
            response, error = await _answer(request, handler, route)
        finally:
            metrics.finished(route)
        principal = request.get(PRINCIPAL)
        served = Served(
            method=request.method,
            route=route,
            stream=request.match_info.get("stream"),
            status=response.status,
            error=error,
            seconds=time.perf_counter() - started,
            request_id=identity,
            kind=notes.kind,
            path=request.path,
            request_bytes=_request_bytes(request),
            response_bytes=(
                response.content_length if isinstance(response, web.Response) else notes.sent
            ),
            messages=notes.messages,
            user=principal.name if principal is not None else None,
            remote=request.remote,
        )
        for observe in request.app[REQUEST_OBSERVERS]:
            try:
                observe(served)
            except Exception:  # the answer stands, and the other observers still hear of it
                log.exception("request observer failed", extra={"route": route})
    finally:
        REQUEST_ID.reset(logged_as)
    return response


def _request_bytes(request: web.Request) -> int:
    """The body's size: as received, or its Content-Length when it was answered before that.

    A request refused before its body was read (401, 413) would otherwise
    count as having none.
    """
    received = request.content.total_bytes
    declared = request.content_length
    if declared is None or request.content.is_eof():
        return received
    return max(received, declared)


async def _answer(
    request: web.Request,
    handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
    route: str,
) -> tuple[web.StreamResponse, str | None]:
    """The handler's answer, or the error answer of what it raised; and its error code."""
    error: str | None = None
    try:
        response = await handler(request)
    except MessageVaultError as exc:
        error = exc.code
        response = error_response(_status_for(exc), exc.code, str(exc), _error_fields(exc))
        if isinstance(exc, Unauthenticated):
            response.headers["WWW-Authenticate"] = 'Basic realm="messagevault"'
        elif exc.retriable and response.status == 503:
            # overloaded, committer_closed (a stream being reopened), storage_error
            response.headers["Retry-After"] = "1"

    except web.HTTPException as exc:
        error = exc.reason.lower().replace(" ", "_") if exc.reason else "http_error"
        response = error_response(exc.status, error, exc.text or exc.reason)
    except Exception:  # a bug: still answer in the documented shape, and say so in the log
        log.exception("unhandled error", extra={"route": route})
        error = "internal_error"
        response = error_response(500, error, "the server failed; see its log")
    return response, error


async def _tag_answer(request: web.Request, response: web.StreamResponse) -> None:
    """Every answer, errors and streams included, carries its request's id."""
    identity = request.get(REQUEST_ID_KEY)
    if identity is not None:
        response.headers[REQUEST_ID_HEADER] = identity


@web.middleware
async def authentication(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Every stream route needs a user; handlers then check that user's claims."""
    auth = request.app.get(AUTH)
    cluster = request.app.get(CLUSTER)
    if cluster is not None and cluster.is_node(request.headers.get("Authorization")):
        # Another node of the cluster, forwarding an append it authorised.
        user = request.headers.get(ON_BEHALF_HEADER, "?")
        node = request.headers.get(NODE_HEADER, "?")
        request[PRINCIPAL] = Principal(f"{user} via {node}", NODE_CLAIMS, node=True)
    elif auth is None:
        request[PRINCIPAL] = OPEN_ACCESS
    elif (
        request.path not in PUBLIC_PATHS
        and not is_viewer_path(request.path)
        and not is_preflight(request)
    ):
        header = request.headers.get("Authorization")
        if header is None and ANONYMOUS in request.app:
            # serve --allow-anonymous: no credentials at all get these claims;
            # wrong credentials are still refused below.
            request[PRINCIPAL] = request.app[ANONYMOUS]
            return await handler(request)
        refuse_plain_basic(request, header)
        principal = auth.known(header)
        if principal is None:
            principal = await _verify(request.app, auth, header)
        request[PRINCIPAL] = principal
    return await handler(request)


async def _verify(app: web.Application, auth: Authenticator, header: str | None) -> Principal:
    """``auth.authenticate`` in the I/O pool, once at a time for the same credentials.

    argon2 is slow on purpose (and the users file may need a re-read), so it
    runs off the event loop; and when many connections bring the same new
    credentials at once (a client pool starting, reconnecting after a
    restart), they share one verification instead of each paying for it.
    """
    in_flight = app[VERIFYING]
    verification = in_flight.get(header)
    if verification is None:
        verification = asyncio.ensure_future(app[HUB].run(auth.authenticate, header))
        in_flight[header] = verification

        def forget(done: asyncio.Future[Principal]) -> None:
            in_flight.pop(header, None)
            if not done.cancelled():
                done.exception()  # retrieved here too, in case every waiter went away

        verification.add_done_callback(forget)
    # shield: one waiter going away must not cancel the check the others wait for.
    return await asyncio.shield(verification)


PRINCIPAL = web.RequestKey("principal", Principal)
# serve --allow-anonymous: the principal of requests without an Authorization header.
ANONYMOUS = web.AppKey("anonymous", Principal)
OPEN_ACCESS = Principal("anonymous", frozenset({"admin"}))
# What a node's credentials allow: appends it forwards (and reads, which writing implies).
NODE_CLAIMS = frozenset({"all:write"})


def _require(request: web.Request, action: str, stream: str | None) -> None:
    principal: Principal = request[PRINCIPAL]
    if not principal.may(action, stream):
        target = f"stream {stream!r}" if stream else "streams"
        raise Forbidden(f"user {principal.name!r} may not {action} {target}")


def add_durable_stream_routes(app: web.Application) -> None:
    # Imported here: the protocol's module builds on this one's helpers.
    from messagevault.server.durable_streams import add_durable_stream_routes as add

    add(app)


def is_preflight(request: web.Request) -> bool:
    """A CORS preflight of a Durable Streams route (browsers send no credentials with one)."""
    return request.method == "OPTIONS" and request.path.startswith("/v1/stream/")


def create_app(  # noqa: PLR0915 - the routes, one statement each
    hub: StreamHub,
    limits: Limits | None = None,
    authenticator: Authenticator | None = None,
    *,
    max_stream_series: int = DEFAULT_MAX_STREAM_SERIES,
    cluster: Cluster | None = None,
    retention: RetentionSettings | None = None,
) -> web.Application:
    """The application. Without ``authenticator`` every request is allowed (embedding, tests).

    ``max_stream_series``: how many streams get series of their own in
    ``/metrics``; the others are counted together as ``stream="_other"``.
    ``cluster``: this server is one of several nodes (server/cluster.py),
    reached at ``cluster.address``; it joins as the app starts and leaves
    after the app's last commit.
    ``retention``: apply retention policies in the background, this often,
    with this default (server/retention_task.py); without it policies are
    kept and shown but not applied.
    """
    limits = limits or Limits()
    # client_max_size: aiohttp refuses a larger body with 413 before reading it all.
    app = web.Application(
        middlewares=[errors_and_metrics, authentication], client_max_size=limits.max_body
    )
    if authenticator is not None:
        app[AUTH] = authenticator
    app[HUB] = hub
    app[METRICS] = metrics = Metrics(hub, max_stream_series=max_stream_series, cluster=cluster)
    if cluster is not None:
        app[CLUSTER] = cluster
        hub.leases = cluster.held
        hub.writer_deposed = cluster.check

        async def join(app: web.Application) -> None:
            await cluster.start(cluster.address)

        app.on_startup.append(join)
    app[RETENTION] = RetentionTask(
        hub, retention or RetentionSettings(), trimmed=metrics.retention_trimmed
    )
    if retention is not None:

        async def start_retention(app: web.Application) -> None:
            app[RETENTION].start()

        app.on_startup.append(start_retention)
    hub.commit_observers.append(metrics.committed)
    observers: list[RequestObserver] = [metrics.observe]
    app[REQUEST_OBSERVERS] = observers
    app[LIMITS] = limits
    app[VERIFYING] = {}
    app.on_response_prepare.append(_tag_answer)
    app.router.add_post("/streams/{stream}", append)
    app.router.add_get("/streams", list_streams)
    app.router.add_get("/streams/{stream}", stream_info)
    app.router.add_get("/streams/{stream}/messages", read_messages)
    app.router.add_post("/streams/{stream}/trim", trim_stream)
    app.router.add_get("/health", health)
    app.router.add_get("/ready", ready)
    app.router.add_get("/metrics", metrics_route)
    app.router.add_get("/openapi.json", openapi)
    app.router.add_get("/cluster", cluster_route)
    app.router.add_delete("/streams/{stream}", delete_stream)
    app.router.add_get("/streams/{stream}/retention", get_retention)
    app.router.add_put("/streams/{stream}/retention", put_retention)
    app.router.add_delete("/streams/{stream}/retention", delete_retention)
    add_viewer_routes(app)
    add_durable_stream_routes(app)

    async def end_waits(app: web.Application) -> None:
        await app[RETENTION].stop()  # no trim starts once the server is stopping
        await app[HUB].stop_waiting()

    async def close_hub(app: web.Application) -> None:
        if CLUSTER in app:  # after the last commit, the streams move at once
            await app[HUB].close_writers()
            await app[CLUSTER].stop()
        await app[HUB].close()

    # on_shutdown runs before the server waits for open requests to finish:
    # long polls and tails end there; appends in flight finish, then
    # on_cleanup drains the committers.
    app.on_shutdown.append(end_waits)
    app.on_cleanup.append(close_hub)
    return app


def _stream(request: web.Request) -> str:
    return validate_stream_name(request.match_info["stream"])


async def append(request: web.Request) -> web.Response:
    stream = _stream(request)
    _require(request, "write", stream)
    if request.content_length is not None and request.content_length > request.app[LIMITS].max_body:
        raise web.HTTPRequestEntityTooLarge(
            max_size=request.app[LIMITS].max_body, actual_size=request.content_length
        )
    content_type = request.content_type
    check: Callable[[bytes], EncodedBatch]
    if content_type == BATCH_CONTENT_TYPE:
        # A compressed value may unpack to no more than an uncompressed
        # one could be sent as: what a reader will have to hold.
        check = functools.partial(parse_batch, max_value_size=request.app[LIMITS].max_body)
    elif content_type == JSON:
        check = json_append
    else:
        raise UnsupportedMediaType(f"send {BATCH_CONTENT_TYPE} or {JSON}, not {content_type!r}")
    body = await _body(request)
    hub = request.app[HUB]
    cluster = request.app.get(CLUSTER)
    if cluster is not None:
        relayed = await _forward_unless_writer(request, cluster, stream, body)
        if relayed is not None:
            return relayed
    # Checking a batch is a pass over all of it (CRCs, JSON, unpacking a
    # compressed value in pieces): a big one is checked in the I/O pool so
    # that it never stalls the other requests on the event loop.
    batch = check(body) if len(body) <= OFF_LOOP_BODY else await hub.run(check, body)
    try:
        result = await hub.append(stream, batch)
    except (SequenceGap, StaleSequence) as exc:  # decided from the writer's memory alone
        if cluster is not None and not await cluster.confirm(stream):
            raise NotWriter(
                f"this node no longer writes stream {stream!r}; send the append again"
            ) from exc
        raise
    notes = request[NOTES]
    headers = {}
    if cluster is not None:
        headers[WRITER_HEADER] = cluster.address
    if result.duplicate:
        # The same answer as the first time, so that a retry whose first
        # answer was lost reads it as if nothing had happened.
        notes.kind = "duplicate"
        headers[DUPLICATE_HEADER] = "true"
    notes.messages = 0 if result.duplicate else result.message_count
    if _prefers_minimal(request):
        headers["Preference-Applied"] = "return=minimal"
        return web.Response(
            body=appended_minimal(stream, result), content_type=JSON, headers=headers
        )
    return web.Response(body=appended_json(stream, result), content_type=JSON, headers=headers)


OFF_LOOP_BODY: Final = 1024 * 1024  # bytes of a request body checked on the event loop at most


async def _forward_unless_writer(
    request: web.Request, cluster: Cluster, stream: str, body: bytes
) -> web.Response | None:
    """Forward an append to its stream's writer and relay the answer; None if this node writes it.

    An append another node forwarded is never forwarded again: if this node
    does not write the stream (it moved on the way), ``NotWriter`` sends the
    forwarding node looking again.
    """
    principal: Principal = request[PRINCIPAL]
    address = await cluster.writer_for(stream, forwarded=principal.node)
    if address is None:
        return None
    if principal.node:
        raise NotWriter(f"this node does not write stream {stream!r}; its writer is at {address}")
    answer = await cluster.forward(stream, address, request, body, principal.name)
    if answer is None:  # this node became the writer meanwhile
        return None
    notes = request[NOTES]
    notes.kind = "forwarded"
    request.app[METRICS].forwarded(stream)
    return web.Response(status=answer.status, body=answer.body, headers=answer.headers)


async def _body(request: web.Request) -> bytes:
    """The whole request body; a client that hangs up before sending it all is no server error.

    Its append never arrived whole, so nothing was appended, and nobody is
    left to read the answer (a client that retries sends the batch again).
    """
    try:
        return await request.read()
    except ConnectionResetError:
        raise web.HTTPBadRequest(
            reason="Client Closed Request", text="the client hung up before its body arrived"
        ) from None


def _prefers_minimal(request: web.Request) -> bool:
    """``Prefer: return=minimal`` (RFC 7240); other preferences are ignored, as the RFC says."""
    return any(
        preference.strip().lower() == "return=minimal"
        for header in request.headers.getall("Prefer", ())
        for preference in header.split(",")
    )


async def list_streams(request: web.Request) -> web.Response:
    hub = request.app[HUB]
    streams = []
    for name in await hub.list_streams():
        if not request[PRINCIPAL].may("read", name):
            continue
        try:
            checkpoint = await hub.checkpoint(name)
        except StreamNotFound:
            # Listed, but not a stream yet (its checkpoint comes last: Azure,
            # another node creating it this moment) or not any more.
            continue
        streams.append(
            {
                "stream": name,
                "length": checkpoint.length,
                "messages": checkpoint.next_sequence,
                # Free here (the checkpoint holds it): the viewer's list shows it.
                "last_write": iso_time(checkpoint.last_timestamp) if checkpoint.length else None,
            }
        )
    return web.json_response({"streams": streams})


async def stream_info(request: web.Request) -> web.Response:
    stream = _stream(request)
    _require(request, "read", stream)
    hub = request.app[HUB]
    checkpoint = await hub.checkpoint(stream)
    length = checkpoint.length
    # The first *readable* message: a trimmed stream's starts past position 0.
    first = await hub.first_header(stream, checkpoint)
    info = StreamInfo.from_timestamps(
        stream,
        length,
        checkpoint.next_sequence,
        first_write=None if first is None else first.timestamp,
        last_write=checkpoint.last_timestamp if checkpoint.length else None,
        read_access=await hub.read_access(stream),
        first_position=checkpoint.first_position if first is None else first.base_position,
        first_sequence=checkpoint.next_sequence if first is None else first.base_sequence,
    )
    return web.json_response(info.to_json())


TRIM_TARGETS: Final = ("before_position", "before_sequence", "before_time")


async def _relayed_to_writer(
    request: web.Request, stream: str, body: bytes | None = None
) -> web.Response | None:
    """Another node's answer to this admin request, when that node writes ``stream``.

    None: this node is no cluster node, or writes the stream (taking it if
    nobody does). A forwarded request reaching a node that does not write
    the stream raises ``NotWriter``, as a forwarded append does.
    """
    cluster = request.app.get(CLUSTER)
    if cluster is None:
        return None
    principal: Principal = request[PRINCIPAL]
    address = await cluster.writer_for(stream, forwarded=principal.node)
    if address is None:
        return None
    if principal.node:
        raise NotWriter(f"this node does not write {stream!r}; its writer is at {address}")
    answer = await cluster.relay(address, request.method, request.path, principal.name, body=body)
    request[NOTES].kind = "forwarded"
    return web.Response(status=answer.status, body=answer.body, headers=answer.headers)


async def trim_stream(request: web.Request) -> web.Response:
    """``POST /streams/{stream}/trim`` (admin): release the messages before a point.

    The body is ``{"before_position": P}``, ``{"before_sequence": N}`` or
    ``{"before_time": T}`` (ISO 8601 with a zone, or ms since the epoch).
    Done by the stream's writer: another node's request is forwarded there,
    as an append is.
    """
    stream = _stream(request)
    _require_admin(request, f"trim stream {stream!r}")
    if request.content_type != JSON:
        raise UnsupportedMediaType(f"send the trim as {JSON}, not {request.content_type!r}")
    body = await _body(request)
    target = _trim_target(body)
    hub = request.app[HUB]
    await hub.checkpoint(stream)  # 404 for no such stream, before any lease is taken
    if (relayed := await _relayed_to_writer(request, stream, body)) is not None:
        return relayed
    result = await hub.trim(stream, target.position, sequence=target.sequence, time=target.time)
    return web.json_response(
        {
            "stream": stream,
            "first_position": result.first_position,
            "first_sequence": result.first_sequence,
            "released_bytes": result.released_bytes,
            "trimmed": result.trimmed,
        }
    )


@dataclass(frozen=True)
class _TrimTarget:
    """The one point a trim request names (the others None)."""

    position: int | None = None
    sequence: int | None = None
    time: datetime | float | None = None


def _trim_target(body: bytes) -> _TrimTarget:
    """The point a trim request body names; ``InvalidInput`` for anything else."""
    try:
        document = parse_json(body)
    except ValueError as exc:
        raise InvalidInput(f"the trim request is not JSON: {exc}") from None
    if not isinstance(document, dict):
        raise InvalidInput(f"the trim request must be a JSON object with one of {TRIM_TARGETS}")
    unknown = sorted(set(document) - set(TRIM_TARGETS))
    given = [name for name in TRIM_TARGETS if name in document]
    if unknown or len(given) != 1:
        problem = f"unknown field {unknown[0]!r}" if unknown else f"{len(given)} given"
        raise InvalidInput(f"a trim takes exactly one of {', '.join(TRIM_TARGETS)} ({problem})")
    name = given[0]
    value = document[name]
    if name == "before_time":
        if isinstance(value, bool) or not isinstance(value, str | int):
            raise InvalidInput(
                f"'before_time' must be an ISO 8601 time with a zone or ms since the epoch, "
                f"not {value!r}"
            )
        try:
            return _TrimTarget(time=parse_time(str(value)))
        except ValueError as exc:
            raise InvalidInput(f"'before_time': {exc}") from None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_POSITION:
        raise InvalidInput(f"{name!r} must be an integer from 0 to {MAX_POSITION}, not {value!r}")
    if name == "before_position":
        return _TrimTarget(position=value)
    return _TrimTarget(sequence=value)


def _int_param(request: web.Request, name: str, default: int, low: int, high: int) -> int:
    raw = request.query.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise InvalidInput(f"query parameter {name!r} must be an integer, not {raw!r}") from None
    if not low <= value <= high:
        raise InvalidInput(f"query parameter {name!r} must be within {low}..{high}")
    return value


async def read_messages(request: web.Request) -> web.StreamResponse:
    stream = _stream(request)
    _require(request, "read", stream)
    limits = request.app[LIMITS]
    hub = request.app[HUB]
    start = _read_start(request)
    # Without a limit, a page of 1,000, or fewer where this server allows fewer.
    default_limit = min(1000, limits.max_read_messages)
    limit = _int_param(request, "limit", default_limit, 0, limits.max_read_messages)
    # A longer wait than this server holds a request for is shortened, not
    # refused: a client cannot know every server's --max-wait.
    wait = min(_int_param(request, "wait", 0, 0, MAX_WAIT_ASKED), int(limits.max_wait))
    accept = request.headers.get("Accept", "")
    notes = request[NOTES]
    notes.kind = "read"
    if EVENT_STREAM in accept:
        if not limit:
            raise InvalidInput(
                "limit=0 reads no messages: a Server-Sent-Events tail needs 1 or more"
            )
        notes.kind = "tail"
        return await _server_sent_events(request, stream, start, limit)
    position = start if isinstance(start, int) else await _seek(hub, stream, start)
    if not limit:
        # No messages: where the read would start (a seek), at once.
        if isinstance(start, int):
            await hub.check_position(stream, position)
        records: Records = []
        next_position = position
        if BATCH_CONTENT_TYPE in accept:
            return _frames_answer(b"", 0, position, position)
    elif BATCH_CONTENT_TYPE in accept:
        # The bulk path: up to 8 MiB of frames unless a limit is asked for.
        frames_limit = limit if "limit" in request.query else None
        return await _binary_frames(request, stream, position, frames_limit, wait)
    else:
        records, next_position = await _records_page(
            hub, stream, position, limit, limits.max_read_bytes
        )
        if not records and wait:
            notes.kind = "long_poll"
            await hub.wait_for_commit(stream, position, wait, gone=_gone(request))
            records, next_position = await _records_page(
                hub, stream, position, limit, limits.max_read_bytes
            )
    if NDJSON in accept:
        return web.Response(
            body=records_ndjson_of(records),
            content_type=NDJSON,
            charset="utf-8",
            headers={"X-Next": str(next_position), POSITION_HEADER: str(position)},
        )
    body = read_answer_json(stream, records, next_position)
    return web.Response(
        body=body, content_type=JSON, charset="utf-8", headers={POSITION_HEADER: str(position)}
    )


READ_STARTS: Final = ("from", "from_sequence", "from_time")
MAX_POSITION: Final = 2**63 - 1


@dataclass(frozen=True)
class _Seek:
    """A read's start found by seeking: message ``sequence``, the first at ``time``, or the end."""

    sequence: int | None = None
    time: datetime | float | None = None


def _read_start(request: web.Request) -> int | _Seek:
    """Where a read starts: a position as given, or what to seek (checked, not yet sought)."""
    query = request.query
    if "from_sequence" not in query and "from_time" not in query:  # a position: the hot path
        raw = query.get("from")
        if raw is None:
            return 0
        if raw == "end":
            return _Seek()
        try:
            position = int(raw)
        except ValueError:
            position = -1
        if not 0 <= position <= MAX_POSITION:
            raise InvalidInput(
                f"query parameter 'from' must be a position (0 to {MAX_POSITION}) or 'end', "
                f"not {raw!r}"
            )
        return position
    given = [name for name in READ_STARTS if name in query]
    if len(given) > 1:
        raise InvalidInput(
            f"give one place to start a read, not {' and '.join(repr(n) for n in given)}: "
            "'from' (a position or 'end'), 'from_sequence' or 'from_time'"
        )
    if "from_sequence" in query:
        return _Seek(sequence=_int_param(request, "from_sequence", 0, 0, MAX_POSITION))
    try:
        return _Seek(time=parse_time(query["from_time"]))
    except ValueError as exc:
        raise InvalidInput(f"query parameter 'from_time': {exc}") from None


async def _seek(hub: StreamHub, stream: str, start: _Seek) -> int:
    if start.sequence is None and start.time is None:
        return (await hub.checkpoint(stream)).length
    return await hub.seek(stream, sequence=start.sequence, time=start.time)


async def _records_page(
    hub: StreamHub, stream: str, position: int, limit: int, max_bytes: int
) -> tuple[Records, int]:
    """Up to ``limit`` messages from ``position`` as records, and the position after them.

    Cut from the stored frames (the binary route's read) where it can be:
    about twice as fast as a ``Message`` per message. Frames of at most
    ``max_bytes`` hold at most that much of values, so the page keeps the
    route's bound; a value in pieces, or a first frame alone over
    ``max_bytes``, is read as messages (at least one, then more while their
    values fit), as before.
    """
    frames = await hub.read_frames(stream, position, max_bytes, limit)
    if len(frames.data) <= max_bytes:
        page = records_of_frames(frames.data, frames.skip, limit)
        if page is not None:
            # No messages: continue where the read starts (past 0 once trimmed).
            return page if page[0] else ([], frames.next_position)
    messages, next_position = await hub.read(stream, position, limit, max_bytes)
    return records_of_messages(messages), next_position


async def _binary_frames(
    request: web.Request, stream: str, position: int, limit: int | None, wait: int
) -> web.Response:
    """Stored frames as they are: no decoding or re-encoding, the client checks the CRCs.

    The fast read path for the client library: the body is whole frames
    (docs/FORMAT.md); ``X-Skip`` counts leading messages of the first frame
    before ``from``, ``X-Next`` is where to continue. With ``limit``, frames
    stop once they hold that many messages from ``from`` on.
    """
    hub = request.app[HUB]
    max_bytes = request.app[LIMITS].max_read_bytes
    frames = await hub.read_frames(stream, position, max_bytes, limit)
    if not frames.data and wait:
        request[NOTES].kind = "long_poll"
        await hub.wait_for_commit(stream, position, wait, gone=_gone(request))
        frames = await hub.read_frames(stream, position, max_bytes, limit)
    if position == 0 and frames.data:  # from the start: past 0 once trimmed, so say where
        position = read_header(frames.data, 0, None).base_position
    elif position == 0:
        position = frames.next_position
    return _frames_answer(frames.data, frames.skip, frames.next_position, position)


def _frames_answer(data: bytes, skip: int, next_position: int, position: int) -> web.Response:
    return web.Response(
        body=data,
        content_type=BATCH_CONTENT_TYPE,
        headers={"X-Skip": str(skip), "X-Next": str(next_position), POSITION_HEADER: str(position)},
    )


async def _server_sent_events(
    request: web.Request, stream: str, start: int | _Seek, limit: int
) -> web.StreamResponse:
    """Follow the tail: one event per message, id = next position (for Last-Event-ID).

    A reconnecting ``EventSource`` sends the URL it was opened with and the
    last id it saw: that id wins over ``from``, ``from_sequence`` and
    ``from_time``, which said where the tail started the first time.
    """
    hub = request.app[HUB]
    resume = request.headers.get("Last-Event-ID")
    if resume is not None and resume.isascii() and resume.isdigit():
        position = int(resume)
    else:
        position = start if isinstance(start, int) else await _seek(hub, stream, start)
    # 404 before the stream starts, 400 for a position that is no message's:
    # answered now, while the answer can still be an error.
    await hub.check_position(stream, position)
    response = web.StreamResponse(
        headers={"Content-Type": EVENT_STREAM, "Cache-Control": "no-cache"}
    )
    await response.prepare(request)
    notes = request[NOTES]
    notes.sent = 0
    gone = _gone(request)
    try:
        while not hub.stopping and not gone():  # a shutdown ends the stream: clients reconnect
            try:
                messages, position_after = await hub.read(
                    stream, position, limit, request.app[LIMITS].max_read_bytes
                )
                if not messages:
                    # Wakes early if the reader goes away, so that it stops
                    # counting as a waiting read.
                    # From where the read would start: past 0 on a trimmed stream.
                    await hub.wait_for_commit(stream, position_after, 15, gone=gone)
            except (PositionTrimmed, StreamNotFound) as exc:
                # A trim overtook this tail, or the stream was deleted: say so, and end it.
                body = error_body(exc.code, str(exc), _error_fields(exc))
                await response.write(b"event: error\ndata: %b\n\n" % body)
                break
            for message in messages:
                event = b"id: %d\ndata: %b\n\n" % (message.next_position, record_json(message))
                await response.write(event)
                notes.sent += len(event)
            position = position_after
            if not messages:
                await response.write(KEEP_ALIVE)
                notes.sent += len(KEEP_ALIVE)
        await response.write_eof()
    except ConnectionError:
        # The reader went away (aiohttp says so at the next write, as a reset
        # or, in the middle of a large event, a lost connection): that is how
        # a tail ends, no error. It counts as the 200 it was answered with.
        log.debug("tail reader went away", extra={"stream": stream, "position": position})
    return response


KEEP_ALIVE = b": keep-alive\n\n"


def _gone(request: web.Request) -> Callable[[], bool]:
    """Whether the request's client has gone away (its connection is closed or closing).

    aiohttp does not cancel a handler whose client left; a waiting read
    asks this each time it wakes (at least once per ``recheck_interval``).
    """

    def gone() -> bool:
        transport = request.transport
        return transport is None or transport.is_closing()

    return gone


async def health(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def ready(request: web.Request) -> web.Response:
    try:
        await request.app[HUB].list_streams()
    except MessageVaultError as exc:
        raise NotReady(f"storage is not reachable: {exc}") from exc
    cluster = request.app.get(CLUSTER)
    if cluster is None:
        return web.json_response({"status": "ready", "role": "single"})
    return web.json_response(
        {
            "status": "ready",
            "node": cluster.node_id,
            "address": cluster.address,
            "role": cluster.role,
            "streams_written": len(cluster.held),
        }
    )


async def cluster_route(request: web.Request) -> web.Response:
    """The nodes sharing this storage and which streams each writes (``GET /cluster``)."""
    _require(request, "read", None)
    cluster = request.app.get(CLUSTER)
    if cluster is None:
        return web.json_response({"node": None, "role": "single", "nodes": [], "streams": []})
    return web.json_response(await cluster.describe())


async def metrics_route(request: web.Request) -> web.Response:
    body = generate_latest(request.app[METRICS].registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def openapi(request: web.Request) -> web.Response:
    limits = request.app[LIMITS]
    return web.json_response(
        openapi_document(max_read_messages=limits.max_read_messages, max_wait=int(limits.max_wait))
    )


# Deleting a stream, and retention policies ----------------------------------------------


def _require_admin(request: web.Request, what: str) -> None:
    principal: Principal = request[PRINCIPAL]
    # A node forwards only what an admin asked of it.
    if not (principal.node or "admin" in principal.claims):
        raise Forbidden(f"user {principal.name!r} may not {what}: that takes the admin claim")


async def delete_stream(request: web.Request) -> web.Response:
    """``DELETE /streams/{stream}`` (admin): the stream, its policy and, several nodes, its lease.

    Done by the stream's writer: another node's request is forwarded there,
    as an append is; a stream nobody writes is taken by this node first.
    """
    stream = _stream(request)
    _require_admin(request, f"delete stream {stream!r}")
    hub = request.app[HUB]
    await hub.checkpoint(stream)  # 404 for no such stream, before any lease is taken
    if (relayed := await _relayed_to_writer(request, stream)) is not None:
        return relayed
    cluster = request.app.get(CLUSTER)
    await hub.delete_stream(stream)
    await delete_stream_policy(hub, stream)
    if cluster is not None:
        await cluster.release_stream(stream)
    return web.Response(status=204)


async def get_retention(request: web.Request) -> web.Response:
    """``GET /streams/{stream}/retention``: its policy, or the server's default (any reader)."""
    stream = _stream(request)
    _require(request, "read", stream)
    await request.app[HUB].checkpoint(stream)  # 404 for no such stream
    return web.json_response(await retention_answer(request.app[RETENTION], stream))


async def put_retention(request: web.Request) -> web.Response:
    """``PUT /streams/{stream}/retention`` (admin): ``{"max_age": s|null, "max_bytes": n|null}``."""
    stream = _stream(request)
    _require_admin(request, f"set stream {stream!r}'s retention")
    if request.content_type != JSON:
        raise UnsupportedMediaType(f"send the policy as {JSON}, not {request.content_type!r}")
    body = await _body(request)
    hub = request.app[HUB]
    await hub.checkpoint(stream)  # 404 for no such stream
    await set_stream_policy(hub, stream, body)
    return web.json_response(await retention_answer(request.app[RETENTION], stream))


async def delete_retention(request: web.Request) -> web.Response:
    """``DELETE /streams/{stream}/retention`` (admin): the stream follows the default again."""
    stream = _stream(request)
    _require_admin(request, f"clear stream {stream!r}'s retention")
    hub = request.app[HUB]
    await hub.checkpoint(stream)  # 404 for no such stream
    await delete_stream_policy(hub, stream)
    return web.Response(status=204)
