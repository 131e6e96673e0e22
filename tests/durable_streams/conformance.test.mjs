// The official Durable Streams conformance suite, run by vitest against the server at DS_URL.
// The suite's own CLI finds no test files here (vitest skips node_modules), so it runs from this file.
import { describe } from "vitest"
import { runConformanceTests } from "@durable-streams/server-conformance-tests"

const baseUrl = process.env.DS_URL
if (!baseUrl) {
  throw new Error("DS_URL is not set: the server's base URL, e.g. http://127.0.0.1:8080")
}

const options = { baseUrl }
// How long the server holds a long poll; the suite waits that plus a second for it.
if (process.env.DS_LONG_POLL_TIMEOUT_MS) {
  options.longPollTimeoutMs = Number(process.env.DS_LONG_POLL_TIMEOUT_MS)
}

describe("server", () => {
  runConformanceTests(options)
})
