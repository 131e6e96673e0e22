// A reader of the MessageVault storage format (docs/FORMAT.md), for browsers and Node.
// An ES module with no build step and no dependencies: it reads frames v1 and v2,
// checkpoints and the sparse index from a buffer, a ranged URL, an Azure SAS URL or the
// server's binary read route, checking every CRC before handing anything out.

const FRAME_MAGIC = 0x424c564d; // "MVLB" read little-endian
const CHECKPOINT_MAGIC = 0x5043564d; // "MVCP"
const INDEX_MAGIC = 0x5849564d; // "MVIX"
const V1_HEADER = 64;
const V2_HEADER = 96;
const CHECKPOINT_SIZE = 64;
const INDEX_HEADER_SIZE = 64;
const ENTRY_SIZE = 32;
const MAX_FRAME = 16 * 1024 * 1024;
const MAX_COUNT = 100_000;
const COMPRESSED = 0x01;
const HEAD = 0x02;
const CONTINUATION = 0x04;
const KNOWN_FLAGS = 0x1f;
const SCAN_WINDOW = 256 * 1024;
const HOP_WINDOW = 4096;
export const BATCH_TYPE = "application/x-messagevault-batch";

/** Every failure names its kind (`code`) and, where it has one, the stream position. */
export class MessageVaultError extends Error {
  constructor(code, message, position = undefined) {
    super(message);
    this.name = "MessageVaultError";
    this.code = code;
    this.position = position;
  }
}

const corrupt = (message, position) => new MessageVaultError("CorruptData", message, position);

// --- CRC-32/ISO-HDLC, as zlib.crc32 --------------------------------------------------

const CRC_TABLE = (() => {
  const table = new Uint32Array(256);
  for (let n = 0; n < 256; n++) {
    let c = n;
    for (let k = 0; k < 8; k++) c = c & 1 ? 0xedb88320 ^ (c >>> 1) : c >>> 1;
    table[n] = c >>> 0;
  }
  return table;
})();

export function crc32(bytes, start = 0, end = bytes.length) {
  let crc = 0xffffffff;
  for (let i = start; i < end; i++) crc = CRC_TABLE[(crc ^ bytes[i]) & 0xff] ^ (crc >>> 8);
  return (crc ^ 0xffffffff) >>> 0;
}

// --- bytes ----------------------------------------------------------------------------

function asBytes(data) {
  if (data instanceof Uint8Array) return data;
  if (data instanceof ArrayBuffer) return new Uint8Array(data);
  if (ArrayBuffer.isView(data)) return new Uint8Array(data.buffer, data.byteOffset, data.byteLength);
  throw new TypeError("expected an ArrayBuffer or a Uint8Array");
}

const view = (bytes) => new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);

function u64(dv, offset, what, position) {
  const value = dv.getBigUint64(offset, true);
  if (value > BigInt(Number.MAX_SAFE_INTEGER)) {
    throw corrupt(`${what} ${value} is beyond what this reader handles`, position);
  }
  return Number(value);
}

const hex = (bytes) => Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
const utf8 = new TextDecoder("utf-8");
const utf8Encoder = new TextEncoder();
// Called as a plain function: a browser refuses window.fetch called as a method of another object.
const browserFetch = (...args) => globalThis.fetch(...args);
const utf8Strict = new TextDecoder("utf-8", { fatal: true });

/** A message's value as UTF-8 text (an error if it is not UTF-8). */
export const valueText = (message) => utf8Strict.decode(message.value);
/** A message's value parsed as JSON. */
export const valueJson = (message) => JSON.parse(valueText(message));
/** A message's key as text (keys are type names; invalid UTF-8 shows as U+FFFD). */
export const keyText = (message) => utf8.decode(message.key);

/** The 16-byte id of docs/FORMAT.md as 32 hex digits: timestamp · position · sequence mod 2^32. */
export function messageId(timestamp, position, sequence) {
  const part = (value, digits) => value.toString(16).padStart(digits, "0");
  return part(timestamp, 12) + part(position, 12) + part(sequence % 2 ** 32, 8);
}

// --- frame headers --------------------------------------------------------------------

/**
 * The checked header of the frame at `offset` of `bytes`, which sits at stream position
 * `position`. Needs only the header's bytes; the body is checked by decodeFrame.
 */
