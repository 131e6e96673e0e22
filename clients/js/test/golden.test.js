// The golden files of tests/data/ read against their JSON listings.
import { test } from "node:test";
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { createHash } from "node:crypto";
import { fileURLToPath } from "node:url";
import {
  BufferSource,
  StreamReader,
  crc32,
  decodeCheckpoint,
  decodeFrames,
  decodeIndexEntry,
  indexHeaderProblem,
  checkpointFromMetadata,
  keyText,
  valueText,
  valueJson,
} from "../messagevault.js";

const DATA = fileURLToPath(new URL("../../../tests/data/", import.meta.url));
const bytes = (name) => new Uint8Array(readFileSync(DATA + name));
const listing = (name) => JSON.parse(readFileSync(DATA + name, "utf-8"));
const toHex = (b) => Buffer.from(b).toString("hex");
const fromHex = (h) => new Uint8Array(Buffer.from(h, "hex"));

async function collect(iterable) {
  const out = [];
  for await (const item of iterable) out.push(item);
  return out;
}

function assertListed(got, want) {
  assert.equal(got.position, want.position);
  assert.equal(got.sequence, want.sequence);
  assert.equal(got.timestamp, want.timestamp);
  assert.equal(got.time.getTime(), want.timestamp);
  assert.equal(got.nextPosition, want.next_position);
  assert.equal(got.id, want.id_hex);
  assert.equal(toHex(got.key), want.key_hex);
  if (want.value_hex !== undefined) assert.equal(toHex(got.value), want.value_hex);
  if (want.value_size !== undefined) assert.equal(got.value.length, want.value_size);
}

test("crc32 is zlib's", () => {
  assert.equal(crc32(new TextEncoder().encode("123456789")), 0xcbf43926);
  assert.equal(crc32(new Uint8Array(0)), 0);
});

test("golden v1: every listed message, from the start and from each position", async () => {
  const want = listing("golden-v1.json");
  const checkpoint = decodeCheckpoint(bytes("golden-v1.checkpoint"));
  assert.equal(checkpoint.version, 1);
  assert.equal(checkpoint.length, want.stream_size);
  const reader = new StreamReader(new BufferSource({ data: bytes("golden-v1.mvlog"), checkpoint }));
  const got = await collect(reader.messages());
  assert.equal(got.length, want.messages.length);
  got.forEach((m, i) => assertListed(m, want.messages[i]));
  for (const [i, listed] of want.messages.entries()) {
    const rest = await collect(reader.messages({ from: listed.position }));
    assert.equal(rest.length, want.messages.length - i);
    assertListed(rest[0], listed);
  }
  assert.equal(keyText(got[0]), "OrderPlaced");
  assert.deepEqual(valueJson(got[0]), { id: 7, total: "12.50" });
  assert.equal(valueText(got[2]), "naïve café ✓");
});

test("golden v1: a position that is no message's is refused", async () => {
  const reader = new StreamReader(new BufferSource({ data: bytes("golden-v1.mvlog"), checkpoint: bytes("golden-v1.checkpoint") }));
  for (const position of [1, 64, 70, 153, 5000, -1]) {
    await assert.rejects(collect(reader.messages({ from: position })), (e) => e.code === "InvalidPosition", `position ${position}`);
  }
});

test("golden v2: messages up to the compressed frame, which is refused naming its position", async () => {
  const want = listing("golden-v2.json");
  const checkpoint = decodeCheckpoint(bytes("golden-v2.checkpoint"));
  assert.equal(checkpoint.length, want.stream_size);
  assert.equal(checkpoint.nextSequence, want.checkpoint.next_sequence);
  const reader = new StreamReader(new BufferSource({ data: bytes("golden-v2.mvlog"), checkpoint }));
  const got = [];
  await assert.rejects(
    (async () => {
      for await (const m of reader.messages()) got.push(m);
    })(),
    (e) => e.code === "Compressed" && e.position === 523 && /523/.test(e.message),
  );
  assert.equal(got.length, 5);
  got.forEach((m, i) => assertListed(m, want.messages[i]));
});

