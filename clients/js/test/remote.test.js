// The reader over the network: a real server's binary read route and, on Azure (Azurite
// in tests), the container SAS URL the server hands out. tests/test_js_reader.py starts
// them and names them in MV_JS_REMOTE; skipped when run on its own.
import { test } from "node:test";
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { createHash } from "node:crypto";
import { AzureSasSource, ServerReader, StreamReader } from "../messagevault.js";

const manifestPath = process.env.MV_JS_REMOTE;
const skip = manifestPath ? false : "MV_JS_REMOTE names no server (tests/test_js_reader.py sets it)";
const remote = manifestPath ? JSON.parse(readFileSync(manifestPath, "utf-8")) : {};
const hex = (b) => Buffer.from(b).toString("hex");
const sha256 = (b) => createHash("sha256").update(b).digest("hex");
const auth = { username: remote.username, password: remote.password };
const FOLLOW_LIMIT_MS = 15_000;

function assertMessage(got, want, where) {
  assert.equal(got.position, want.position, where);
  assert.equal(got.nextPosition, want.next_position, where);
  assert.equal(got.sequence, want.sequence, where);
  assert.equal(got.timestamp, want.timestamp, where);
  assert.equal(got.id, want.id_hex, where);
  assert.equal(hex(got.key), want.key_hex, where);
  assert.equal(sha256(got.value), want.value_sha256, where);
}

async function publish(value) {
  const response = await fetch(`${remote.server}/streams/${remote.stream}`, {
    method: "POST",
    headers: {
      "Content-Type": "application/json",
      Authorization: `Basic ${btoa(`${remote.username}:${remote.password}`)}`,
    },
    body: JSON.stringify({ messages: [{ key: "Live", value }] }),
  });
  assert.equal(response.status, 200, await response.clone().text());
  return response.json();
}

/** The first message `follow` yields after `value` is published, within a bounded time. */
async function followSees(follow, value) {
  const controller = new AbortController();
  const timer = setTimeout(() => controller.abort(), FOLLOW_LIMIT_MS);
  try {
    const iterator = follow(controller.signal)[Symbol.asyncIterator]();
    const next = iterator.next();
    const receipt = await publish(value);
    const { value: message, done } = await next;
    assert.ok(!done, "follow ended before the message came");
    assert.equal(new TextDecoder().decode(message.value), value);
    assert.equal(message.position, receipt.messages[0].position);
    controller.abort();
    await iterator.return?.();
    return message;
  } finally {
    clearTimeout(timer);
  }
}

test("server binary route: the stream page by page, from every kind of start", { skip }, async () => {
  const server = new ServerReader(remote.server, remote.stream, auth);
  const got = [];
  let from = 0;
  for (let pages = 0; from < remote.length && pages < 1000; pages++) {
    const answer = await server.read({ from, limit: 7 });
    got.push(...answer.messages);
    from = answer.next;
  }
  assert.equal(from, remote.length);
  assert.equal(got.length, remote.messages.length);
  got.forEach((m, i) => assertMessage(m, remote.messages[i], `message ${i}`));
  // From a message inside a frame: X-Skip drops those before it.
  const middle = remote.messages[remote.middle];
  const answer = await server.read({ from: middle.position, limit: 2 });
  assertMessage(answer.messages[0], middle, "from the middle of a frame");
  const bySequence = await server.read({ fromSequence: middle.sequence, limit: 1 });
  assertMessage(bySequence.messages[0], middle, "from a sequence");
  assert.equal(bySequence.position, middle.position);
  const byTime = await server.read({ fromTime: new Date(remote.messages.at(-1).timestamp), limit: 1 });
  assert.ok(byTime.messages[0].timestamp >= remote.messages.at(-1).timestamp);
});

test("server binary route: bad requests are clear errors", { skip }, async () => {
  await assert.rejects(new ServerReader(remote.server, remote.stream, { username: remote.username, password: "wrong" }).read({ from: 0 }), (e) => e.code === "ServerError" && /401/.test(e.message));
  await assert.rejects(new ServerReader(remote.server, remote.stream, auth).read({ from: 1 }), (e) => e.code === "ServerError" && e.status === 400 && /400 .*position/.test(e.message) && /position/.test(e.detail) && !e.detail.includes("http"));
  await assert.rejects(new ServerReader(remote.server, "no-such-stream", auth).read({ from: 0 }), (e) => e.code === "ServerError" && /404/.test(e.message));
});

test("azure SAS: reads, seeks and the checkpoint from blob metadata", { skip: skip || (!remote.sas && "file storage: no SAS") }, async () => {
  const reader = new StreamReader(new AzureSasSource(remote.sas));
  const checkpoint = await reader.checkpoint();
  assert.ok(checkpoint.length >= remote.length);
  const got = [];
  for await (const m of reader.messages({ checkpoint: { ...checkpoint, length: remote.length } })) got.push(m);
  assert.equal(got.length, remote.messages.length);
  got.forEach((m, i) => assertMessage(m, remote.messages[i], `message ${i}`));
  for (const m of remote.messages.filter((_, i) => i % 5 === 0)) {
    assert.equal(await reader.seek({ sequence: m.sequence, checkpoint }), m.position, `sequence ${m.sequence}`);
  }
  const middle = remote.messages[remote.middle];
  const [first] = await (async () => {
    for await (const m of reader.messages({ from: middle.position })) return [m];
    return [];
  })();
  assertMessage(first, middle, "from the middle of a frame");
  const bad = new StreamReader(new AzureSasSource(remote.sas.replace(/sig=[^&]*/, "sig=AAAA")));
  await assert.rejects(bad.checkpoint(), (e) => e.code === "StorageError" && /403/.test(e.message));
});

test("follow: a message published while following arrives (server route and SAS)", { skip }, async () => {
  const length = async () => (await (await fetch(`${remote.server}/streams/${remote.stream}`, { headers: { Authorization: `Basic ${btoa(`${remote.username}:${remote.password}`)}` } })).json()).length;
  const server = new ServerReader(remote.server, remote.stream, auth);
  const from = await length();
  await followSees((signal) => server.follow({ from, signal, wait: 5 }), "seen through the server");
  if (remote.sas) {
    // From the server's length: the stored checkpoint may trail it a moment, which follow waits out.
    const reader = new StreamReader(new AzureSasSource(remote.sas));
    const after = await length();
    await followSees((signal) => reader.follow({ from: after, signal, interval: 50 }), "seen through the SAS");
  }
});