export function decodeHeader(bytes, offset, position) {
  bytes = asBytes(bytes);
  if (bytes.length - offset < V1_HEADER) {
    throw corrupt(`frame at ${position}: ${bytes.length - offset} bytes, too few for a header`, position);
  }
  const dv = new DataView(bytes.buffer, bytes.byteOffset + offset, bytes.length - offset);
  if (dv.getUint32(0, true) !== FRAME_MAGIC) throw corrupt(`no frame at position ${position} (bad magic)`, position);
  const version = dv.getUint8(4);
  const flags = dv.getUint8(5);
  const headerSize = dv.getUint16(6, true);
  if (version !== 1 && version !== 2) {
    throw new MessageVaultError("UnsupportedVersion", `frame at ${position} has version ${version}`, position);
  }
  const expectedSize = version === 1 ? V1_HEADER : V2_HEADER;
  if (headerSize !== expectedSize) throw corrupt(`frame at ${position}: header size ${headerSize}`, position);
  if (bytes.length - offset < headerSize) throw corrupt(`frame at ${position}: header cut short`, position);
  const storedCrc = dv.getUint32(headerSize - 4, true);
  if (crc32(bytes, offset, offset + headerSize - 4) !== storedCrc) {
    throw corrupt(`frame at ${position}: header CRC mismatch`, position);
  }
  if ((version === 1 && flags !== 0) || flags & ~KNOWN_FLAGS) {
    throw new MessageVaultError("UnsupportedVersion", `frame at ${position} has unknown flags 0x${flags.toString(16)}`, position);
  }
  const header = {
    position,
    version,
    flags,
    headerSize,
    frameSize: dv.getUint32(8, true),
    count: dv.getUint32(12, true),
    basePosition: u64(dv, 16, "base position", position),
    baseSequence: u64(dv, 24, "base sequence", position),
    timestamp: u64(dv, 32, "timestamp", position),
    keysSize: dv.getUint32(40, true),
    valuesSize: dv.getUint32(44, true),
    bodyCrc: dv.getUint32(48, true),
    producerId: version === 2 ? hex(bytes.subarray(offset + 52, offset + 68)) : "0".repeat(32),
    producerSeq: version === 2 ? u64(dv, 68, "producer sequence", position) : 0,
    chunk: version === 2 ? u64(dv, 76, "chunk", position) : 0,
  };
  header.end = position + header.frameSize;
  header.isHead = (flags & HEAD) !== 0;
  header.isContinuation = (flags & CONTINUATION) !== 0;
  header.isCompressed = (flags & COMPRESSED) !== 0;
  if (header.basePosition !== position) {
    throw corrupt(`frame at ${position} claims position ${header.basePosition}`, position);
  }
  if (header.frameSize > MAX_FRAME) throw corrupt(`frame at ${position}: size ${header.frameSize} over 16 MiB`, position);
  if (header.isHead && header.isContinuation) throw corrupt(`frame at ${position}: both HEAD and CONTINUATION`, position);
  if (header.isContinuation) {
    if (header.count !== 0 || header.keysSize !== 0 || header.frameSize !== headerSize + header.valuesSize) {
      throw corrupt(`frame at ${position}: a CONTINUATION whose sizes do not add up`, position);
    }
  } else {
    if (header.count < 1 || header.count > MAX_COUNT || (header.isHead && header.count !== 1)) {
      throw corrupt(`frame at ${position}: count ${header.count}`, position);
    }
    if (header.frameSize !== headerSize + 9 * header.count + header.keysSize + header.valuesSize) {
      throw corrupt(`frame at ${position}: sizes do not add up`, position);
    }
  }
  header.messageCount = header.isContinuation ? 0 : header.count;
  return header;
}

/** Position of message `i` of the frame whose header is `header`. */
export const messagePosition = (header, i) => (i === 0 ? header.position : header.position + header.headerSize + 4 * i);

/**
 * Decodes the whole frame at `offset` of `bytes` (stream position `position`): both CRCs and
 * the columns. Returns {header, keys, values} (values as stored: compressed or a piece).
 */
export function decodeFrame(bytes, offset, position) {
  bytes = asBytes(bytes);
  const header = decodeHeader(bytes, offset, position);
  if (bytes.length - offset < header.frameSize) throw corrupt(`frame at ${position} is cut short`, position);
  const bodyStart = offset + header.headerSize;
  const frameEnd = offset + header.frameSize;
  if (crc32(bytes, bodyStart, frameEnd) !== header.bodyCrc) {
    throw corrupt(`frame at ${position}: body CRC mismatch`, position);
  }
  if (header.isContinuation) return { header, keys: [], values: [bytes.subarray(bodyStart, frameEnd)] };
  const n = header.count;
  const dv = new DataView(bytes.buffer, bytes.byteOffset + bodyStart, header.frameSize - header.headerSize);
  const valueLengths = new Array(n);
  let valuesTotal = 0;
  let keysTotal = 0;
  for (let i = 0; i < n; i++) {
    if (dv.getUint32(4 * i, true) !== i) throw corrupt(`frame at ${position}: slot ${i} is damaged`, position);
    valueLengths[i] = dv.getUint32(4 * n + 4 * i, true);
    valuesTotal += valueLengths[i];
    keysTotal += dv.getUint8(8 * n + i);
  }
  if (keysTotal !== header.keysSize) throw corrupt(`frame at ${position}: key lengths do not add up`, position);
  if (!header.isCompressed && valuesTotal !== header.valuesSize) {
    throw corrupt(`frame at ${position}: value lengths do not add up`, position);
  }
  if (header.isCompressed && valuesTotal > MAX_FRAME && !header.isHead) {
    throw corrupt(`frame at ${position}: values unpack to more than 16 MiB`, position);
  }
  const keys = new Array(n);
  let at = bodyStart + 9 * n;
  for (let i = 0; i < n; i++) {
    const size = dv.getUint8(8 * n + i);
    keys[i] = bytes.subarray(at, at + size);
    at += size;
  }
  const stored = bytes.subarray(at, frameEnd);
  let values;
  if (header.isCompressed || header.isHead) {
    values = { stored, lengths: valueLengths };
  } else {
    values = new Array(n);
    for (let i = 0; i < n; i++) {
      values[i] = bytes.subarray(at, at + valueLengths[i]);
      at += valueLengths[i];
    }
  }
  return { header, keys, values };
}

function message(header, i, key, value, nextPosition, size = value?.length) {
  const position = messagePosition(header, i);
  const sequence = header.baseSequence + i;
  const m = {
    position,
    nextPosition,
    sequence,
    id: messageId(header.timestamp, position, sequence),
    key,
    value,
    size,
    timestamp: header.timestamp,
    time: new Date(header.timestamp),
  };
  // Only with {compressed: "keep"} and no decoder: the value is unknown here, its size is not.
  if (value === null) m.compressed = true;
  return m;
}

