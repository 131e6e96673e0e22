// Sources without a MessageVault server: a ranged URL (a plain static file server on
// 127.0.0.1) and a stream that grows while it is followed.
import { test } from "node:test";
import assert from "node:assert/strict";
import { createServer } from "node:http";
import { readFileSync } from "node:fs";
import { fileURLToPath } from "node:url";
import { BufferSource, HttpRangeSource, StreamReader, decodeCheckpoint } from "../messagevault.js";

const DATA = fileURLToPath(new URL("../../../tests/data/", import.meta.url));
const bytes = (name) => new Uint8Array(readFileSync(DATA + name));
const golden = listing();

function listing() {
  return JSON.parse(readFileSync(DATA + "golden-v1.json", "utf-8"));
}

/** A static server of tests/data honouring single Range requests; counts what it is asked. */
async function staticServer() {
  const asked = [];
  const server = createServer((request, response) => {
    const name = request.url.slice(1).split("?")[0];
    let body;
    try {
      body = readFileSync(DATA + name);
    } catch {
      response.writeHead(404).end();
      return;
    }
    asked.push([request.method, name, request.headers.range ?? null]);
    const range = /^bytes=(\d+)-(\d+)$/.exec(request.headers.range ?? "");
    if (range) {
      const part = body.subarray(Number(range[1]), Number(range[2]) + 1);
      response.writeHead(206, { "Content-Length": part.length, "Content-Range": `bytes ${range[1]}-${range[2]}/${body.length}` });
      response.end(request.method === "HEAD" ? undefined : part);
    } else {
      response.writeHead(200, { "Content-Length": body.length });
      response.end(request.method === "HEAD" ? undefined : body);
    }
  });
  await new Promise((resolve) => server.listen(0, "127.0.0.1", resolve));
  return { url: `http://127.0.0.1:${server.address().port}`, asked, close: () => new Promise((r) => server.close(r)) };
}

test("a ranged URL: messages, seeks with the index, and clear errors", async () => {
  const server = await staticServer();
  try {
    const reader = new StreamReader(
      new HttpRangeSource({
        dataUrl: `${server.url}/golden-v1.mvlog`,
        checkpointUrl: `${server.url}/golden-v1.checkpoint`,
        indexUrl: `${server.url}/no-index`,
      }),
    );
    const got = [];
    for await (const m of reader.messages()) got.push(m);
    assert.deepEqual(got.map((m) => m.id), golden.messages.map((m) => m.id_hex));
    assert.ok(server.asked.some(([, name, range]) => name === "golden-v1.mvlog" && range === "bytes=0-1239"));
    assert.equal(await reader.seek({ sequence: 5 }), golden.messages[5].position);

    const indexed = new StreamReader(
      new HttpRangeSource({
        dataUrl: `${server.url}/golden-v2.mvlog`,
        checkpointUrl: `${server.url}/golden-v2.checkpoint`,
        indexUrl: `${server.url}/golden-index.mvix`,
      }),
    );
    server.asked.length = 0;
    assert.equal(await indexed.seek({ sequence: 25 }), 1182);
    assert.ok(server.asked.some(([, name]) => name === "golden-index.mvix"), "the index was read");

    const missing = new StreamReader(new HttpRangeSource({ dataUrl: `${server.url}/nothing`, checkpointUrl: `${server.url}/nothing` }));
    await assert.rejects(missing.checkpoint(), (e) => e.code === "StorageError" && /404/.test(e.message));
    const notACheckpoint = new StreamReader(new HttpRangeSource({ dataUrl: `${server.url}/golden-v1.mvlog`, checkpointUrl: `${server.url}/golden-v1.json` }));
    await assert.rejects(notACheckpoint.checkpoint(), (e) => e.code === "CorruptData");
  } finally {
    await server.close();
  }
});

test("follow yields each commit as the checkpoint moves, and stops on its signal", async () => {
  const full = decodeCheckpoint(bytes("golden-v1.checkpoint"));
  const source = new BufferSource({ data: bytes("golden-v1.mvlog"), checkpoint: { ...full, length: 0, nextSequence: 0 } });
  setTimeout(() => source.setCheckpoint(commits.shift()), 20);
  const commits = golden.frames.map((f) => ({ ...full, length: f.position + f.frame_size, nextSequence: f.base_sequence + f.count }));
  const controller = new AbortController();
  const limit = setTimeout(() => controller.abort(), 10_000);
  const seen = [];
  try {
    for await (const m of new StreamReader(source).follow({ signal: controller.signal, interval: 5 })) {
      seen.push(m.sequence);
      // Commit the next frame once this one is read whole.
      if (m.nextPosition === (await source.checkpoint()).length && commits.length) source.setCheckpoint(commits.shift());
      if (seen.length === golden.messages.length) controller.abort();
    }
  } finally {
    clearTimeout(limit);
  }
  assert.deepEqual(seen, golden.messages.map((m) => m.sequence));
});

test("basicAuthorization: the user and password as UTF-8, as the server decodes them", async () => {
  const { basicAuthorization } = await import("../messagevault.js");
  assert.equal(basicAuthorization("app", "pw"), `Basic ${Buffer.from("app:pw").toString("base64")}`);
  assert.equal(basicAuthorization("zoë", "pässwörd ✓"), `Basic ${Buffer.from("zoë:pässwörd ✓", "utf8").toString("base64")}`);
  assert.equal(basicAuthorization("app"), `Basic ${Buffer.from("app:").toString("base64")}`);
});
