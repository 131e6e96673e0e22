// Damage is detected: every flipped byte is an error, never different data.
import { test } from "node:test";
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { fileURLToPath } from "node:url";
import { BufferSource, StreamReader, decodeCheckpoint, decodeFrames, decodeIndexEntry, indexHeaderProblem } from "../messagevault.js";

const DATA = fileURLToPath(new URL("../../../tests/data/", import.meta.url));
const bytes = (name) => new Uint8Array(readFileSync(DATA + name));

async function readAll(data, checkpoint) {
  const out = [];
  for await (const m of new StreamReader(new BufferSource({ data, checkpoint })).messages()) out.push(m);
  return out;
}

test("every byte of the golden v1 stream is guarded by a CRC", async () => {
  const data = bytes("golden-v1.mvlog");
  const checkpoint = decodeCheckpoint(bytes("golden-v1.checkpoint"));
  assert.equal((await readAll(data, checkpoint)).length, 9);
  for (let at = 0; at < data.length; at++) {
    const damaged = data.slice();
    damaged[at] ^= 0x10;
    await assert.rejects(readAll(damaged, checkpoint), (e) => ["CorruptData", "UnsupportedVersion"].includes(e.code), `byte ${at}`);
    assert.throws(() => decodeFrames(damaged), `byte ${at} as a batch body`);
  }
});

test("every byte of the golden v2 frames before the compressed one is guarded", async () => {
  const data = bytes("golden-v2.mvlog");
  const checkpoint = { ...decodeCheckpoint(bytes("golden-v2.checkpoint")), length: 523 };
  assert.equal((await readAll(data, checkpoint)).length, 5);
  for (let at = 0; at < 523; at++) {
    const damaged = data.slice();
    damaged[at] ^= 0x01;
    await assert.rejects(readAll(damaged, checkpoint), (e) => ["CorruptData", "UnsupportedVersion"].includes(e.code), `byte ${at}`);
  }
});

test("a damaged checkpoint or index header is refused, a damaged entry ignored", () => {
  for (const name of ["golden-v1.checkpoint", "golden-v2-trimmed.checkpoint"]) {
    const good = bytes(name);
    for (let at = 0; at < good.length; at++) {
      const damaged = good.slice();
      damaged[at] ^= 0x80;
      assert.throws(() => decodeCheckpoint(damaged), `${name} byte ${at}`);
    }
    assert.throws(() => decodeCheckpoint(good.subarray(0, 63)), /63 bytes/);
  }
  const index = bytes("golden-index.mvix");
  for (let at = 0; at < 64; at++) {
    const damaged = index.slice();
    damaged[at] ^= 0x04;
    assert.notEqual(indexHeaderProblem(damaged), null, `index header byte ${at}`);
  }
  for (let at = 64; at < index.length; at++) {
    const damaged = index.slice();
    damaged[at] ^= 0x04;
    assert.equal(decodeIndexEntry(damaged, 64 + 32 * Math.floor((at - 64) / 32)), null, `index byte ${at}`);
  }
});

test("a stream read from a truncated buffer is an error, not fewer messages", async () => {
  const data = bytes("golden-v1.mvlog");
  const checkpoint = decodeCheckpoint(bytes("golden-v1.checkpoint"));
  await assert.rejects(readAll(data.subarray(0, 1000), checkpoint), (e) => e.code === "CorruptData");
  assert.throws(() => decodeFrames(data.subarray(0, 1000)), /cut short/);
  assert.throws(() => decodeFrames(new Uint8Array(10)), /too few/);
});
