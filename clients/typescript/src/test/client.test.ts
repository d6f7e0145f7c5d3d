// Runs against a real server: LEDGER_ADDRESS=127.0.0.1:50051 npm test, with
// LEDGER_TOKEN=<an admin's token> if the server has an auth file
// (tests/e2e/test_interop.py starts one with an auth file and runs this).
import assert from "node:assert/strict";
import { randomUUID } from "node:crypto";
import { test } from "node:test";
import { create } from "@bufbuild/protobuf";
import { Code, ConnectError } from "@connectrpc/connect";
import {
  ChainBroken,
  type Entry,
  ErrorReason,
  LedgerClient,
  PostEntryRequestSchema,
  errorReason,
  reasonName,
} from "../index.js";

const address = process.env.LEDGER_ADDRESS;
if (!address) throw new Error("set LEDGER_ADDRESS to a running ledger server (host:port)");
const token = process.env.LEDGER_TOKEN;
const client = new LedgerClient(`http://${address}`, { token });
const BIG = 2n ** 53n + 1n; // not representable as a JavaScript number

test("posts, replays, conflicts, follows a stream and reads balances exactly", async () => {
  const ledger = `ts-${randomUUID().slice(0, 8)}`;

  await assert.rejects(
    client.postEntry(ledger, { debitAccount: "cash", creditAccount: "sales", amount: 1n, asset: "USD" }),
    (error: unknown) =>
      ConnectError.from(error).code === Code.FailedPrecondition &&
      errorReason(error) === "COUNTER_NOT_INITIALIZED" &&
      errorReason(error) === reasonName(ErrorReason.COUNTER_NOT_INITIALIZED),
  );
  const counter = await client.initializeCounter(ledger);
  assert.equal(counter.created, true);
  assert.equal(counter.value, 0n);

  const seen: bigint[] = [];
  const abort = new AbortController();
  const follower = (async () => {
    try {
      for await (const entry of client.streamEntries(ledger, { follow: true, signal: abort.signal, verify: true })) {
        seen.push(entry.sequence);
        assert.equal(entry.amount, BIG);
        if (seen.length === 3) abort.abort();
      }
    } catch (error) {
      if (ConnectError.from(error).code !== Code.Canceled) throw error;
    }
  })();

  const input = { debitAccount: "cash", creditAccount: "sales", amount: BIG, asset: "USD", idempotencyKey: "k1" };
  const first = await client.postEntry(ledger, input);
  assert.equal(first.replayed, false);
  assert.equal(first.entry?.sequence, 1n);
  assert.equal(first.entry?.amount, BIG);
  const replay = await client.postEntry(ledger, input);
  assert.equal(replay.replayed, true);
  assert.equal(replay.entry?.sequence, 1n);
  await assert.rejects(
    client.postEntry(ledger, { ...input, amount: 5n }),
    (error: unknown) =>
      ConnectError.from(error).code === Code.AlreadyExists &&
      errorReason(error) === "IDEMPOTENCY_KEY_REUSED",
  );
  await client.postEntry(ledger, { ...input, idempotencyKey: undefined });
  await client.postEntry(ledger, { ...input, idempotencyKey: undefined });

  await follower;
  assert.deepEqual(seen, [1n, 2n, 3n]);
  const account = await client.getAccount(ledger, "cash");
  assert.equal(account.asOfSequence, 3n);
  assert.equal(account.balances[0]?.totalDebits, 3n * BIG);

  // One test only (tests/e2e/test_interop.py counts them), so the retries too.
  // DEADLINE_EXCEEDED after a commit whose answer was lost: the retry with the
  // same key replays it, and the entry is posted once.
  const flaky = new LedgerClient(`http://${address}`, { token, maxAttempts: 3 });
  const post = flaky.raw.postEntry.bind(flaky.raw);
  const keys: string[] = [];
  flaky.raw.postEntry = async (request, options) => {
    const answer = await post(request, options);
    keys.push(create(PostEntryRequestSchema, request).idempotencyKey);
    if (keys.length === 1) throw new ConnectError("answer lost", Code.DeadlineExceeded);
    return answer;
  };
  const retried = await flaky.postEntry(ledger, { ...input, idempotencyKey: undefined });
  assert.equal(keys.length, 2);
  assert.equal(keys[0], keys[1]);
  assert.equal(retried.replayed, true);
  assert.equal(retried.entry?.sequence, 4n);
  assert.equal((await client.getAccount(ledger, "cash")).asOfSequence, 4n);

  // Retries end within totalTimeoutMs, however many attempts are left.
  const stalled = new LedgerClient(`http://${address}`, {
    token, maxAttempts: 1000, timeoutMs: 50, totalTimeoutMs: 400,
  });
  let attempts = 0;
  stalled.raw.postEntry = async (_request, options) => {
    attempts++;
    await new Promise((resolve) => setTimeout(resolve, options?.timeoutMs));
    throw new ConnectError("stalled", Code.DeadlineExceeded);
  };
  const started = Date.now();
  await assert.rejects(
    stalled.postEntry(ledger, input),
    (error: unknown) => ConnectError.from(error).code === Code.DeadlineExceeded,
  );
  const elapsed = Date.now() - started;
  assert.ok(attempts > 1 && elapsed < 1000, `${attempts} attempts in ${elapsed} ms`);

  // A batch, atomic, each entry with a key of its own; posted again, replayed.
  const batch = [{ ...input, idempotencyKey: "b1" }, { ...input, idempotencyKey: undefined }];
  const posted = await client.postEntries(ledger, batch);
  assert.deepEqual(posted.results.map((r) => [r.entry?.sequence, r.replayed]), [[5n, false], [6n, false]]);
  const batchKeys = posted.results.map((r) => r.entry?.idempotencyKey ?? "");
  assert.ok(batchKeys[0] === "b1" && batchKeys[1] !== "" && batchKeys[1] !== "b1");
  const again = await client.postEntries(ledger, batchKeys.map((idempotencyKey) => ({ ...input, idempotencyKey })));
  assert.deepEqual(again.results.map((r) => r.replayed), [true, true]);

  // The hash chain (docs/integrity.md): every entry verified, from the start or
  // resumed after entry 2 with its hash or without, and the head to anchor.
  const all: Entry[] = [];
  for await (const entry of client.streamEntries(ledger, { verify: true })) all.push(entry);
  assert.deepEqual(all.map((e) => e.sequence), [1n, 2n, 3n, 4n, 5n, 6n]);
  const head = await client.getLedger(ledger);
  assert.equal(head.headSequence, 6n);
  assert.equal(Buffer.from(head.headHash).toString("hex"), Buffer.from(all[5]!.hash).toString("hex"));
  const sequences = async (options: { afterSequence: bigint; previousHash?: Uint8Array }) => {
    const seen: bigint[] = [];
    for await (const entry of client.streamEntries(ledger, { ...options, verify: true })) seen.push(entry.sequence);
    return seen;
  };
  assert.deepEqual(await sequences({ afterSequence: 2n, previousHash: all[1]!.hash }), [3n, 4n, 5n, 6n]);
  assert.deepEqual(await sequences({ afterSequence: 2n }), [3n, 4n, 5n, 6n]);
  await assert.rejects(
    sequences({ afterSequence: 2n, previousHash: all[0]!.hash }),
    (error: unknown) => error instanceof ChainBroken && error.sequence === 3n && error.problem === "hash mismatch",
  );
  await assert.rejects(
    sequences({ afterSequence: 7n }),
    (error: unknown) => ConnectError.from(error).code === Code.OutOfRange,
  );

  // The token: without it, UNAUTHENTICATED, and not retried.
  if (token !== undefined) {
    const anonymous = new LedgerClient(`http://${address}`);
    const send = anonymous.raw.postEntry.bind(anonymous.raw);
    let sent = 0;
    anonymous.raw.postEntry = (request, options) => {
      sent++;
      return send(request, options);
    };
    await assert.rejects(
      anonymous.postEntry(ledger, input),
      (error: unknown) =>
        ConnectError.from(error).code === Code.Unauthenticated && errorReason(error) === "UNAUTHENTICATED",
    );
    assert.equal(sent, 1);
  }
  assert.throws(
    () => new LedgerClient(`http://${address}`, { token: "two words" }),
    (error: unknown) => error instanceof Error && !error.message.includes("two words"),
  );
  assert.throws(() => new LedgerClient(`http://${address}`, { ca: "pem" }), /https:\/\//);

  // A stream gives up once the server has been away for reconnectTimeoutMs,
  // after reconnecting meanwhile (nothing listens on port 1).
  const away = new LedgerClient("http://127.0.0.1:1", { reconnectTimeoutMs: 500 });
  const open = away.raw.streamEntries.bind(away.raw);
  let opened = 0;
  away.raw.streamEntries = (request, options) => {
    opened++;
    return open(request, options);
  };
  const since = Date.now();
  await assert.rejects(
    (async () => {
      for await (const _ of away.streamEntries(ledger, { follow: true })) assert.fail("no entry expected");
    })(),
    (error: unknown) => ConnectError.from(error).code === Code.Unavailable,
  );
  const waited = Date.now() - since;
  assert.ok(opened > 1 && waited < 5000, `${opened} attempts in ${waited} ms`);
});
