// The MessageVault viewer: a static page that reads streams with the JavaScript reader.
//
// Served by `messagevault serve` at /ui/, it logs in with the server's Basic auth, lists
// the streams the user may read, and reads each one the cheapest way it can: straight
// from Azure storage with the SAS URL the stream's info hands out (the server is not in
// the way), or through the server's binary read route on file storage. Opened anywhere
// else (any static host), it reads one stream from a pasted SAS URL with no server at all.
//
// Data never reaches innerHTML: every value, key and name is set as text.

import {
  AzureSasSource,
  MessageVaultError,
  ServerReader,
  StreamReader,
  basicAuthorization,
} from "./messagevault.js";

const ROW = 28; // px, as --row in viewer.css
const BLOCK = 100; // messages loaded at a time
const MAX_BLOCKS = 80; // blocks kept in memory
const MAX_SPACER = 8_000_000; // px: browsers cap an element's height; longer streams scroll by proportion
const FILTER_PAGE = 500;
// Live on a direct stream: the checkpoint is read LIVE_FIRST_MS after news, the wait doubling
// while idle up to LIVE_CEILING_MS, which keeps the promise that a new message shows within a
// second, and an idle open page to one storage request a second.
const LIVE_FIRST_MS = 250;
const LIVE_CEILING_MS = 1000;
const LONG_POLL_S = 25; // server follow: one request waits this long for news
const LIST_REFRESH_MS = 10_000;
const RENEW_BEFORE_MS = 120_000; // a SAS URL is replaced this long before it expires
const PREVIEW_BYTES = 512;
const DETAIL_MAX_BYTES = 2 * 1024 * 1024;
const HEX_MAX_BYTES = 64 * 1024;

const $ = (id) => document.getElementById(id);
const utf8 = new TextDecoder("utf-8");
const utf8Strict = new TextDecoder("utf-8", { fatal: true });

// --- formatting -------------------------------------------------------------------------

const number = new Intl.NumberFormat("en-US");
const formatInt = (n) => number.format(n);

function formatBytes(n) {
  if (n < 1024) return `${n} B`;
  const units = ["KiB", "MiB", "GiB", "TiB"];
  let value = n;
  let unit = -1;
  while (value >= 1024 && unit < units.length - 1) {
    value /= 1024;
    unit += 1;
  }
  return `${value >= 100 ? value.toFixed(0) : value.toFixed(1)} ${units[unit]}`;
}

const formatTime = (ms) => new Date(ms).toISOString().replace("T", " ").replace("Z", "");

function formatAgo(ms) {
  const seconds = Math.max(0, Math.round((Date.now() - ms) / 1000));
  if (seconds < 60) return `${seconds} s ago`;
  if (seconds < 3600) return `${Math.floor(seconds / 60)} min ago`;
  if (seconds < 86400) return `${Math.floor(seconds / 3600)} h ago`;
  return `${Math.floor(seconds / 86400)} d ago`;
}

function hexOf(bytes, limit = bytes.length) {
  let out = "";
  for (let i = 0; i < Math.min(limit, bytes.length); i++) out += bytes[i].toString(16).padStart(2, "0");
  return out;
}

/** A key as text: UTF-8 when it is, else its bytes in hex (0x...). */
function keyText(key) {
  if (!key || key.length === 0) return "";
  try {
    return utf8Strict.decode(key);
  } catch {
    return `0x${hexOf(key, 64)}${key.length > 64 ? "…" : ""}`;
  }
}

const PRINTABLE = /^[^\u0000-\u0008\u000b\u000c\u000e-\u001f\u007f]*$/;