test("golden v2: frame headers decode to their listed fields", async () => {
  const want = listing("golden-v2.json");
  const data = bytes("golden-v2.mvlog");
  const { decodeHeader } = await import("../messagevault.js");
  for (const frame of want.frames) {
    const header = decodeHeader(data, frame.position, frame.position);
    assert.equal(toHex(data.subarray(frame.position, frame.position + frame.header_size)), frame.header_hex);
    for (const [field, name] of [
      ["version", "version"], ["flags", "flags"], ["headerSize", "header_size"], ["frameSize", "frame_size"],
      ["count", "count"], ["baseSequence", "base_sequence"], ["timestamp", "timestamp"], ["keysSize", "keys_size"],
      ["valuesSize", "values_size"], ["bodyCrc", "body_crc"], ["producerId", "producer_hex"],
      ["producerSeq", "producer_seq"], ["chunk", "chunk"],
    ]) {
      assert.equal(header[field], frame[name], `${name} of frame at ${frame.position}`);
    }
  }
});

const zlib = await import("node:zlib");
const noZstd = typeof zlib.zstdDecompressSync !== "function" && "this Node has no zstd (22.15+ has)";

test("golden v2: Node's own zstd as the decompress option decodes the compressed frames", { skip: noZstd }, async () => {
  const want = listing("golden-v2.json");
  const reader = new StreamReader(new BufferSource({ data: bytes("golden-v2.mvlog"), checkpoint: bytes("golden-v2.checkpoint") }), {
    decompress: (stored) => zlib.zstdDecompressSync(stored),
  });
  const got = await collect(reader.messages());
  assert.equal(got.length, want.messages.length);
  got.forEach((m, i) => assertListed(m, want.messages[i]));
});

test("golden v2: the decompress option gets each compressed region and its size", async () => {
  // A stand-in decoder: the listed values of the compressed frame; a marked buffer for the
  // compressed value in pieces. What is checked is what the reader asks and does with it.
  const want = listing("golden-v2.json");
  const frame = want.messages.filter((m) => m.sequence >= 5 && m.sequence < 25);
  const plain = fromHex(frame.map((m) => m.value_hex).join(""));
  const asked = [];
  const decompress = (stored, size) => {
    asked.push([stored.length, size]);
    if (size === plain.length) return plain;
    return new Uint8Array(size).fill(7);
  };
  const reader = new StreamReader(new BufferSource({ data: bytes("golden-v2.mvlog"), checkpoint: bytes("golden-v2.checkpoint") }), { decompress });
  const got = await collect(reader.messages());
  assert.deepEqual(asked, [[163, plain.length], [486, 4276300]]);
  got.slice(0, 25).forEach((m, i) => assertListed(m, want.messages[i]));
  assert.equal(got[25].value.length, 4276300);
  assert.equal(got[25].value[4276299], 7);
  const short = new StreamReader(new BufferSource({ data: bytes("golden-v2.mvlog"), checkpoint: bytes("golden-v2.checkpoint") }), {
    decompress: (stored, size) => new Uint8Array(size - 1),
  });
  await assert.rejects(collect(short.messages()), (e) => e.code === "CorruptData" && e.position === 523);
});

function piecesStream() {
  const want = listing("golden-v2-pieces.json");
  const recipe = want.value;
  const value = new Uint8Array(createHash("shake256", { outputLength: recipe.size }).update(fromHex(recipe.seed_hex)).digest());
  const key = new TextEncoder().encode("Blob");
  const [head, ...continuations] = want.frames;
  const headBody = new Uint8Array(9 + key.length + head.values_size);
  new DataView(headBody.buffer).setUint32(4, head.values_size, true);
  headBody[8] = key.length;
  headBody.set(key, 9);
  headBody.set(value.subarray(0, head.values_size), 9 + key.length);
  const parts = [fromHex(head.header_hex), headBody];
  let at = head.values_size;
  for (const frame of continuations) {
    parts.push(fromHex(frame.header_hex), value.subarray(at, at + frame.values_size));
    at += frame.values_size;
  }
  const prefix = bytes("golden-v2.mvlog");
  const total = prefix.length + parts.reduce((a, p) => a + p.length, 0);
  const data = new Uint8Array(total);
  data.set(prefix, 0);
  let offset = prefix.length;
  for (const part of parts) {
    data.set(part, offset);
    offset += part.length;
  }
  return { want, data, value };
}

