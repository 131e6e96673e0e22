// StreamReader.follow backs off while the stream is idle: every poll is a billed storage
// request. Node's mocked timers and Date make the waits exact: the test moves the clock
// to each timer the follower sets, and a checkpoint read's Date.now() is when it polled.
import { test } from "node:test";
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { fileURLToPath } from "node:url";
import { BufferSource, StreamReader, decodeCheckpoint } from "../messagevault.js";

const DATA = fileURLToPath(new URL("../../../tests/data/", import.meta.url));
const bytes = (name) => new Uint8Array(readFileSync(DATA + name));
const golden = JSON.parse(readFileSync(DATA + "golden-v1.json", "utf-8"));
const full = decodeCheckpoint(bytes("golden-v1.checkpoint"));
// The checkpoint after each of golden-v1's frames, as its writer committed them.
const commits = golden.frames.map((f) => ({ ...full, length: f.position + f.frame_size, nextSequence: f.base_sequence + f.count }));

/** golden-v1 with none of its frames committed yet; records when its checkpoint is read. */
class CountingSource extends BufferSource {
  constructor() {
    super({ data: bytes("golden-v1.mvlog"), checkpoint: { ...full, length: 0, nextSequence: 0 } });
    this.reads = [];
  }

  async checkpoint() {
    this.reads.push(Date.now());
    return super.checkpoint();
  }
}

// Real setImmediate (only setTimeout and Date are mocked): runs after every pending
// microtask, so the follower has read, yielded and set its next timer.
const settle = () => new Promise((resolve) => setImmediate(resolve));

/** Starts following `source` on mocked timers; `step()` runs the follower's one pending timer. */
async function follower(t, source, options = {}) {
  t.mock.timers.enable({ apis: ["setTimeout", "Date"], now: 0 });
  const controller = new AbortController();
  const seen = [];
  const done = (async () => {
    for await (const m of new StreamReader(source).follow({ ...options, signal: controller.signal })) seen.push(m.sequence);
  })();
  await settle();
  return {
    seen,
    async step() {
      t.mock.timers.runAll();
      await settle();
    },
    async stop() {
      controller.abort();
      await done;
    },
  };
}

const gaps = (times) => times.slice(1).map((time, i) => time - times[i]);

test("an idle follower waits 100, 200, 400, ... ms between polls, never more than 2000", async (t) => {
  const source = new CountingSource();
  const f = await follower(t, source);
  for (let i = 0; i < 9; i++) await f.step();
  await f.stop();
  assert.deepEqual(gaps(source.reads), [100, 200, 400, 800, 1600, 2000, 2000, 2000, 2000]);
  assert.deepEqual(f.seen, []);
});

test("a commit brings back the first interval, and a steady flow keeps it", async (t) => {
  const source = new CountingSource();
  const f = await follower(t, source);
  for (let i = 0; i < 6; i++) await f.step(); // idle up to the ceiling
  // Committed while the follower waits: the next poll finds it, the wait after is 100 again.
  source.setCheckpoint(commits[0]);
  await f.step();
  for (const commit of commits.slice(1)) {
    source.setCheckpoint(commit);
    await f.step();
  }
  for (let i = 0; i < 3; i++) await f.step(); // idle again: backs off from the start
  await f.stop();
  const flowing = commits.slice(1).map(() => 100);
  assert.deepEqual(gaps(source.reads), [100, 200, 400, 800, 1600, 2000, 2000, ...flowing, 100, 200, 400]);
  assert.deepEqual(f.seen, golden.messages.map((m) => m.sequence));
});

test("an idle minute costs 34 checkpoint reads (the old 1 s poll: 60; a 100 ms poll: 600)", async (t) => {
  const source = new CountingSource();
  const f = await follower(t, source);
  while (Date.now() < 60_000) await f.step();
  await f.stop();
  const inMinute = source.reads.filter((time) => time <= 60_000);
  // The first read, then polls at 100, 300, 700, 1500, 3100 ms and every 2 s after.
  assert.equal(inMinute.length, 1 + 5 + Math.floor((60_000 - 3100) / 2000));
});

test("the options set the first wait and the ceiling; a slow interval alone is its own ceiling", async (t) => {
  const viewer = new CountingSource();
  const f = await follower(t, viewer, { interval: 250, maxInterval: 1000 });
  for (let i = 0; i < 5; i++) await f.step();
  await f.stop();
  assert.deepEqual(gaps(viewer.reads), [250, 500, 1000, 1000, 1000]);
  t.mock.timers.reset();

  const slow = new CountingSource();
  const g = await follower(t, slow, { interval: 5000 });
  for (let i = 0; i < 3; i++) await g.step();
  await g.stop();
  assert.deepEqual(gaps(slow.reads), [5000, 5000, 5000]);
});

test("bad options: a TypeError naming the option, before anything is read", () => {
  const source = new CountingSource();
  const reader = new StreamReader(source);
  const cases = [
    [{ interval: 0 }, /follow: interval must be a positive finite number of ms up to 2147483647, not 0$/],
    [{ interval: -100 }, /follow: interval must be .*, not -100$/],
    [{ interval: NaN }, /follow: interval must be .*, not NaN$/],
    [{ interval: Infinity }, /follow: interval must be .*, not Infinity$/],
    [{ interval: "100" }, /follow: interval must be .*, not 100$/],
    [{ interval: null }, /follow: interval must be .*, not null$/],
    [{ interval: 2 ** 31 }, /follow: interval must be .*, not 2147483648$/],
    [{ maxInterval: 0 }, /follow: maxInterval must be a positive finite number of ms up to 2147483647, not 0$/],
    [{ maxInterval: -1 }, /follow: maxInterval must be .*, not -1$/],
    [{ maxInterval: Infinity }, /follow: maxInterval must be .*, not Infinity$/],
    [{ maxInterval: null }, /follow: maxInterval must be .*, not null$/],
    [{ maxInterval: 2 ** 40 }, /follow: maxInterval must be .*, not 1099511627776$/],
    [{ maxInterval: 50 }, /follow: maxInterval \(50 ms\) must not be below interval \(100 ms\)$/],
    [{ interval: 500, maxInterval: 200 }, /follow: maxInterval \(200 ms\) must not be below interval \(500 ms\)$/],
  ];
  for (const [options, message] of cases) {
    assert.throws(() => reader.follow(options), (error) => error instanceof TypeError && message.test(error.message), JSON.stringify(options));
  }
  assert.deepEqual(source.reads, []);
});
