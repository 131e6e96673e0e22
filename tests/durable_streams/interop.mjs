// The official Durable Streams TypeScript client (@durable-streams/client), driven by
// tests/test_durable_streams_interop.py against a MessageVault server.
//
// Usage: node interop.mjs COMMAND < REQUEST.json
// REQUEST is one JSON object: {"url": ..., "authorization": "Basic ..." (optional), ...}.
// Output: one JSON object a line on stdout; the last is {"event": "done", ...}, or
// {"event": "error", ...} with exit status 1.
//
// Commands:
//   append  {contentType?, create, values, raw?, producer?}
//           create the stream (when `create`, with `contentType`) or connect to it, then
//           append each of `values` (JSON values; with `raw`, strings of JSON text passed
//           to the client as they are) with the client. Without `producer`,
//           each is its own DurableStream.append, awaited in turn. With `producer`
//           ({id, epoch, maxBatchBytes, maxInFlight, repeatRequests}) they go through an
//           IdempotentProducer; `repeatRequests` sends every producer POST twice and
//           hands the client the second answer, as a transport would that retried after
//           losing the first answer. Prints each POST's status, then done with the
//           stream's tail offset (HEAD).
//   read    {offset}: catch-up (live: false) from `offset`: one batch line of every value
//           up to the tail, then done.
//   follow  {offset, live, count}: live ("long-poll" or "sse") from `offset` until
//           `count` values arrived; a line per batch (the Python side publishes once it
//           sees a batch with upToDate), then done.
import {
  BackoffDefaults,
  DurableStream,
  IdempotentProducer,
  stream,
} from "@durable-streams/client"

function emit(event, fields = {}) {
  process.stdout.write(JSON.stringify({ event, ...fields }) + "\n")
}

async function readRequest() {
  const chunks = []
  for await (const chunk of process.stdin) chunks.push(chunk)
  return JSON.parse(Buffer.concat(chunks).toString("utf8"))
}

// The client retries 5xx answers for ever by default: a few, so that a server error
// comes out as an error line rather than as a hang.
const backoffOptions = { ...BackoffDefaults, maxRetries: 3 }

function headersOf(request) {
  return request.authorization ? { Authorization: request.authorization } : {}
}

// A fetch that records every POST's status; with `repeat`, it sends each POST twice.
function recordingFetch(requests, repeat) {
  return async (url, init) => {
    if (init?.method !== "POST") return fetch(url, init)
    if (repeat) {
      const lost = await fetch(url, init)
      await lost.arrayBuffer()
      requests.push({ status: lost.status, seq: seqOf(init), answered: false })
    }
    const response = await fetch(url, init)
    requests.push({ status: response.status, seq: seqOf(init), answered: true })
    return response
  }
}

function seqOf(init) {
  const headers = new Headers(init.headers)
  const seq = headers.get("Producer-Seq")
  return seq === null ? null : Number(seq)
}

async function append(request) {
  const headers = headersOf(request)
  const requests = []
  const repeat = Boolean(request.producer?.repeatRequests)
  const fetchClient = recordingFetch(requests, repeat)
  const options = { url: request.url, headers, fetch: fetchClient, backoffOptions }
  // The client takes JSON as text, already serialized.
  const text = (value) => (request.raw ? value : JSON.stringify(value))
  const handle = request.create
    ? await DurableStream.create({ ...options, contentType: request.contentType })
    : await DurableStream.connect(options)
  emit("stream", { contentType: handle.contentType ?? null })
  if (request.producer) {
    const errors = []
    const producer = new IdempotentProducer(handle, request.producer.id, {
      epoch: request.producer.epoch ?? 0,
      maxBatchBytes: request.producer.maxBatchBytes ?? 1024 * 1024,
      maxInFlight: request.producer.maxInFlight ?? 5,
      fetch: fetchClient,
      onError: (error) => errors.push(`${error.name}: ${error.message}`),
    })
    for (const value of request.values) producer.append(text(value))
    await producer.flush()
    await producer.detach()
    if (errors.length) throw new Error(`producer errors: ${errors.join("; ")}`)
    emit("producer", { epoch: producer.epoch, nextSeq: producer.nextSeq })
  } else {
    for (const value of request.values) await handle.append(text(value))
  }
  const head = await handle.head()
  emit("done", { requests, offset: head.offset ?? null })
}

function open(request, live) {
  return stream({
    url: request.url,
    headers: headersOf(request),
    offset: request.offset,
    live,
    json: true,
    backoffOptions,
  })
}

// Catch-up through the client's promise helper, which rejects on a body that is no JSON
// (a subscriber would not hear of it: a catch-up response settles `closed` first).
async function read(request) {
  const response = await open(request, false)
  const items = await response.json()
  emit("batch", {
    items,
    offset: response.offset,
    upToDate: response.upToDate,
    streamClosed: response.streamClosed,
  })
  emit("done", { received: items.length, offset: response.offset })
}

// Live, through a subscriber: a line per batch the client hands it.
async function follow(request) {
  const response = await open(request, request.live)
  let received = 0
  let finished
  const done = new Promise((resolve) => {
    finished = resolve
  })
  const unsubscribe = response.subscribeJson((batch) => {
    received += batch.items.length
    emit("batch", {
      items: batch.items,
      offset: batch.offset,
      upToDate: batch.upToDate,
      streamClosed: batch.streamClosed,
    })
    if (received >= request.count || batch.streamClosed) finished()
  })
  // `closed` only settles the wait when it rejects (a failed live read).
  await Promise.race([done, response.closed.then(() => done)])
  unsubscribe()
  emit("done", { received, offset: response.offset })
}

const commands = {
  append,
  read,
  follow,
}

// process.exit drops what a pipe has not taken yet: exit once stdout has flushed.
function exit(code) {
  process.stdout.write("", () => process.exit(code))
}

const command = commands[process.argv[2]]
if (!command) {
  const usage = `usage: node interop.mjs ${Object.keys(commands).join("|")} < REQUEST.json`
  emit("error", { name: "Usage", message: usage })
  exit(2)
} else {
  try {
    await command(await readRequest())
    exit(0)
  } catch (error) {
    emit("error", {
      name: error?.name ?? "Error",
      message: String(error?.message ?? error),
      status: error?.status ?? null,
    })
    exit(1)
  }
}