/**
 * The content size a zstd frame declares in its header (writers always declare it), read
 * without decoding: a value compressed whole and cut in pieces states its size only there.
 */
export function zstdContentSize(bytes, position) {
  const bad = (why) => corrupt(`compressed values at ${position}: ${why}`, position);
  if (bytes.length < 6 || view(bytes).getUint32(0, true) !== 0xfd2fb528) throw bad("not a zstd frame");
  const descriptor = bytes[4];
  const sizeFlag = descriptor >> 6;
  const singleSegment = (descriptor >> 5) & 1;
  const dictionaryBytes = [0, 1, 2, 4][descriptor & 3];
  const sizeBytes = [singleSegment ? 1 : 0, 2, 4, 8][sizeFlag];
  if (sizeBytes === 0) throw bad("the zstd frame does not declare its size");
  const at = 5 + (singleSegment ? 0 : 1) + dictionaryBytes;
  if (bytes.length < at + sizeBytes) throw bad("zstd frame header cut short");
  const dv = new DataView(bytes.buffer, bytes.byteOffset + at, sizeBytes);
  if (sizeBytes === 1) return dv.getUint8(0);
  if (sizeBytes === 2) return dv.getUint16(0, true) + 256;
  if (sizeBytes === 4) return dv.getUint32(0, true);
  const size = dv.getBigUint64(0, true);
  if (size > BigInt(Number.MAX_SAFE_INTEGER)) throw bad(`declared size ${size}`);
  return Number(size);
}

/** {compressed: "keep"} without a decoder: compressed values come as `value: null, compressed: true`. */
const keepsCompressed = (options) => !options.decompress && options.compressed === "keep";

function decompressed(header, stored, size, options) {
  if (!options.decompress) {
    throw new MessageVaultError(
      "Compressed",
      `frame at ${header.position} holds zstd-compressed values, which this reader cannot decode without a decompress option`,
      header.position,
    );
  }
  const out = asBytes(options.decompress(stored, size));
  if (out.length !== size) throw corrupt(`frame at ${header.position}: values unpack to ${out.length} bytes, not ${size}`, header.position);
  return out;
}

/** The messages of a decoded (non-HEAD) frame, from message `skip` on, made as asked for. */
function* frameMessages(frame, skip, options) {
  const { header, keys } = frame;
  let values = frame.values;
  if (header.isCompressed) {
    const total = values.lengths.reduce((a, b) => a + b, 0);
    const declared = zstdContentSize(values.stored, header.position);
    if (declared !== total) throw corrupt(`frame at ${header.position}: zstd declares ${declared} bytes, the lengths ${total}`, header.position);
    if (keepsCompressed(options)) {
      for (let i = skip; i < header.count; i++) {
        const next = i + 1 < header.count ? messagePosition(header, i + 1) : header.end;
        yield message(header, i, keys[i], null, next, frame.values.lengths[i]);
      }
      return;
    }
    const plain = decompressed(header, values.stored, total, options);
    values = [];
    let at = 0;
    for (const size of frame.values.lengths) {
      values.push(plain.subarray(at, at + size));
      at += size;
    }
  }
  for (let i = skip; i < header.count; i++) {
    const next = i + 1 < header.count ? messagePosition(header, i + 1) : header.end;
    yield message(header, i, keys[i], values[i], next);
  }
}

/** Joins a HEAD frame and its CONTINUATION frames into the one message they hold. */
function joinedMessage(head, pieces, options) {
  const total = head.header.chunk;
  const value = new Uint8Array(total);
  let at = 0;
  for (const piece of pieces) {
    if (at + piece.length > total) throw corrupt(`value at ${head.header.position}: pieces exceed its size`, head.header.position);
    value.set(piece, at);
    at += piece.length;
  }
  if (at !== total) throw corrupt(`value at ${head.header.position}: pieces short of its size`, head.header.position);
  if (!head.header.isCompressed) return { value, size: total };
  const size = zstdContentSize(value, head.header.position);
  if (keepsCompressed(options)) return { value: null, size };
  return { value: decompressed(head.header, value, size, options), size };
}

// --- checkpoint -----------------------------------------------------------------------

/** Decodes a 64-byte checkpoint (version 1 or 2). */
export function decodeCheckpoint(bytes) {
  bytes = asBytes(bytes);
  if (bytes.length !== CHECKPOINT_SIZE) throw corrupt(`checkpoint: ${bytes.length} bytes, not 64`);
  const dv = view(bytes);
  if (dv.getUint32(0, true) !== CHECKPOINT_MAGIC) throw corrupt("checkpoint: bad magic");
  if (crc32(bytes, 0, 60) !== dv.getUint32(60, true)) throw corrupt("checkpoint: CRC mismatch");
  const version = dv.getUint8(4);
  if (version !== 1 && version !== 2) {
    throw new MessageVaultError("UnsupportedVersion", `checkpoint version ${version}`);
  }
  const checkpoint = {
    version,
    commit: u64(dv, 8, "commit"),
    length: u64(dv, 16, "length"),
    nextSequence: u64(dv, 24, "next sequence"),
    lastFramePosition: u64(dv, 32, "last frame position"),
    lastTimestamp: u64(dv, 40, "last timestamp"),
    firstPosition: u64(dv, 48, "first position"),
  };
  if (version === 1 && bytes.subarray(48, 60).some((b) => b !== 0)) {
    throw corrupt("checkpoint: version 1 with bytes 48-59 not zero");
  }
  return checked(checkpoint);
}