test("golden v2 pieces: the 8 MiB value is joined whole, with its listed digest", async () => {
  const { want, data } = piecesStream();
  assert.equal(createHash("sha256").update(data.subarray(want.position)).digest("hex"), want.sha256);
  const cp = want.checkpoint;
  const checkpoint = {
    version: 1, commit: cp.commit, length: cp.length, nextSequence: cp.next_sequence,
    lastFramePosition: cp.last_frame_position, lastTimestamp: cp.last_timestamp, firstPosition: 0,
  };
  const reader = new StreamReader(new BufferSource({ data, checkpoint }));
  const got = await collect(reader.messages({ from: want.position }));
  assert.equal(got.length, 1);
  const [m] = got;
  assertListed(m, want.messages[0]);
  assert.equal(createHash("sha256").update(m.value).digest("hex"), want.messages[0].value_sha256);
  // A continuation's position is no message's: refused naming the head.
  await assert.rejects(collect(reader.messages({ from: want.frames[1].position })), (e) => e.code === "InvalidPosition" && e.message.includes(String(want.position)));
  // The same frames as a binary read's body.
  const [fromBody] = decodeFrames(data.subarray(want.position));
  assert.equal(createHash("sha256").update(fromBody.value).digest("hex"), want.messages[0].value_sha256);
  assert.equal(fromBody.nextPosition, want.messages[0].next_position);
  // Seeking to its sequence lands on the head; the stream ends after the last piece.
  assert.equal(await reader.seek({ sequence: 26 }), want.position);
  assert.equal(await reader.seek({ sequence: 27 }), cp.length);
  // A value cut short (its last piece beyond the committed length) is never handed out.
  const short = new StreamReader(new BufferSource({ data, checkpoint: { ...checkpoint, length: want.frames[2].position } }));
  await assert.rejects(collect(short.messages({ from: want.position })), (e) => e.code === "CorruptData");
});

test("golden index: header and entries as listed, and seeks agree with a walk", async () => {
  const want = listing("golden-index.json");
  const index = bytes("golden-index.mvix");
  assert.equal(index.length, want.index_size);
  assert.equal(indexHeaderProblem(index), null);
  const entries = [];
  for (let at = 64; at < index.length; at += 32) entries.push(decodeIndexEntry(index, at));
  assert.deepEqual(entries, want.entries);
  const stream = listing("golden-v2.json");
  const checkpoint = decodeCheckpoint(bytes("golden-v2.checkpoint"));
  const withIndex = new StreamReader(new BufferSource({ data: bytes("golden-v2.mvlog"), checkpoint, index }));
  const without = new StreamReader(new BufferSource({ data: bytes("golden-v2.mvlog"), checkpoint }));
  for (const m of stream.messages) {
    assert.equal(await withIndex.seek({ sequence: m.sequence }), m.position);
    assert.equal(await without.seek({ sequence: m.sequence }), m.position);
  }
  const frames = stream.frames;
  for (const frame of frames) {
    for (const time of [frame.timestamp, new Date(frame.timestamp)]) {
      const expected = frames.find((f) => f.timestamp >= frame.timestamp).position;
      assert.equal(await withIndex.seek({ time }), expected);
    }
  }
  assert.equal(await withIndex.seek({ time: 0 }), 0);
  assert.equal(await withIndex.seek({ time: frames.at(-1).timestamp + 1 }), checkpoint.length);
  await assert.rejects(withIndex.seek({ sequence: checkpoint.nextSequence + 1 }), (e) => e.code === "InvalidPosition");
  await assert.rejects(withIndex.seek({ sequence: -1 }), (e) => e.code === "InvalidPosition");
  await assert.rejects(withIndex.seek({ time: "soon" }), TypeError);
  await assert.rejects(withIndex.seek({}), TypeError);
});

test("golden index: a lying entry costs a scan, never a wrong answer", async () => {
  const stream = listing("golden-v2.json");
  const index = bytes("golden-index.mvix").slice();
  // Entry 1 now claims sequence 9 at its frame (really 5..24): its header disagrees.
  const dv = new DataView(index.buffer);
  dv.setBigUint64(64 + 32 + 8, 9n, true);
  dv.setUint32(64 + 32 + 28, crc32(index, 64 + 32, 64 + 32 + 28), true);
  const reader = new StreamReader(new BufferSource({ data: bytes("golden-v2.mvlog"), checkpoint: bytes("golden-v2.checkpoint"), index }));
  for (const m of stream.messages) assert.equal(await reader.seek({ sequence: m.sequence }), m.position);
});

