// Streams the Python writer produced (tests/test_js_reader.py writes them and names their
// listing in MV_JS_STREAMS); skipped when run on its own.
import { test } from "node:test";
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { createHash } from "node:crypto";
import { BufferSource, StreamReader, decodeCheckpointFile, decodeIndexEntry, indexHeaderProblem } from "../messagevault.js";

const manifestPath = process.env.MV_JS_STREAMS;
const skip = manifestPath ? false : "MV_JS_STREAMS names no streams (tests/test_js_reader.py sets it)";
const manifest = manifestPath ? JSON.parse(readFileSync(manifestPath, "utf-8")) : { streams: {} };
const hex = (b) => Buffer.from(b).toString("hex");
const sha256 = (b) => createHash("sha256").update(b).digest("hex");

function open(listed) {
  const read = (path) => new Uint8Array(readFileSync(path));
  const checkpoint = decodeCheckpointFile(read(listed.checkpoint));
  const source = new BufferSource({ data: read(listed.data), checkpoint, index: listed.index ? read(listed.index) : undefined });
  return { checkpoint, reader: new StreamReader(source) };
}

function assertMessage(got, want, where) {
  assert.equal(got.position, want.position, where);
  assert.equal(got.nextPosition, want.next_position, where);
  assert.equal(got.sequence, want.sequence, where);
  assert.equal(got.timestamp, want.timestamp, where);
  assert.equal(got.id, want.id_hex, where);
  assert.equal(hex(got.key), want.key_hex, where);
  assert.equal(got.value.length, want.value_size, where);
  assert.equal(sha256(got.value), want.value_sha256, where);
}

async function readFrom(reader, from, until = Infinity) {
  const out = [];
  for await (const m of reader.messages({ from })) {
    out.push(m);
    if (out.length >= until) break;
  }
  return out;
}

test("python-written streams: checkpoints as the writer left them", { skip }, () => {
  for (const [name, listed] of Object.entries(manifest.streams)) {
    const { checkpoint } = open(listed);
    assert.equal(checkpoint.length, listed.length, name);
    assert.equal(checkpoint.nextSequence, listed.next_sequence, name);
    assert.equal(checkpoint.firstPosition, listed.first_position, name);
    assert.equal(checkpoint.version, listed.first_position ? 2 : 1, name);
  }
});

test("python-written streams: every message, whole, from the first readable position", { skip }, async () => {
  for (const [name, listed] of Object.entries(manifest.streams)) {
    if (listed.compressed_position !== null) continue;
    const { reader } = open(listed);
    const got = await readFrom(reader, undefined);
    assert.equal(got.length, listed.messages.length, name);
    got.forEach((m, i) => assertMessage(m, listed.messages[i], `${name} message ${i}`));
  }
});

test("python-written streams: reads resume from any message position", { skip }, async () => {
  for (const [name, listed] of Object.entries(manifest.streams)) {
    if (listed.compressed_position !== null) continue;
    const { reader } = open(listed);
    for (let i = 0; i < listed.messages.length; i++) {
      const [first, second] = await readFrom(reader, listed.messages[i].position, 2);
      assertMessage(first, listed.messages[i], `${name} from message ${i}`);
      if (i + 1 < listed.messages.length) assertMessage(second, listed.messages[i + 1], `${name} after message ${i}`);
    }
  }
});

test("python-written streams: seeks by sequence and time, with the index the writer kept", { skip }, async () => {
  for (const [name, listed] of Object.entries(manifest.streams)) {
    if (listed.compressed_position !== null) continue;
    const { reader, checkpoint } = open(listed);
    const index = new Uint8Array(readFileSync(listed.index));
    assert.equal(indexHeaderProblem(index), null, name);
    assert.ok(decodeIndexEntry(index, 64 + 32) !== null, `${name}: the index holds entries`);
    for (const [i, m] of listed.messages.entries()) {
      assert.equal(await reader.seek({ sequence: m.sequence }), m.position, `${name} sequence ${m.sequence}`);
      if (i === 0 || listed.messages[i - 1].timestamp < m.timestamp) {
        assert.equal(await reader.seek({ time: m.timestamp }), m.position, `${name} time ${m.timestamp}`);
      }
    }
    assert.equal(await reader.seek({ sequence: checkpoint.nextSequence }), checkpoint.length);
    assert.equal(await reader.seek({ time: new Date(listed.messages.at(-1).timestamp + 1) }), checkpoint.length);
    if (listed.first_position) {
      const first = listed.messages[0].sequence;
      await assert.rejects(reader.seek({ sequence: first - 1 }), (e) => e.code === "PositionTrimmed" && e.message.includes(String(listed.first_position)));
      await assert.rejects(readFrom(reader, 0), (e) => e.code === "PositionTrimmed" && e.message.includes(String(listed.first_position)));
      assert.equal(await reader.seek({ time: 0 }), listed.first_position);
    }
  }
});

test("python-written streams: a compressed frame is refused naming its position", { skip }, async () => {
  for (const [name, listed] of Object.entries(manifest.streams)) {
    if (listed.compressed_position === null) continue;
    const { reader } = open(listed);
    const got = [];
    await assert.rejects(
      (async () => {
        for await (const m of reader.messages()) got.push(m);
      })(),
      (e) => e.code === "Compressed" && e.position === listed.compressed_position && e.message.includes(String(listed.compressed_position)),
    );
    got.forEach((m, i) => assertMessage(m, listed.messages[i], `${name} message ${i}`));
    assert.equal(got.at(-1).nextPosition, listed.compressed_position, name);
  }
});