/**
 * The checkpoint file of file storage (`<root>/<stream>/checkpoint`): two 64-byte slots
 * written alternately, so a torn write spoils only one; the valid slot with the higher
 * commit is the checkpoint.
 */
export function decodeCheckpointFile(bytes) {
  bytes = asBytes(bytes);
  let best = null;
  let problem = null;
  for (const start of [0, CHECKPOINT_SIZE]) {
    if (bytes.length < start + CHECKPOINT_SIZE) break;
    try {
      const slot = decodeCheckpoint(bytes.subarray(start, start + CHECKPOINT_SIZE));
      if (best === null || slot.commit > best.commit) best = slot;
    } catch (error) {
      problem = error;
    }
  }
  if (best === null) throw problem ?? corrupt(`checkpoint: ${bytes.length} bytes, not 64`);
  return best;
}

function checked(checkpoint) {
  if (checkpoint.firstPosition > checkpoint.length) {
    throw corrupt(`checkpoint: first position ${checkpoint.firstPosition} past length ${checkpoint.length}`);
  }
  return checkpoint;
}

/** A checkpoint from Azure blob metadata (names with or without the x-ms-meta- prefix). */
export function checkpointFromMetadata(metadata) {
  const get = (name, fallback) => {
    const value = metadata[name] ?? metadata[`x-ms-meta-${name}`];
    if (value === undefined || value === null) {
      if (fallback !== undefined) return fallback;
      throw corrupt(`checkpoint metadata lacks ${name}`);
    }
    if (!/^[0-9]{1,16}$/.test(String(value))) throw corrupt(`checkpoint metadata ${name} is not a number: ${value}`);
    return Number(value);
  };
  const version = get("formatversion", 1);
  if (version !== 1 && version !== 2) throw new MessageVaultError("UnsupportedVersion", `checkpoint version ${version}`);
  return checked({
    version,
    commit: get("commit"),
    length: get("length"),
    nextSequence: get("nextsequence"),
    lastFramePosition: get("lastframeposition"),
    lastTimestamp: get("lasttimestamp"),
    firstPosition: version === 2 ? get("firstposition") : 0,
  });
}

// --- index ----------------------------------------------------------------------------

/** Null if the 64-byte index header is sound, else what is wrong with it. */
export function indexHeaderProblem(bytes) {
  bytes = asBytes(bytes);
  if (bytes.length < INDEX_HEADER_SIZE) return "index header cut short";
  const dv = view(bytes);
  if (dv.getUint32(0, true) !== INDEX_MAGIC) return "index: bad magic";
  if (crc32(bytes, 0, 60) !== dv.getUint32(60, true)) return "index: header CRC mismatch";
  if (dv.getUint8(4) !== 1) return `index version ${dv.getUint8(4)}`;
  if (dv.getUint32(8, true) !== ENTRY_SIZE) return "index: entry size is not 32";
  return null;
}

/** The entry in `bytes` at `offset`, or null when its CRC fails or it is all zeros. */
export function decodeIndexEntry(bytes, offset = 0) {
  bytes = asBytes(bytes);
  if (bytes.length - offset < ENTRY_SIZE) return null;
  const dv = new DataView(bytes.buffer, bytes.byteOffset + offset, ENTRY_SIZE);
  if (bytes.subarray(offset, offset + ENTRY_SIZE).every((b) => b === 0)) return null;
  if (crc32(bytes, offset, offset + 28) !== dv.getUint32(28, true)) return null;
  const big = BigInt(Number.MAX_SAFE_INTEGER);
  const fields = [0, 8, 16].map((at) => dv.getBigUint64(at, true));
  if (fields.some((value) => value > big)) return null;
  const [position, sequence, timestamp] = fields.map(Number);
  return { position, sequence, timestamp };
}

// --- sources --------------------------------------------------------------------------
// A source gives: checkpoint() -> checkpoint; read(position, size) -> Uint8Array;
// indexSize() -> bytes (0 without an index); readIndex(offset, size) -> Uint8Array.

/** A stream held in memory: its data, checkpoint (bytes or object) and optional index. */
export class BufferSource {
  constructor({ data, checkpoint, index } = {}) {
    this.data = asBytes(data ?? new Uint8Array(0));
    this._checkpoint = checkpoint;
    this.index = index ? asBytes(index) : new Uint8Array(0);
    this.remote = false;
  }

  async checkpoint() {
    const given = this._checkpoint;
    if (given === undefined) {
      return { version: 1, commit: 0, length: this.data.length, nextSequence: 0, lastFramePosition: 0, lastTimestamp: 0, firstPosition: 0, assumed: true };
    }
    if (given instanceof Uint8Array || given instanceof ArrayBuffer) return decodeCheckpoint(given);
    return given;
  }

  /** A new checkpoint (bytes or object), as a writer commits: followers see it on their next poll. */
  setCheckpoint(checkpoint) {
    this._checkpoint = checkpoint;
  }

  async read(position, size) {
    if (position + size > this.data.length) throw corrupt(`data ends at ${this.data.length}, before ${position + size}`, position);
    return this.data.subarray(position, position + size);
  }

  async indexSize() {
    return this.index.length;
  }

