// The Durable Streams reference server (Node, file-backed) on 127.0.0.1 and a free port.
// Prints its URL as the first line on stdout, then runs until SIGTERM or SIGINT.
// Usage: node reference_server.mjs DATA_DIR [LONG_POLL_TIMEOUT_MS]
import { DurableStreamTestServer } from "@durable-streams/server"

const [dataDir, longPoll] = process.argv.slice(2)
if (!dataDir) {
  console.error("usage: node reference_server.mjs DATA_DIR [LONG_POLL_TIMEOUT_MS]")
  process.exit(2)
}
const options = { port: 0, host: "127.0.0.1", dataDir }
if (longPoll !== undefined) {
  options.longPollTimeout = Number(longPoll)
}
const server = new DurableStreamTestServer(options)
await server.start()
console.log(server.url)

let stopping = false
async function stop() {
  if (stopping) return
  stopping = true
  await server.stop()
  process.exit(0)
}
process.on("SIGTERM", stop)
process.on("SIGINT", stop)
