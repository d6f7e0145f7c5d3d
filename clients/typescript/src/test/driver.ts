// Drives a LedgerClient (default settings) for a test that acts on the server
// meanwhile, e.g. restarts it (tests/e2e/test_clients.py). Not a node:test file.
//
//   LEDGER_ADDRESS=127.0.0.1:50051 [LEDGER_TOKEN=...] \
//   [LEDGER_CA=ca.pem [LEDGER_CERT=client.pem LEDGER_KEY=client.key]] node dist/test/driver.js <ledger>
//
// It initializes the ledger's counter and follows its stream. Commands on
// stdin, one a line: "post <key>", "stop". Events on stdout, one JSON a line:
// ready, streamed, posted, post_failed, stream_failed, done.
import { readFileSync } from "node:fs";
import { createInterface } from "node:readline";
import { Code, ConnectError } from "@connectrpc/connect";
import { LedgerClient, errorReason } from "../index.js";

const ledger = process.argv[2];
if (!ledger) throw new Error("usage: driver.js <ledger>");
const pem = (name: string) => {
  const path = process.env[name];
  return path ? readFileSync(path) : undefined;
};
const [ca, cert, key] = [pem("LEDGER_CA"), pem("LEDGER_CERT"), pem("LEDGER_KEY")];
const scheme = ca ? "https" : "http";
const client = new LedgerClient(`${scheme}://${process.env.LEDGER_ADDRESS}`, {
  token: process.env.LEDGER_TOKEN,
  ca,
  cert,
  key,
});

function say(event: Record<string, unknown>): void {
  const text = JSON.stringify(event, (_key, value) => (typeof value === "bigint" ? value.toString() : value));
  process.stdout.write(`${text}\n`);
}

function failure(error: unknown): Record<string, unknown> {
  const e = ConnectError.from(error);
  return { code: Code[e.code], reason: errorReason(error), message: e.message };
}

await client.initializeCounter(ledger);
const abort = new AbortController();
const following = (async () => {
  try {
    for await (const entry of client.streamEntries(ledger, { follow: true, signal: abort.signal })) {
      say({ event: "streamed", sequence: entry.sequence });
    }
  } catch (error) {
    if (abort.signal.aborted) return;
    say({ event: "stream_failed", ...failure(error) });
    process.exitCode = 1;
  }
})();
say({ event: "ready" });

for await (const line of createInterface({ input: process.stdin })) {
  const [command, argument] = line.trim().split(/\s+/);
  if (command === "stop") break;
  if (command !== "post" || !argument) throw new Error(`unknown command: ${line}`);
  const input = { debitAccount: "cash", creditAccount: "sales", amount: 100n, asset: "USD" };
  client.postEntry(ledger, { ...input, idempotencyKey: argument }).then(
    (posted) => say({ event: "posted", key: argument, sequence: posted.entry?.sequence, replayed: posted.replayed }),
    (error: unknown) => say({ event: "post_failed", key: argument, ...failure(error) }),
  );
}
abort.abort();
await following;
say({ event: "done" });
process.exit(); // open HTTP/2 sessions would keep the process alive a while