  async readIndex(offset, size) {
    return this.index.subarray(offset, offset + size);
  }
}

async function ranged(fetchFn, url, position, size, headers = {}) {
  if (size === 0) return new Uint8Array(0);
  const response = await fetchFn(url, { headers: { ...headers, Range: `bytes=${position}-${position + size - 1}` } });
  if (response.status !== 206 && response.status !== 200) {
    throw new MessageVaultError("StorageError", `GET ${stripQuery(url)} bytes ${position}+${size}: HTTP ${response.status}`, position);
  }
  let bytes = new Uint8Array(await response.arrayBuffer());
  if (response.status === 200) bytes = bytes.subarray(position, position + size);
  if (bytes.length !== size) {
    throw new MessageVaultError("StorageError", `GET ${stripQuery(url)}: ${bytes.length} bytes at ${position}, not ${size}`, position);
  }
  return bytes;
}

const stripQuery = (url) => String(url).split("?")[0];

/**
 * A stream served as plain files over HTTP(S) with Range support: `dataUrl`, `checkpointUrl`
 * (the 64-byte checkpoint) and optionally `indexUrl`.
 */
export class HttpRangeSource {
  constructor({ dataUrl, checkpointUrl, indexUrl, headers = {}, fetch: fetchFn = browserFetch }) {
    Object.assign(this, { dataUrl, checkpointUrl, indexUrl, headers, fetchFn });
    this.remote = true;
  }

  async checkpoint() {
    const response = await this.fetchFn(this.checkpointUrl, { headers: this.headers });
    if (!response.ok) throw new MessageVaultError("StorageError", `GET ${stripQuery(this.checkpointUrl)}: HTTP ${response.status}`);
    // 64 bytes, or file storage's checkpoint file of two slots.
    return decodeCheckpointFile(new Uint8Array(await response.arrayBuffer()));
  }

  read(position, size) {
    return ranged(this.fetchFn, this.dataUrl, position, size, this.headers);
  }

  async indexSize() {
    if (!this.indexUrl) return 0;
    const response = await this.fetchFn(this.indexUrl, { method: "HEAD", headers: this.headers });
    if (response.status === 404) return 0;
    if (!response.ok) throw new MessageVaultError("StorageError", `HEAD ${stripQuery(this.indexUrl)}: HTTP ${response.status}`);
    return Number(response.headers.get("content-length") ?? 0);
  }

  readIndex(offset, size) {
    return ranged(this.fetchFn, this.indexUrl, offset, size, this.headers);
  }
}

/**
 * A stream on Azure read with the container SAS URL the server hands out in
 * `read_access.location` (https://account/.../mv-<stream>?<sas>).
 */
export class AzureSasSource extends HttpRangeSource {
  constructor(location, { fetch: fetchFn = browserFetch } = {}) {
    const url = new URL(location);
    const blob = (name) => {
      const u = new URL(url);
      u.pathname = `${url.pathname.replace(/\/$/, "")}/${name}`;
      return u.toString();
    };
    super({ dataUrl: blob("data"), checkpointUrl: blob("checkpoint"), indexUrl: blob("index"), fetch: fetchFn });
  }

  async checkpoint() {
    const response = await this.fetchFn(this.checkpointUrl, { method: "HEAD", headers: this.headers });
    if (!response.ok) throw new MessageVaultError("StorageError", `HEAD ${stripQuery(this.checkpointUrl)}: HTTP ${response.status}`);
    const metadata = {};
    response.headers.forEach((value, name) => {
      if (name.toLowerCase().startsWith("x-ms-meta-")) metadata[name.toLowerCase().slice(10)] = value;
    });
    return checkpointFromMetadata(metadata);
  }
}

// --- reading --------------------------------------------------------------------------

/** Frame headers from `position` up to `end`, read in 256 KiB windows (index.py's walk). */
class HeaderWalk {
  constructor(source, end) {
    Object.assign(this, { source, end, window: new Uint8Array(0), windowAt: 0, reads: 0 });
  }

  async header(position) {
    let offset = position - this.windowAt;
    if (offset < 0 || offset + Math.min(V2_HEADER, this.end - position) > this.window.length) {
      const jumped = offset - this.window.length >= 0 && this.window.length > 0;
      const size = jumped && offset > SCAN_WINDOW ? HOP_WINDOW : SCAN_WINDOW;
      this.window = await this.source.read(position, Math.min(size, this.end - position));
      this.windowAt = position;
      offset = 0;
      this.reads += 1;
    }
    const header = decodeHeader(this.window, offset, position);
    if (header.end > this.end) throw corrupt(`frame at ${position} runs past the committed length ${this.end}`, position);
    return header;
  }

  async *headers(position) {
    while (position < this.end) {
      const header = await this.header(position);
      yield header;
      position = header.end;
    }
  }
}

function trimmedError(checkpoint, detail) {
  return new MessageVaultError(
    "PositionTrimmed",
    `the stream was trimmed: its first readable position is ${checkpoint.firstPosition}; ${detail}`,
    checkpoint.firstPosition,
  );
}

/** Reads a stream from a source: decoding, seeking with the index, following. */
export class StreamReader {
  /** options.decompress(bytes, size) -> Uint8Array: a zstd decoder, if you have one. */
  constructor(source, options = {}) {
    this.source = source;
    this.options = options;
  }

  checkpoint() {
    return this.source.checkpoint();
  }