/** What a value is, decided once per message: json, text, binary, compressed or empty. */
function valueKind(m) {
  if (m.kind) return m.kind;
  if (m.compressed) m.kind = "compressed";
  else if (m.value.length === 0) m.kind = "empty";
  else {
    let text = null;
    try {
      text = utf8Strict.decode(m.value.length > DETAIL_MAX_BYTES ? m.value.subarray(0, DETAIL_MAX_BYTES) : m.value);
    } catch {
      text = null;
    }
    if (text === null || !PRINTABLE.test(text)) m.kind = "binary";
    else if (m.value.length <= DETAIL_MAX_BYTES && /^\s*[[{"\d\-tfn]/.test(text) && parses(text)) m.kind = "json";
    else m.kind = "text";
  }
  return m.kind;
}

function parses(text) {
  try {
    JSON.parse(text);
    return true;
  } catch {
    return false;
  }
}

function preview(m) {
  const kind = valueKind(m);
  if (kind === "compressed") return `zstd-compressed, ${formatBytes(m.size)} (not decoded in the browser)`;
  if (kind === "empty") return "(empty)";
  const head = m.value.subarray(0, PREVIEW_BYTES);
  if (kind === "binary") return `0x${hexOf(head, 48)}${m.value.length > 48 ? "…" : ""}`;
  let text = utf8.decode(head);
  if (kind === "json" && m.value.length <= PREVIEW_BYTES) text = JSON.stringify(JSON.parse(text));
  return text.replace(/\s+/g, " ");
}

// --- value rendering (detail pane) -------------------------------------------------------

/** Pretty JSON with token colours, built as text nodes. */
function jsonNodes(value) {
  const text = JSON.stringify(value, null, 2);
  const fragment = document.createDocumentFragment();
  const token = /("(?:\\.|[^"\\])*")(\s*:)?|\b(true|false|null)\b|(-?\d+(?:\.\d+)?(?:[eE][+-]?\d+)?)/g;
  let last = 0;
  for (const match of text.matchAll(token)) {
    fragment.append(text.slice(last, match.index));
    const span = document.createElement("span");
    if (match[1] !== undefined) {
      span.className = match[2] ? "k" : "s";
      span.textContent = match[1];
      fragment.append(span);
      if (match[2]) fragment.append(match[2]);
    } else {
      span.className = match[3] !== undefined ? "b" : "n";
      span.textContent = match[0];
      fragment.append(span);
    }
    last = match.index + match[0].length;
  }
  fragment.append(text.slice(last));
  return fragment;
}

function hexDump(bytes) {
  const lines = [];
  const shown = Math.min(bytes.length, HEX_MAX_BYTES);
  for (let at = 0; at < shown; at += 16) {
    const row = bytes.subarray(at, Math.min(at + 16, shown));
    const hex = Array.from(row, (b) => b.toString(16).padStart(2, "0")).join(" ");
    const ascii = Array.from(row, (b) => (b >= 0x20 && b < 0x7f ? String.fromCharCode(b) : ".")).join("");
    lines.push(`${at.toString(16).padStart(8, "0")}  ${hex.padEnd(47)}  |${ascii}|`);
  }
  if (bytes.length > shown) lines.push(`… ${formatInt(bytes.length - shown)} more bytes`);
  return lines.join("\n");
}

function renderValue(m, mode) {
  const target = $("detail-value");
  target.replaceChildren();
  target.classList.remove("hex");
  const kind = valueKind(m);
  if (kind === "compressed") {
    if (app.api && !app.standalone && app.session) {
      target.textContent = "zstd-compressed in storage: the server decodes it…";
      decodedByServer(app.session.name, m).then(
        (plain) => {
          if (list.selected === m.sequence) renderValue(plain, $("detail-mode").value);
        },
        (error) => {
          if (list.selected === m.sequence) target.textContent = `The server could not decode it: ${describe(error)}`;
        },
      );
      return;
    }
    target.textContent =
      `This value is zstd-compressed in storage (${formatInt(m.size)} bytes once decoded) and browsers have no zstd decoder.\n` +
      `Read it with the CLI: messagevault read ${app.session?.name ?? "STREAM"} --from ${m.position} -n 1`;
    return;
  }
  if (mode === "auto") mode = kind === "json" ? "json" : kind === "binary" ? "hex" : "text";
  const bytes = m.value.length > DETAIL_MAX_BYTES ? m.value.subarray(0, DETAIL_MAX_BYTES) : m.value;
  const cut = m.value.length > DETAIL_MAX_BYTES ? `\n… showing the first ${formatBytes(DETAIL_MAX_BYTES)} of ${formatBytes(m.value.length)}` : "";
  if (mode === "json") {
    let parsed;
    try {
      parsed = JSON.parse(utf8Strict.decode(m.value));
    } catch (error) {
      target.textContent = `Not JSON: ${error.message}`;
      return;
    }
    target.append(jsonNodes(parsed));
  } else if (mode === "text") {
    target.textContent = utf8.decode(bytes) + cut;
  } else {
    target.textContent = hexDump(m.value);
    target.classList.add("hex"); // lines as dumped, scrolled sideways rather than wrapped
  }
}

/** A compressed message with its value as the server's JSON read gives it, decoded. */
async function decodedByServer(stream, m) {
  if (m.decoded) return m.decoded;
  const answer = await app.api.get(`streams/${encodeURIComponent(stream)}/messages?from=${m.position}&limit=1`);
  const record = answer.messages[0];
  if (!record || record.sequence !== m.sequence) throw new MessageVaultError("ServerError", `no message ${m.sequence} at ${m.position}`);
  const value =
    record.encoding === "base64" ? Uint8Array.from(atob(record.value), (c) => c.charCodeAt(0)) : new TextEncoder().encode(record.value);
  m.decoded = { ...m, value, size: value.length, compressed: false, kind: undefined };
  return m.decoded;
}

// --- reading a stream: straight from storage, or through the server ----------------------

/** A stream read straight from Azure storage with a SAS URL. */
class DirectStream {
  constructor(location, { renew = null, expiresAt = null } = {}) {
    this.route = "straight from Azure storage";
    this.direct = true;
    this.renew = renew;
    this.useLocation(location, expiresAt);
    this.nextPositions = new Map(); // sequence -> its position, learnt from pages read
    this.firstOf = { position: -1, sequence: 0 };
  }

  useLocation(location, expiresAt) {
    this.location = location;
    this.expiresAt = expiresAt;
    this.reader = new StreamReader(new AzureSasSource(location), { compressed: "keep" });
  }

  async fresh() {
    // A SAS expires (an hour by default): take a new one from the server before it does.
    if (this.renew && this.expiresAt && Date.now() > this.expiresAt * 1000 - RENEW_BEFORE_MS) {
      const access = await this.renew();
      this.useLocation(access.location, access.expires_at);
    }
  }

  async state() {
    await this.fresh();
    const checkpoint = await this.reader.checkpoint();
    this.checkpoint = checkpoint;
    let first = 0;
    if (checkpoint.firstPosition >= checkpoint.length) first = checkpoint.nextSequence;
    else if (checkpoint.firstPosition > 0) {
      if (this.firstOf.position !== checkpoint.firstPosition) {
        const m = await this.firstMessage(checkpoint.firstPosition, checkpoint);
        this.firstOf = { position: checkpoint.firstPosition, sequence: m.sequence };
      }
      first = this.firstOf.sequence;
    }
    return {
      first,
      next: checkpoint.nextSequence,
      length: checkpoint.length,
      lastWrite: checkpoint.length ? checkpoint.lastTimestamp : null,
    };
  }

  async firstMessage(position, checkpoint) {
    for await (const m of this.reader.messages({ from: position, checkpoint })) return m;
    throw new MessageVaultError("InvalidPosition", `no message at position ${position}`);
  }

  async page(sequence, count) {
    await this.fresh();
    let checkpoint = this.checkpoint;
    if (!checkpoint || sequence >= checkpoint.nextSequence) {
      // Past what the last state() saw: Live may have shown newer messages since.
      checkpoint = this.checkpoint = await this.reader.checkpoint();
    }
    if (sequence >= checkpoint.nextSequence) return [];
    const from = this.nextPositions.get(sequence) ?? (await this.reader.seek({ sequence, checkpoint }));
    const out = [];
    for await (const m of this.reader.messages({ from, checkpoint })) {
      out.push(m);
      if (out.length >= count) break;
    }
    if (out.length) this.remember(out.at(-1));
    return out;
  }

  remember(m) {
    if (this.nextPositions.size > 1000) this.nextPositions.clear();
    this.nextPositions.set(m.sequence + 1, m.nextPosition);
  }

  async atPosition(position) {
    await this.fresh();
    const checkpoint = await this.reader.checkpoint();
    if (position >= checkpoint.length) return null;
    return this.firstMessage(position, checkpoint);
  }

  async sequenceAt(time) {
    await this.fresh();
    const checkpoint = await this.reader.checkpoint();
    const position = await this.reader.seek({ time, checkpoint });
    if (position >= checkpoint.length) return null;
    return (await this.firstMessage(position, checkpoint)).sequence;
  }

  /** Live, for as long as the page is open: the SAS is renewed between polls before it expires. */
  async *follow(from, signal) {
    let position = from;
    while (!signal.aborted) {
      await this.fresh();
      const round = new AbortController();
      const end = () => round.abort();
      signal.addEventListener("abort", end, { once: true });
      // Until the SAS is due for renewal (fresh() renews it), then a new round.
      const timer = this.renew && this.expiresAt ? setTimeout(end, Math.max(1000, this.expiresAt * 1000 - RENEW_BEFORE_MS - Date.now())) : 0;
      try {
        for await (const m of this.reader.follow({ from: position, signal: round.signal, interval: LIVE_FIRST_MS, maxInterval: LIVE_CEILING_MS })) {
          yield m;
          position = m.nextPosition;
        }
      } finally {
        clearTimeout(timer);
        signal.removeEventListener("abort", end);
      }
    }
  }
}

/** A stream read through the server's binary read route (file storage, or no CORS rule). */
class ServerStream {
  constructor(api, name) {
    this.route = "through the server";
    this.direct = false;
    this.api = api;
    this.name = name;
    this.reader = new ServerReader(api.base, name, { authorization: api.authorization, compressed: "keep" });
  }

  async state() {
    const info = await this.api.info(this.name);
    return {
      first: info.first_sequence ?? 0,
      next: info.messages,
      length: info.length,
      lastWrite: info.last_write ? Date.parse(info.last_write) : null,
    };
  }

  async page(sequence, count) {
    let answer = await this.reader.read({ fromSequence: sequence, limit: count });
    const out = answer.messages;
    // A read answers at most the server's byte limit: ask on from where it stopped.
    for (let reads = 1; out.length < count && answer.messages.length && reads < 20; reads++) {
      answer = await this.reader.read({ from: answer.next, limit: count - out.length });
      out.push(...answer.messages);
    }
    return out;
  }

  async atPosition(position) {
    const { messages } = await this.reader.read({ from: position, limit: 1 });
    return messages[0] ?? null;
  }

  async sequenceAt(time) {
    const { messages } = await this.reader.read({ fromTime: time, limit: 1 });
    return messages[0]?.sequence ?? null;
  }

  follow(from, signal) {
    return this.reader.follow({ from, signal, wait: LONG_POLL_S });
  }
}

class LoginNeeded extends Error {}

/** The server's JSON routes, with the logged-in user's credentials. */
class ServerApi {
  constructor(base, authorization = null) {
    this.base = base.replace(/\/$/, "");
    this.authorization = authorization ?? undefined;
  }

  async get(path) {
    const headers = { Accept: "application/json" };
    if (this.authorization) headers.Authorization = this.authorization;
    // credentials "omit": only the header above authenticates, and a 401 cannot make
    // the browser pop up its own login dialog.
    const response = await fetch(`${this.base}/${path}`, { headers, credentials: "omit" });
    if (response.status === 401) throw new LoginNeeded((await detailOf(response)) || "log in");
    if (!response.ok) {
      throw new MessageVaultError("ServerError", `${response.status}: ${(await detailOf(response)) || response.statusText}`);
    }
    return response.json();
  }

  streams() {
    return this.get("streams").then((answer) => answer.streams);
  }

  info(name) {
    return this.get(`streams/${encodeURIComponent(name)}`);
  }
}

async function detailOf(response) {
  try {
    return (await response.json()).detail ?? "";
  } catch {
    return "";
  }
}

/** Is the page served by a MessageVault server? {api, authorised} or null (static host). */
async function probeServer(authorization) {
  if (location.protocol !== "http:" && location.protocol !== "https:") return null;
  const base = new URL("../", location.href).href;
  const api = new ServerApi(base, authorization);
  try {
    await api.streams();
    return { api, authorised: true };
  } catch (error) {
    if (error instanceof LoginNeeded) return { api, authorised: false };
    return null;
  }
}

// --- the message list --------------------------------------------------------------------

/** A list of `count` rows of which only the visible ones exist in the DOM. */
class VirtualList {
  constructor({ rowAt, onNeed, onSelect }) {
    this.scroller = $("messages");
    this.spacer = $("spacer");
    this.rows = $("rows");
    this.count = 0;
    this.selected = null; // a sequence
    this.fresh = new Set(); // sequences that just arrived, flashed once
    Object.assign(this, { rowAt, onNeed, onSelect });
    this.scroller.addEventListener("scroll", () => this.schedule());
    new ResizeObserver(() => this.schedule()).observe(this.scroller);
    this.rows.addEventListener("click", (event) => {
      const row = event.target.closest(".row[data-sequence]");
      if (row) this.onSelect(Number(row.dataset.sequence));
    });
  }

  get visible() {
    return Math.max(1, Math.ceil(this.scroller.clientHeight / ROW));
  }

  get scaled() {
    return this.count * ROW > MAX_SPACER;
  }

  setCount(count) {
    this.count = count;
    this.spacer.style.height = `${Math.min(count * ROW, MAX_SPACER)}px`;
    this.schedule();
  }

  atEnd() {
    const s = this.scroller;
    return s.scrollTop + s.clientHeight >= s.scrollHeight - ROW;
  }

  firstIndex() {
    const s = this.scroller;
    if (!this.scaled) return Math.floor(s.scrollTop / ROW);
    const room = s.scrollHeight - s.clientHeight;
    return Math.round((room > 0 ? s.scrollTop / room : 0) * Math.max(0, this.count - this.visible));
  }

  scrollToIndex(index) {
    const s = this.scroller;
    if (!this.scaled) s.scrollTop = index * ROW;
    else s.scrollTop = (index / Math.max(1, this.count - this.visible)) * (s.scrollHeight - s.clientHeight);
    this.render();
  }

  scrollToEnd() {
    this.scroller.scrollTop = this.scroller.scrollHeight;
    this.render();
  }

  schedule() {
    if (this.pending) return;
    this.pending = requestAnimationFrame(() => {
      this.pending = 0;
      this.render();
    });
  }

  render() {
    const first = Math.min(this.firstIndex(), Math.max(0, this.count - 1));
    const last = Math.min(this.count, first + this.visible + 1);
    let top = this.scaled ? this.scroller.scrollTop : first * ROW;
    if (this.scaled && first >= this.count - this.visible) {
      // The last screen ends on the newest row, as an unscaled list's does: `visible` rows
      // are taller than the view, and put at the top they would cut it at the bottom.
      top -= Math.max(0, this.visible * ROW - this.scroller.clientHeight);
    }
    this.rows.style.top = `${top}px`;
    const fragment = document.createDocumentFragment();
    const missing = [];
    for (let i = first; i < last; i++) {
      const entry = this.rowAt(i);
      fragment.append(entry.message ? this.row(entry.message) : this.placeholder(entry.sequence));
      if (!entry.message) missing.push(i);
    }
    this.rows.replaceChildren(fragment);
    this.shown = { first, last };
    if (missing.length) this.onNeed(missing[0], missing.at(-1));
  }

  row(m) {
    const row = document.createElement("div");
    row.className = "row";
    row.dataset.sequence = m.sequence;
    row.dataset.position = m.position;
    if (m.sequence === this.selected) row.classList.add("selected");
    if (this.fresh.delete(m.sequence)) row.classList.add("fresh");
    const key = keyText(m.key);
    row.append(
      cell("seq", formatInt(m.sequence)),
      cell("time", formatTime(m.timestamp), new Date(m.timestamp).toString()),
      cell(key ? "key" : "key none", key || "no key", key),
      cell("size", formatBytes(m.size)),
      cell(valueKind(m) === "empty" || m.compressed ? "preview none" : "preview", preview(m)),
    );
    return row;
  }

  placeholder(sequence) {
    const row = document.createElement("div");
    row.className = "row loading";
    row.append(cell("seq", sequence === undefined ? "" : formatInt(sequence)), cell("time", "loading…"));
    return row;
  }
}

function cell(className, text, title) {
  const span = document.createElement("span");
  span.className = className;
  span.textContent = text;
  if (title) span.title = title;
  return span;
}

// --- one open stream ---------------------------------------------------------------------

class Session {
  constructor(name, source, list) {
    Object.assign(this, { name, source, list });
    this.state = { first: 0, next: 0, length: 0, lastWrite: null };
    this.blocks = new Map(); // block number -> Map(sequence -> message)
    this.loading = new Set();
    this.arrived = new Map(); // sequence -> message, from Live
    this.filter = null;
    this.stop = new AbortController();
    this.queue = [];
  }

  close() {
    this.stop.abort();
    this.filter?.stop.abort();
  }

  get closed() {
    return this.stop.signal.aborted;
  }

  /** The message at list row `index`: {message} or {sequence} while it loads. */
  rowAt(index) {
    if (this.filter) return { message: this.filter.matches[index] };
    const sequence = this.state.first + index;
    return { message: this.message(sequence), sequence };
  }

  message(sequence) {
    return this.blocks.get(Math.floor(sequence / BLOCK))?.get(sequence) ?? this.arrived.get(sequence);
  }

  indexOf(sequence) {
    return sequence - this.state.first;
  }

  need(firstIndex, lastIndex) {
    if (this.filter) return;
    const from = Math.floor((this.state.first + firstIndex) / BLOCK);
    const to = Math.floor((this.state.first + lastIndex) / BLOCK);
    for (let block = from; block <= to; block++) {
      if (!this.blocks.has(block) && !this.loading.has(block) && !this.queue.includes(block)) this.queue.push(block);
    }
    this.pump();
  }

  async pump() {
    if (this.pumping) return;
    this.pumping = true;
    try {
      while (this.queue.length && !this.closed) {
        const block = this.queue.pop(); // the latest asked for first: where the user is now
        const shown = this.list.shown ?? { first: 0, last: 0 };
        const lo = Math.floor((this.state.first + shown.first) / BLOCK) - 1;
        const hi = Math.floor((this.state.first + shown.last) / BLOCK) + 1;
        if (block < lo || block > hi) continue; // scrolled past it
        this.loading.add(block);
        try {
          await this.load(block);
        } finally {
          this.loading.delete(block);
        }
      }
    } catch (error) {
      if (!this.closed) showError(error);
    } finally {
      this.pumping = false;
    }
  }

  async load(block) {
    const start = Math.max(block * BLOCK, this.state.first);
    const end = Math.min((block + 1) * BLOCK, this.state.next);
    if (start >= end) return;
    const messages = await this.source.page(start, end - start);
    if (this.closed) return;
    const held = new Map();
    for (const m of messages) held.set(m.sequence, m);
    this.blocks.set(block, held);
    if (this.blocks.size > MAX_BLOCKS) this.blocks.delete(this.blocks.keys().next().value);
    this.list.render();
    const wanted = this.list.awaited;
    if (wanted === this.list.selected && held.has(wanted)) select(wanted);
  }

  async refresh() {
    const state = await this.source.state();
    if (this.closed) return;
    const trimmed = state.first !== this.state.first;
    this.state = state;
    if (trimmed) this.blocks.clear();
    // A block read before the stream grew may end short of the new length.
    const tail = Math.floor((state.next - 1) / BLOCK);
    if ((this.blocks.get(tail)?.size ?? BLOCK) < Math.min(BLOCK, state.next - Math.max(tail * BLOCK, state.first))) {
      this.blocks.delete(tail);
    }
    if (!this.filter) this.list.setCount(state.next - state.first);
    showStats(this);
  }

  /** Live: messages as they are committed, from the end known now. */
  async follow(signal) {
    document.body.dataset.live = "following";
    for await (const m of this.source.follow(this.state.length, signal)) {
      if (signal.aborted || this.closed) return;
      this.arrived.set(m.sequence, m);
      if (this.arrived.size > 20_000) this.arrived.delete(this.arrived.keys().next().value);
      if (this.source.remember) this.source.remember(m);
      const stick = this.list.atEnd();
      this.state.next = Math.max(this.state.next, m.sequence + 1);
      this.state.length = Math.max(this.state.length, m.nextPosition);
      this.state.lastWrite = m.timestamp;
      this.list.fresh.add(m.sequence);
      if (this.filter) {
        if (this.filter.matches && matchesKey(m, this.filter.text)) {
          this.filter.matches.push(m);
          this.list.setCount(this.filter.matches.length);
        }
      } else {
        this.list.setCount(this.state.next - this.state.first);
      }
      if (stick) this.list.scrollToEnd();
      showStats(this);
    }
  }
}

const matchesKey = (m, text) => keyText(m.key).includes(text);

// --- the page ----------------------------------------------------------------------------

const app = {
  api: null, // ServerApi when served by a server
  streams: [],
  session: null,
  live: null, // AbortController of the Live follow
  standalone: null, // {location, name} when reading a pasted SAS URL
};

const list = new VirtualList({
  rowAt: (index) => app.session?.rowAt(index) ?? {},
  onNeed: (first, last) => app.session?.need(first, last),
  onSelect: (sequence) => select(sequence),
});

function setStatus(text) {
  $("status").textContent = text;
}

function showError(error) {
  const text = error instanceof LoginNeeded ? "Your login is no longer accepted: log in again." : describe(error);
  $("error").textContent = text;
  if (error instanceof LoginNeeded) logout();
}

function clearError() {
  $("error").textContent = "";
}

function describe(error) {
  if (error instanceof TypeError && app.session?.source.direct) {
    return `The browser could not read Azure storage (${error.message}). The storage account needs a CORS rule for ${location.origin}: messagevault cors allow ${location.origin}`;
  }
  // The server's own words, without the request URL the reader's message starts with.
  if (error?.code === "ServerError" && error.detail) return error.detail;
  return error?.message ?? String(error);
}

function showStats(session) {
  if (session !== app.session) return;
  const { first, next, length, lastWrite } = session.state;
  const parts = [`${formatInt(next - first)} messages`, formatBytes(length)];
  if (first > 0) parts.push(`from sequence ${formatInt(first)}`);
  if (lastWrite) parts.push(`last write ${formatAgo(lastWrite)}`);
  $("stream-stats").textContent = parts.join(" · ");
  $("stream-stats").title = lastWrite ? `last write ${new Date(lastWrite).toISOString()}` : "";
  // The list's row for this stream says what the open stream says, between list refreshes.
  const listed = app.streams.find((s) => s.stream === session.name);
  if (listed && listed.messages !== next) {
    Object.assign(listed, { messages: next, length, last_write: lastWrite ? new Date(lastWrite).toISOString() : null });
    renderStreams();
  }
}

async function openStream(name, { sequence = null } = {}) {
  app.session?.close();
  stopLive();
  clearError();
  $("placeholder").hidden = true;
  $("stream-view").hidden = false;
  $("detail").hidden = true;
  $("filter-key").value = "";
  $("stream-title").textContent = name;
  $("stream-stats").textContent = "";
  $("stream-route").textContent = "";
  list.selected = null;
  list.setCount(0);
  highlightStream(name);
  setStatus(`opening ${name}…`);
  let source;
  try {
    source = await sourceFor(name);
  } catch (error) {
    showError(error);
    setStatus("");
    return;
  }
  const session = new Session(name, source, list);
  app.session = session;
  $("stream-route").textContent = `read ${source.route}`;
  $("stream-route").title = source.direct
    ? "The page reads the stream's blobs itself with a read-only SAS: the server does no work for it."
    : "The page reads frames through the server's binary read route and checks them itself.";
  try {
    await session.refresh();
  } catch (error) {
    if (session === app.session) showError(error);
    return;
  }
  if (session !== app.session) return;
  setStatus("");
  updateHash();
  if (sequence !== null && sequence >= session.state.first && sequence < session.state.next) {
    list.scrollToIndex(session.indexOf(sequence));
    select(sequence);
  } else {
    list.scrollToEnd();
  }
  $("tail").checked = true;
  startLive();
}

/** How to read `name`: straight from Azure when its read access is a SAS URL and CORS allows it. */
async function sourceFor(name) {
  if (app.standalone) return new DirectStream(app.standalone.location);
  const info = await app.api.info(name);
  const access = info.read_access;
  if (access?.kind === "azure-sas") {
    const direct = new DirectStream(access.location, {
      expiresAt: access.expires_at,
      renew: async () => (await app.api.info(name)).read_access,
    });
    try {
      await direct.reader.checkpoint();
      return direct;
    } catch (error) {
      if (!(error instanceof TypeError)) throw error;
      // Blocked by the browser (no CORS rule for this origin): the server can still read it.
      const fallback = new ServerStream(app.api, name);
      fallback.route = "through the server (no CORS rule lets this page read Azure itself)";
      return fallback;
    }
  }
  return new ServerStream(app.api, name);
}

function startLive() {
  stopLive();
  const session = app.session;
  if (!session || !$("tail").checked) return;
  const live = new AbortController();
  app.live = live;
  session
    .follow(live.signal)
    .catch((error) => {
      if (!live.signal.aborted && session === app.session) {
        showError(error);
        $("tail").checked = false;
      }
    })
    .finally(() => {
      if (app.live === live) delete document.body.dataset.live;
    });
}

function stopLive() {
  app.live?.abort();
  app.live = null;
  delete document.body.dataset.live;
}

function select(sequence) {
  const session = app.session;
  const m = session?.message(sequence) ?? session?.filter?.matches.find((x) => x.sequence === sequence);
  list.selected = sequence;
  list.render();
  // A jump selects a message before its block is read: load() shows it when it arrives.
  list.awaited = m ? null : sequence;
  if (!m) return;
  $("detail").hidden = false;
  $("detail-title").textContent = `Message ${formatInt(m.sequence)}`;
  const fields = [
    ["Sequence", formatInt(m.sequence)],
    ["Position", String(m.position)],
    ["Id", m.id],
    ["Time", `${new Date(m.timestamp).toISOString()} (${formatAgo(m.timestamp)})`],
    ["Key", keyText(m.key) || "(none)"],
    ["Size", `${formatInt(m.size)} bytes${m.compressed ? ", zstd-compressed" : ""}`],
  ];
  $("detail-fields").replaceChildren(
    ...fields.flatMap(([name, value]) => {
      const dt = document.createElement("dt");
      dt.textContent = name;
      const dd = document.createElement("dd");
      dd.textContent = value;
      return [dt, dd];
    }),
  );
  renderValue(m, $("detail-mode").value);
  updateHash();
}

function moveSelection(step) {
  const session = app.session;
  if (!session || list.selected === null) return;
  let index;
  if (session.filter) {
    index = session.filter.matches.findIndex((m) => m.sequence === list.selected) + step;
    if (index < 0 || index >= session.filter.matches.length) return;
    select(session.filter.matches[index].sequence);
  } else {
    index = session.indexOf(list.selected) + step;
    if (index < 0 || index >= list.count) return;
    select(session.state.first + index);
  }
  const { first, last } = list.shown;
  if (index < first + 1 || index >= last - 2) list.scrollToIndex(Math.max(0, index - Math.floor(list.visible / 2)));
}

// --- jump and filter ----------------------------------------------------------------------

function parseWhole(text, what) {
  const cleaned = text.trim().replace(/[_,\s]/g, "");
  if (!/^\d+$/.test(cleaned) || !Number.isSafeInteger(Number(cleaned))) {
    throw new MessageVaultError("InvalidInput", `${what} must be a whole number, not "${text.trim()}"`);
  }
  return Number(cleaned);
}

/** An RFC 3339 time (UTC when it names no zone, as the list shows) or milliseconds. */
function parseMoment(text) {
  const trimmed = text.trim();
  if (/^\d{10,}$/.test(trimmed)) return Number(trimmed);
  const zoned = /(?:Z|[+-]\d\d:?\d\d)$/i.test(trimmed) ? trimmed : `${trimmed}Z`;
  const ms = /^\d{4}-\d\d-\d\d/.test(trimmed) ? Date.parse(zoned.replace(" ", "T")) : Number.NaN;
  if (Number.isNaN(ms)) {
    throw new MessageVaultError("InvalidInput", `"${trimmed}" is not a time: write it as 2026-12-01T14:00:00Z (UTC without a zone) or milliseconds`);
  }
  return ms;
}

async function jump(kind, text) {
  const session = app.session;
  if (!session) return;
  clearError();
  if (!text.trim()) throw new MessageVaultError("InvalidInput", `type a ${kind} to jump to`);
  if (session.filter) clearFilter();
  let sequence;
  if (kind === "sequence") {
    sequence = parseWhole(text, "a sequence");
    await session.refresh();
    const { first, next } = session.state;
    if (next === first) throw new MessageVaultError("InvalidPosition", "the stream has no messages");
    if (sequence < first || sequence >= next) {
      throw new MessageVaultError(
        "InvalidPosition",
        `no sequence ${formatInt(sequence)}: the stream holds ${formatInt(first)} to ${formatInt(next - 1)}`,
      );
    }
  } else if (kind === "position") {
    const position = parseWhole(text, "a position");
    const m = await session.source.atPosition(position);
    if (!m) throw new MessageVaultError("InvalidPosition", `position ${formatInt(position)} is at or past the end (${formatInt(session.state.length)})`);
    await session.refresh();
    sequence = m.sequence;
  } else {
    const moment = parseMoment(text);
    sequence = await session.source.sequenceAt(moment);
    await session.refresh();
    if (sequence === null) {
      list.scrollToEnd();
      throw new MessageVaultError("InvalidPosition", `no message at or after ${new Date(moment).toISOString()}: showing the newest`);
    }
  }
  if (session !== app.session) return;
  list.scrollToIndex(Math.max(0, session.indexOf(sequence)));
  select(sequence);
}

function clearFilter() {
  const session = app.session;
  if (!session?.filter) return;
  session.filter.stop.abort();
  session.filter = null;
  $("filter-key").value = "";
  list.setCount(session.state.next - session.state.first);
  setStatus("");
}

async function applyFilter(text) {
  const session = app.session;
  if (!session) return;
  session.filter?.stop.abort();
  if (!text) {
    session.filter = null;
    list.setCount(session.state.next - session.state.first);
    list.scrollToEnd();
    setStatus("");
    return;
  }
  const filter = { text, matches: [], stop: new AbortController() };
  session.filter = filter;
  list.setCount(0);
  clearError();
  const { first } = session.state;
  let sequence = first;
  try {
    while (!filter.stop.signal.aborted && sequence < session.state.next) {
      const page = await session.source.page(sequence, FILTER_PAGE);
      if (filter.stop.signal.aborted || !page.length) break;
      for (const m of page) if (matchesKey(m, text)) filter.matches.push(m);
      sequence = page.at(-1).sequence + 1;
      list.setCount(filter.matches.length);
      setStatus(`key contains "${text}": ${formatInt(filter.matches.length)} of ${formatInt(sequence - first)} messages scanned`);
    }
    if (!filter.stop.signal.aborted) {
      setStatus(`key contains "${text}": ${formatInt(filter.matches.length)} of ${formatInt(sequence - first)} messages`);
    }
  } catch (error) {
    if (!filter.stop.signal.aborted) showError(error);
  }
}

// --- the stream list ------------------------------------------------------------------

async function loadStreams() {
  if (app.standalone) {
    app.streams = [{ stream: app.standalone.name }];
  } else {
    app.streams = await app.api.streams();
  }
  renderStreams();
}

function renderStreams() {
  const search = $("stream-search").value.trim();
  const shown = app.streams.filter((s) => s.stream.includes(search));
  const rows = shown.map((s) => {
    const tr = document.createElement("tr");
    tr.className = "stream";
    tr.dataset.stream = s.stream;
    const last = s.last_write ? Date.parse(s.last_write) : null;
    const name = document.createElement("td");
    name.className = "name";
    name.textContent = s.stream;
    name.title = s.stream;
    tr.append(
      name,
      numeric("count", s.messages === undefined ? "" : formatInt(s.messages)),
      numeric("length", s.length === undefined ? "" : formatBytes(s.length)),
      numeric("last-write", last ? formatAgo(last) : s.messages === undefined ? "" : "never", last ? new Date(last).toISOString() : ""),
    );
    if (app.session?.name === s.stream) tr.classList.add("selected");
    return tr;
  });
  $("streams").tBodies[0].replaceChildren(...rows);
  $("streams-empty").hidden = app.streams.length > 0;
}

function numeric(className, text, title) {
  const td = document.createElement("td");
  td.className = `num ${className}`;
  td.textContent = text;
  if (title) td.title = title;
  return td;
}

function highlightStream(name) {
  for (const tr of $("streams").querySelectorAll("tr.stream")) tr.classList.toggle("selected", tr.dataset.stream === name);
}

// --- address (#stream=...&seq=...) -------------------------------------------------------

function readHash() {
  // The SAS URL comes last and whole (#seq=5&sas=https://...?sv=...&sig=...): its own
  // query has & in it, pasted by hand or written by updateHash.
  const hash = location.hash.slice(1);
  const at = hash.search(/(^|&)sas=/);
  const sasPart = at < 0 ? null : hash.slice(hash.indexOf("sas=", at) + 4);
  const params = new URLSearchParams(at < 0 ? hash : hash.slice(0, at));
  const seq = params.get("seq");
  const sas = sasPart && /^https?%3A/i.test(sasPart) ? decodeURIComponent(sasPart) : sasPart;
  return { stream: params.get("stream"), sas, sequence: seq !== null && /^\d+$/.test(seq) ? Number(seq) : null };
}

function updateHash() {
  const params = new URLSearchParams();
  if (!app.standalone && app.session) params.set("stream", app.session.name);
  if (list.selected !== null) params.set("seq", String(list.selected));
  const sas = app.standalone ? `${params.size ? "&" : ""}sas=${app.standalone.location}` : "";
  history.replaceState(null, "", `#${params}${sas}`);
}

// --- login and start -----------------------------------------------------------------------

const CREDENTIALS = "messagevault.authorization";

function showWelcome({ login, sasTitle }) {
  $("app").hidden = true;
  $("welcome").hidden = false;
  $("login").hidden = !login;
  $("sas-title").textContent = sasTitle;
  (login ? $("login-user") : $("sas-url")).focus();
}

async function enterApp(hash) {
  $("welcome").hidden = true;
  $("app").hidden = false;
  $("logout").hidden = !app.api?.authorization && !app.standalone;
  $("logout").textContent = app.standalone ? "Close" : "Log out";
  await loadStreams();
  const wanted = app.standalone ? app.standalone.name : hash.stream;
  if (wanted && app.streams.some((s) => s.stream === wanted)) await openStream(wanted, { sequence: hash.sequence });
  else if (app.streams.length === 1) await openStream(app.streams[0].stream);
}

function logout() {
  sessionStorage.removeItem(CREDENTIALS);
  app.session?.close();
  app.session = null;
  stopLive();
  location.hash = "";
  location.reload();
}

/** A pasted SAS URL: the container of one stream (mv-<stream>). */
function standaloneFrom(text) {
  let url;
  try {
    url = new URL(text.trim());
  } catch {
    throw new MessageVaultError("InvalidInput", "paste the whole SAS URL, starting https://");
  }
  if (url.protocol !== "https:" && url.protocol !== "http:") throw new MessageVaultError("InvalidInput", "a SAS URL starts https://");
  if (!url.searchParams.get("sig")) throw new MessageVaultError("InvalidInput", "this URL has no SAS signature (sig=): use the read access location the server hands out");
  const container = url.pathname.replace(/\/$/, "").split("/").pop();
  if (!container?.startsWith("mv-")) throw new MessageVaultError("InvalidInput", `"${container}" is not a MessageVault stream container (mv-<stream>)`);
  return { location: url.href, name: container.slice(3) };
}

async function openStandalone(text) {
  app.standalone = standaloneFrom(text);
  $("connection").textContent = `Azure storage · ${new URL(app.standalone.location).host}`;
  // Check that the URL reads before leaving the form: a bad SAS is an error here.
  await new DirectStream(app.standalone.location).state();
  await enterApp({});
}

function bind() {
  $("login").addEventListener("submit", async (event) => {
    event.preventDefault();
    $("login-error").textContent = "";
    const authorization = basicAuthorization($("login-user").value, $("login-password").value);
    const api = new ServerApi(app.api.base, authorization);
    try {
      await api.streams();
    } catch (error) {
      $("login-error").textContent = error instanceof LoginNeeded ? "Unknown user or wrong password." : describe(error);
      return;
    }
    sessionStorage.setItem(CREDENTIALS, authorization);
    app.api = api;
    $("whoami").textContent = $("login-user").value;
    $("login-password").value = "";
    await enterApp(readHash()).catch(showError);
  });
  $("sas").addEventListener("submit", async (event) => {
    event.preventDefault();
    $("sas-error").textContent = "";
    try {
      await openStandalone($("sas-url").value);
    } catch (error) {
      app.standalone = null;
      $("sas-error").textContent =
        error instanceof TypeError
          ? `The browser could not read that URL (${error.message}): check it, and that the account has a CORS rule for ${location.origin}.`
          : describe(error);
    }
  });
  $("logout").addEventListener("click", logout);
  $("streams").addEventListener("click", (event) => {
    const row = event.target.closest("tr.stream");
    if (row) openStream(row.dataset.stream);
  });
  $("stream-search").addEventListener("input", renderStreams);
  $("streams-refresh").addEventListener("click", () => loadStreams().catch(showError));
  $("jump").addEventListener("submit", (event) => {
    event.preventDefault();
    jump($("jump-kind").value, $("jump-value").value).catch(showError);
  });
  $("jump-kind").addEventListener("change", () => {
    const examples = { sequence: "e.g. 1000", position: "e.g. 52428", time: "2026-12-01T14:00Z" };
    $("jump-value").placeholder = examples[$("jump-kind").value];
  });
  // Going somewhere else leaves a refused jump behind: its reason goes too.
  $("jump-first").addEventListener("click", () => {
    clearError();
    clearFilter();
    list.scrollToIndex(0);
  });
  $("jump-last").addEventListener("click", () => {
    clearError();
    list.scrollToEnd();
  });
  let filterTimer = 0;
  $("filter-key").addEventListener("input", () => {
    clearTimeout(filterTimer);
    filterTimer = setTimeout(() => applyFilter($("filter-key").value), 250);
  });
  $("tail").addEventListener("change", () => {
    if ($("tail").checked) {
      app.session
        ?.refresh()
        .then(() => {
          list.scrollToEnd();
          startLive();
        })
        .catch(showError);
    } else {
      stopLive();
    }
  });
  $("detail-mode").addEventListener("change", () => {
    if (list.selected !== null) select(list.selected);
  });
  $("detail-close").addEventListener("click", () => {
    $("detail").hidden = true;
    list.selected = null;
    list.render();
    updateHash();
  });
  $("detail-copy").addEventListener("click", async () => {
    const m = app.session?.message(list.selected) ?? app.session?.filter?.matches.find((x) => x.sequence === list.selected);
    if (!m || m.compressed) return;
    await navigator.clipboard.writeText(valueKind(m) === "binary" ? hexOf(m.value) : utf8.decode(m.value)).catch(showError);
  });
  $("messages").addEventListener("keydown", (event) => {
    if (event.key === "ArrowDown" || event.key === "ArrowUp") {
      event.preventDefault();
      moveSelection(event.key === "ArrowDown" ? 1 : -1);
    }
  });
  setInterval(() => {
    if (!app.api || app.standalone || document.hidden || $("app").hidden) return;
    loadStreams().catch(() => {}); // the next refresh tries again; reading goes on meanwhile
  }, LIST_REFRESH_MS);
}

async function start() {
  bind();
  const hash = readHash();
  if (hash.sas) {
    try {
      await openStandalone(hash.sas);
      return;
    } catch (error) {
      app.standalone = null;
      $("sas-url").value = hash.sas;
      $("sas-error").textContent = describe(error);
    }
  }
  const probe = await probeServer(sessionStorage.getItem(CREDENTIALS));
  if (probe === null) {
    showWelcome({ login: false, sasTitle: "Open a stream from Azure storage" });
    $("connection").textContent = "no MessageVault server here: reading Azure storage directly";
    return;
  }
  app.api = probe.api;
  $("connection").textContent = `server ${probe.api.base}`;
  $("download-line").hidden = false;
  if (!probe.authorised) {
    sessionStorage.removeItem(CREDENTIALS);
    showWelcome({ login: true, sasTitle: "Or open a stream from a SAS URL" });
    return;
  }
  if (probe.api.authorization) {
    $("whoami").textContent = userOf(probe.api.authorization);
  }
  await enterApp(hash);
}

function userOf(authorization) {
  try {
    const binary = atob(authorization.slice(6));
    const bytes = Uint8Array.from(binary, (c) => c.charCodeAt(0));
    return utf8.decode(bytes).split(":")[0];
  } catch {
    return "";
  }
}

start().catch(showError);