test("golden trimmed checkpoint: first position honoured by reads and seeks", async () => {
  const want = listing("golden-index.json").trimmed_checkpoint;
  const checkpoint = decodeCheckpoint(bytes("golden-v2-trimmed.checkpoint"));
  assert.equal(checkpoint.version, 2);
  assert.equal(checkpoint.firstPosition, want.first_position);
  assert.equal(checkpoint.length, want.length);
  assert.equal(checkpoint.commit, want.commit);
  assert.equal(checkpoint.nextSequence, want.next_sequence);
  assert.equal(checkpoint.lastFramePosition, want.last_frame_position);
  assert.equal(checkpoint.lastTimestamp, want.last_timestamp);
  const data = bytes("golden-v2.mvlog").slice();
  data.fill(0, 0, want.first_position); // released bytes read as zeros
  const reader = new StreamReader(new BufferSource({ data, checkpoint, index: bytes("golden-index.mvix") }));
  const first = await reader.messages({ from: want.first_position }).next();
  assert.equal(first.value.sequence, 2);
  for (const position of [0, 68, 114]) {
    await assert.rejects(collect(reader.messages({ from: position })), (e) => e.code === "PositionTrimmed" && e.message.includes(String(want.first_position)));
  }
  await assert.rejects(reader.seek({ sequence: 1 }), (e) => e.code === "PositionTrimmed" && e.message.includes("115"));
  assert.equal(await reader.seek({ sequence: 2 }), 115);
  assert.equal(await reader.seek({ time: 0 }), 115);
  // Read with no `from`: starts at the first readable position.
  const all = [];
  await assert.rejects(
    (async () => {
      for await (const m of reader.messages()) all.push(m);
    })(),
    (e) => e.code === "Compressed",
  );
  assert.equal(all[0].position, 115);
});

test("checkpoints from Azure metadata, and bad ones", () => {
  const checkpoint = checkpointFromMetadata({
    formatversion: "2", commit: "5", length: "1779", nextsequence: "26", lastframeposition: "1182", lasttimestamp: "1750000000003", firstposition: "115",
  });
  assert.deepEqual(checkpoint, decodeCheckpoint(bytes("golden-v2-trimmed.checkpoint")));
  const v1 = checkpointFromMetadata({ "x-ms-meta-commit": "1", "x-ms-meta-length": "10", "x-ms-meta-nextsequence": "1", "x-ms-meta-lastframeposition": "0", "x-ms-meta-lasttimestamp": "7" });
  assert.equal(v1.firstPosition, 0);
  assert.throws(() => checkpointFromMetadata({ commit: "1" }), /lacks length/);
  assert.throws(() => checkpointFromMetadata({ formatversion: "3", commit: "1" }), (e) => e.code === "UnsupportedVersion");
  assert.throws(
    () => checkpointFromMetadata({ formatversion: "2", commit: "1", length: "10", nextsequence: "1", lastframeposition: "0", lasttimestamp: "7", firstposition: "11" }),
    /past length/,
  );
  assert.throws(() => checkpointFromMetadata({ commit: "x1", length: "1" }), /not a number/);
});

test('golden v2: {compressed: "keep"} yields the compressed frame\'s messages with their sizes and no value', async () => {
  const want = listing("golden-v2.json");
  const checkpoint = decodeCheckpoint(bytes("golden-v2.checkpoint"));
  const reader = new StreamReader(new BufferSource({ data: bytes("golden-v2.mvlog"), checkpoint }), { compressed: "keep" });
  const got = [];
  for await (const m of reader.messages()) got.push(m);
  assert.equal(got.length, want.messages.length);
  got.forEach((m, i) => {
    const listed = want.messages[i];
    assert.equal(m.sequence, listed.sequence);
    assert.equal(m.position, listed.position);
    assert.equal(m.size, listed.value_size);
    if (m.compressed) {
      assert.equal(m.value, null);
    } else {
      assert.equal(m.size, m.value.length);
    }
  });
  assert.ok(got.some((m) => m.compressed), "the golden v2 stream has a compressed frame");
  assert.equal(got.filter((m) => m.compressed)[0].position, 523);
});