  /** The frame start and message index for message position `position`. */
  async locate(position, checkpoint) {
    if (!Number.isSafeInteger(position) || position < 0) {
      throw new MessageVaultError("InvalidPosition", `position must be a non-negative integer, not ${position}`);
    }
    if (position < checkpoint.firstPosition) throw trimmedError(checkpoint, `position ${position} is gone`);
    if (position > checkpoint.length) {
      throw new MessageVaultError("InvalidPosition", `position ${position} is past the stream's length ${checkpoint.length}`, position);
    }
    // The first readable position is a frame start by the checkpoint's word: damage there
    // is reported as damage by the frame loop, not as "no message here".
    if (position === checkpoint.length || position === checkpoint.firstPosition) return { start: position, skip: 0 };
    const notMessage = () => new MessageVaultError("InvalidPosition", `${position} is not the position of a message`, position);
    // A whole window: when a frame starts here, reading goes on from these bytes (on
    // Azure, one round trip fewer per read).
    const near = await this.source.read(position, Math.min(SCAN_WINDOW, checkpoint.length - position));
    let header = null;
    try {
      header = decodeHeader(near, 0, position);
    } catch {
      header = null;
    }
    if (header) {
      if (header.isContinuation) {
        throw new MessageVaultError("InvalidPosition", `${position} is a piece of the value at position ${header.chunk}, not a message`, position);
      }
      return { start: position, skip: 0, prefetched: near };
    }
    if (near.length < 4) throw notMessage();
    const slot = view(near).getUint32(0, true);
    for (const size of [V1_HEADER, V2_HEADER]) {
      const start = position - size - 4 * slot;
      if (slot < 1 || start < checkpoint.firstPosition) continue;
      let found;
      try {
        found = decodeHeader(await this.source.read(start, Math.min(size, checkpoint.length - start)), 0, start);
      } catch {
        continue;
      }
      if (found.headerSize === size && !found.isContinuation && slot < found.count) return { start, skip: slot };
    }
    throw notMessage();
  }

  /**
   * Messages from `from` (a message position; default the first readable) up to the
   * checkpoint's length (or `checkpoint.length` given). An async iterator.
   */
  async *messages({ from, checkpoint } = {}) {
    checkpoint = checkpoint ?? (await this.checkpoint());
    const { start, skip, prefetched } = await this.locate(from ?? checkpoint.firstPosition, checkpoint);
    yield* this._frames(start, skip, checkpoint.length, prefetched);
  }

  async *_frames(position, skip, end, prefetched = new Uint8Array(0)) {
    let buffer = prefetched;
    let bufferAt = position;
    const need = async (at, size) => {
      if (at < bufferAt || at + size > bufferAt + buffer.length) {
        buffer = await this.source.read(at, Math.min(Math.max(size, SCAN_WINDOW), end - at));
        bufferAt = at;
      }
      return at - bufferAt;
    };
    while (position < end) {
      let offset = await need(position, Math.min(V2_HEADER, end - position));
      const header = decodeHeader(buffer, offset, position);
      if (header.end > end) throw corrupt(`frame at ${position} runs past the committed length ${end}`, position);
      if (header.isContinuation) {
        throw new MessageVaultError("InvalidPosition", `${position} is a piece of the value at position ${header.chunk}, not a message`, position);
      }
      offset = await need(position, header.frameSize);
      const frame = decodeFrame(buffer, offset, position);
      if (!header.isHead) {
        yield* frameMessages(frame, skip, this.options);
        position = header.end;
        skip = 0;
        continue;
      }
      // Pieces are copied out of the window as they come: the window is reused.
      const pieces = [frame.values.stored.slice()];
      const key = frame.keys[0].slice();
      let got = pieces[0].length;
      let at = header.end;
      while (got < header.chunk) {
        if (at >= end) throw corrupt(`value at ${position}: its pieces run past the committed length`, position);
        const o = await need(at, Math.min(V2_HEADER, end - at));
        const pieceHeader = decodeHeader(buffer, o, at);
        if (!pieceHeader.isContinuation || pieceHeader.chunk !== position) {
          throw corrupt(`value at ${position}: frame at ${at} is not its next piece`, at);
        }
        const pieceOffset = await need(at, pieceHeader.frameSize);
        const piece = decodeFrame(buffer, pieceOffset, at);
        pieces.push(piece.values[0].slice());
        got += piece.values[0].length;
        at = pieceHeader.end;
      }
      const joined = joinedMessage(frame, pieces, this.options);
      yield message(header, 0, key, joined.value, at, joined.size);
      position = at;
      skip = 0;
    }
  }

  async _searchIndex(checkpoint, atOrBefore) {
    const size = await this.source.indexSize();
    const slots = Math.floor((size - INDEX_HEADER_SIZE) / ENTRY_SIZE);
    if (slots <= 0) return null;
    const blockSize = this.source.remote ? 16384 : 4096;
    const cache = new Map();
    const block = async (number) => {
      if (!cache.has(number)) {
        const at = number * blockSize;
        cache.set(number, await this.source.readIndex(at, Math.min(blockSize, size - at)));
      }
      return cache.get(number);
    };
    const readAt = async (offset, length) => {
      const first = Math.floor(offset / blockSize);
      const last = Math.floor((offset + length - 1) / blockSize);
      const parts = [];
      for (let n = first; n <= last; n++) parts.push(await block(n));
      const joined = new Uint8Array(parts.reduce((a, p) => a + p.length, 0));
      let at = 0;
      for (const part of parts) {
        joined.set(part, at);
        at += part.length;
      }
      return joined.subarray(offset - first * blockSize, offset - first * blockSize + length);
    };
    if (indexHeaderProblem(await readAt(0, INDEX_HEADER_SIZE)) !== null) return null;
    let best = null;
    let low = 0;
    let high = slots;
    while (low < high) {
      const middle = Math.floor((low + high) / 2);
      const entry = decodeIndexEntry(await readAt(INDEX_HEADER_SIZE + ENTRY_SIZE * middle, ENTRY_SIZE));
      if (entry !== null && entry.position < checkpoint.length && atOrBefore(entry)) {
        if (best === null || entry.position > best.position) best = entry;
        low = middle + 1;
      } else {
        high = middle;
      }
    }
    return best;
  }

  async _checkedStart(walk, checkpoint, entry) {
    if (entry === null || entry.position <= checkpoint.firstPosition) return checkpoint.firstPosition;
    let header = null;
    try {
      header = await walk.header(entry.position);
    } catch {
      header = null;
    }
    const agrees =
      header !== null &&
      !header.isContinuation &&
      header.baseSequence === entry.sequence &&
      header.timestamp === entry.timestamp;
    return agrees ? entry.position : checkpoint.firstPosition;
  }

  /**
   * Where message `sequence` is, or the first message at or after `time` (a Date or ms),
   * as in src/messagevault/index.py: the index says where to start, frame headers answer.
   */
  async seek({ sequence, time, checkpoint } = {}) {
    checkpoint = checkpoint ?? (await this.checkpoint());
    if ((sequence === undefined) === (time === undefined)) throw new TypeError("seek needs exactly one of sequence and time");
    const walk = new HeaderWalk(this.source, checkpoint.length);
    if (sequence !== undefined) {
      if (!Number.isSafeInteger(sequence) || sequence < 0) {
        throw new MessageVaultError("InvalidPosition", `sequence must be a non-negative integer, not ${sequence}`);
      }
      if (sequence > checkpoint.nextSequence) {
        throw new MessageVaultError("InvalidPosition", `the stream has ${checkpoint.nextSequence} messages; there is no sequence ${sequence} yet`);
      }
      if (sequence === checkpoint.nextSequence) return checkpoint.length;
      if (checkpoint.firstPosition >= checkpoint.length) throw trimmedError(checkpoint, `sequence ${sequence} is gone`);
      const entry = await this._searchIndex(checkpoint, (e) => e.sequence <= sequence);
      for await (const header of walk.headers(await this._checkedStart(walk, checkpoint, entry))) {
        if (header.isContinuation) continue;
        if (sequence < header.baseSequence) {
          throw trimmedError(checkpoint, `its first readable message is sequence ${header.baseSequence}; sequence ${sequence} is gone`);
        }
        if (sequence < header.baseSequence + header.messageCount) return messagePosition(header, sequence - header.baseSequence);
      }
      throw corrupt(`no frame holds sequence ${sequence} although the checkpoint counts ${checkpoint.nextSequence} messages`, checkpoint.length);
    }
    const timestamp = time instanceof Date ? time.getTime() : time;
    if (!Number.isSafeInteger(timestamp) || timestamp < 0) throw new TypeError(`time must be a Date or non-negative milliseconds, not ${time}`);
    if (checkpoint.firstPosition >= checkpoint.length) return checkpoint.length;
    const entry = await this._searchIndex(checkpoint, (e) => e.timestamp < timestamp);
    for await (const header of walk.headers(await this._checkedStart(walk, checkpoint, entry))) {
      if (!header.isContinuation && header.timestamp >= timestamp) return header.position;
    }
    return checkpoint.length;
  }

  /**
   * Follows the stream: yields messages from `from` on as commits land, until `signal`
   * (an AbortSignal) aborts. The checkpoint is polled `interval` ms after the last news;
   * each poll that finds nothing doubles the wait, up to `maxInterval` ms (by default
   * 2000, or `interval` if that is longer).
   */
  follow({ from, signal, interval = 100, maxInterval } = {}) {
    // A caller who asked for a slow interval alone gets that pace, not an error.
    if (maxInterval === undefined) maxInterval = typeof interval === "number" ? Math.max(2000, interval) : 2000;
    // Checked here rather than in the generator, so a bad option fails at the call.
    for (const [name, value] of [["interval", interval], ["maxInterval", maxInterval]]) {
      // setTimeout takes a longer wait as 1 ms, which would poll flat out.
      if (typeof value !== "number" || !Number.isFinite(value) || value <= 0 || value > MAX_TIMER_MS) {
        throw new TypeError(`follow: ${name} must be a positive finite number of ms up to ${MAX_TIMER_MS}, not ${String(value)}`);
      }
    }
    if (maxInterval < interval) {
      throw new TypeError(`follow: maxInterval (${maxInterval} ms) must not be below interval (${interval} ms)`);
    }
    return this._follow(from, signal, interval, maxInterval);
  }

  async *_follow(from, signal, interval, maxInterval) {
    let checkpoint = await this.checkpoint();
    let position = from ?? checkpoint.firstPosition;
    let wait = interval;
    while (!signal?.aborted) {
      if (position < checkpoint.length) {
        for await (const m of this.messages({ from: position, checkpoint })) {
          yield m;
          position = m.nextPosition;
          if (signal?.aborted) return;
        }
      }
      await sleep(wait, signal);
      if (signal?.aborted) return;
      const before = checkpoint.length;
      checkpoint = await this.checkpoint();
      // Every poll is a billed storage request: an idle follower slows to one per
      // maxInterval, and news brings back the fast pace, since more tends to follow.
      wait = checkpoint.length > before ? interval : Math.min(wait * 2, maxInterval);
    }
  }
}

const MAX_TIMER_MS = 2 ** 31 - 1;

function sleep(ms, signal) {
  return new Promise((resolve) => {
    const timer = setTimeout(done, ms);
    function done() {
      clearTimeout(timer);
      signal?.removeEventListener("abort", done);
      resolve();
    }
    signal?.addEventListener("abort", done, { once: true });
  });
}

/** An `Authorization` header for HTTP Basic: UTF-8 user and password, as the server reads them. */
export function basicAuthorization(username, password = "") {
  const bytes = utf8Encoder.encode(`${username}:${password}`);
  let binary = "";
  for (const byte of bytes) binary += String.fromCharCode(byte);
  return `Basic ${btoa(binary)}`;
}

/** Decodes a run of whole frames (such as a binary read's body): messages after `skip`. */
export function decodeFrames(data, { skip = 0, decompress, compressed } = {}) {
  const bytes = asBytes(data);
  const out = [];
  let offset = 0;
  const options = { decompress, compressed };
  const base = bytes.length >= V1_HEADER ? decodeHeader(bytes, 0, Number(view(bytes).getBigUint64(16, true))).position : 0;
  while (offset < bytes.length) {
    const frame = decodeFrame(bytes, offset, base + offset);
    const { header } = frame;
    if (header.isContinuation) throw corrupt(`frame at ${header.position}: a piece without its head`, header.position);
    if (!header.isHead) {
      out.push(...frameMessages(frame, skip, options));
      offset += header.frameSize;
    } else {
      const pieces = [frame.values.stored];
      let got = pieces[0].length;
      let at = offset + header.frameSize;
      while (got < header.chunk) {
        if (at >= bytes.length) throw corrupt(`value at ${header.position}: pieces missing`, header.position);
        const piece = decodeFrame(bytes, at, base + at);
        if (!piece.header.isContinuation || piece.header.chunk !== header.position) {
          throw corrupt(`value at ${header.position}: frame at ${base + at} is not its next piece`, base + at);
        }
        pieces.push(piece.values[0]);
        got += piece.values[0].length;
        at += piece.header.frameSize;
      }
      const joined = joinedMessage(frame, pieces, options);
      out.push(message(header, 0, frame.keys[0], joined.value, base + at, joined.size));
      offset = at;
    }
    skip = 0;
  }
  return out;
}

/**
 * Reads through the server's binary read route (GET /streams/{s}/messages with
 * Accept: application/x-messagevault-batch); frames are checked here, CRCs included.
 */
export class ServerReader {
  constructor(baseUrl, stream, { username, password, authorization, fetch: fetchFn = browserFetch, decompress, compressed } = {}) {
    this.baseUrl = String(baseUrl).replace(/\/$/, "");
    this.stream = stream;
    this.fetchFn = fetchFn;
    this.decompress = decompress;
    this.compressed = compressed;
    this.headers = { Accept: BATCH_TYPE };
    if (username !== undefined) this.headers.Authorization = basicAuthorization(username, password);
    else if (authorization !== undefined) this.headers.Authorization = authorization;
  }

  /** One read: {messages, next, position}. `from` a position, or fromSequence / fromTime. */
  async read({ from, fromSequence, fromTime, limit, wait, signal } = {}) {
    const query = new URLSearchParams();
    if (from !== undefined) query.set("from", String(from));
    if (fromSequence !== undefined) query.set("from_sequence", String(fromSequence));
    if (fromTime !== undefined) query.set("from_time", String(fromTime instanceof Date ? fromTime.getTime() : fromTime));
    if (limit !== undefined) query.set("limit", String(limit));
    if (wait !== undefined) query.set("wait", String(wait));
    const url = `${this.baseUrl}/streams/${encodeURIComponent(this.stream)}/messages?${query}`;
    // credentials "omit": the Authorization header above is the only credential sent, and a
    // 401 cannot make a browser show its own login dialog.
    const response = await this.fetchFn(url, { headers: this.headers, signal, credentials: "omit" });
    if (!response.ok) {
      let detail = "";
      try {
        detail = (await response.json()).detail ?? "";
      } catch {
        detail = "";
      }
      const error = new MessageVaultError("ServerError", `GET ${url}: HTTP ${response.status} ${detail}`.trim());
      error.status = response.status;
      error.detail = detail;
      throw error;
    }
    const body = new Uint8Array(await response.arrayBuffer());
    const skip = Number(response.headers.get("x-skip") ?? 0);
    const next = Number(response.headers.get("x-next"));
    const position = Number(response.headers.get("x-position"));
    if (!Number.isSafeInteger(next)) throw new MessageVaultError("ServerError", `GET ${url}: the answer has no X-Next header`);
    const messages = body.length ? decodeFrames(body, { skip, decompress: this.decompress, compressed: this.compressed }) : [];
    return { messages, next, position };
  }

  /** Messages from `from` on, as they come (long polls of `wait` seconds) until `signal` aborts. */
  async *follow({ from = 0, signal, wait = 1 } = {}) {
    let position = from;
    while (!signal?.aborted) {
      let answer;
      try {
        answer = await this.read({ from: position, wait, signal });
      } catch (error) {
        if (signal?.aborted) return;
        throw error;
      }
      for (const m of answer.messages) yield m;
      position = answer.next;
    }
  }
}
