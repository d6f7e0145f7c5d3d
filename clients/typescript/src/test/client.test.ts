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
  canonicalBytes,
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

  await postingsReversalsEntriesAccountsAndLimits();
});

const MAX = 2n ** 63n - 1n;
type Balance = { account: string; asset: string; totalDebits: bigint; totalCredits: bigint; balance: bigint };
const totals = (balances: Balance[]) =>
  balances.map((b) => [b.account, b.asset, b.totalDebits, b.totalCredits, b.balance]);
const moves = (entry: Entry | undefined) =>
  (entry?.postings ?? []).map((p) => [p.debitAccount, p.creditAccount, p.amount, p.asset]);
const failsWith = (code: Code, reason: string) => (error: unknown) =>
  ConnectError.from(error).code === code && errorReason(error) === reason;

// Several postings in one entry, a reversal, entries by number or key, pages of
// accounts and balance limits, on a ledger of their own; then all of it verified.
async function postingsReversalsEntriesAccountsAndLimits(): Promise<void> {
  const books = `ts-${randomUUID().slice(0, 8)}`;
  await client.initializeCounter(books);

  // 1: the single pair, which Entry.postings lists as its one posting.
  const single = { debitAccount: "cash", creditAccount: "sales", amount: 1000n, asset: "USD" };
  const one = await client.postEntry(books, { ...single, idempotencyKey: "sale-1" });
  assert.equal(one.entry?.sequence, 1n);
  assert.deepEqual(moves(one.entry), [["cash", "sales", 1000n, "USD"]]);
  assert.equal(one.entry?.debitAccount, "cash");
  assert.deepEqual(totals(one.balances), [["cash", "USD", 1000n, 0n, 1000n], ["sales", "USD", 0n, 1000n, -1000n]]);

  // 2: three postings in two assets under one number.
  const postings = [
    { debitAccount: "cash", creditAccount: "sales", amount: 1000n, asset: "USD" },
    { debitAccount: "cash", creditAccount: "tax:vat", amount: 200n, asset: "USD" },
    { debitAccount: "fx:eur", creditAccount: "cash", amount: MAX, asset: "EUR/2" },
  ];
  const split = { postings, idempotencyKey: "split", description: "split ☕", metadata: { b: "2", a: "1" } };
  const two = await client.postEntry(books, split);
  assert.equal(two.replayed, false);
  assert.equal(two.entry?.sequence, 2n);
  assert.deepEqual(moves(two.entry), postings.map((p) => [p.debitAccount, p.creditAccount, p.amount, p.asset]));
  assert.deepEqual([two.entry?.debitAccount, two.entry?.creditAccount, two.entry?.amount, two.entry?.asset], ["", "", 0n, ""]);
  assert.equal(two.entry?.reversesSequence, 0n);
  const afterSplit = [
    ["cash", "EUR/2", 0n, MAX, -MAX],
    ["cash", "USD", 2200n, 0n, 2200n],
    ["fx:eur", "EUR/2", MAX, 0n, MAX],
    ["sales", "USD", 0n, 2000n, -2000n],
    ["tax:vat", "USD", 0n, 200n, -200n],
  ];
  assert.deepEqual(totals(two.balances), afterSplit);

  // 3: its reversal, every posting swapped; the same key replays it, another
  // key is refused, and an entry that does not exist cannot be reversed.
  const three = await client.reverseEntry(books, 2n, "undo-split", { description: "refund" });
  assert.equal(three.replayed, false);
  assert.equal(three.entry?.sequence, 3n);
  assert.equal(three.entry?.reversesSequence, 2n);
  assert.equal(three.entry?.description, "refund");
  assert.deepEqual(moves(three.entry), postings.map((p) => [p.creditAccount, p.debitAccount, p.amount, p.asset]));
  const afterReversal = [
    ["cash", "EUR/2", MAX, MAX, 0n],
    ["cash", "USD", 2200n, 1200n, 1000n],
    ["fx:eur", "EUR/2", MAX, MAX, 0n],
    ["sales", "USD", 1000n, 2000n, -1000n],
    ["tax:vat", "USD", 200n, 200n, 0n],
  ];
  assert.deepEqual(totals(three.balances), afterReversal);
  const replayedReversal = await client.reverseEntry(books, 2n, "undo-split", { description: "refund" });
  assert.equal(replayedReversal.replayed, true);
  assert.equal(replayedReversal.entry?.sequence, 3n);
  await assert.rejects(
    client.reverseEntry(books, 2n, "undo-split-again"),
    failsWith(Code.FailedPrecondition, "ALREADY_REVERSED"),
  );
  await assert.rejects(client.reverseEntry(books, 99n, "undo-99"), failsWith(Code.NotFound, "ENTRY_NOT_FOUND"));
  // A replay's balances are as of its own number, not now.
  const replayedSplit = await client.postEntry(books, split);
  assert.equal(replayedSplit.replayed, true);
  assert.equal(replayedSplit.entry?.sequence, 2n);
  assert.deepEqual(totals(replayedSplit.balances), afterSplit);

  // Entries by number and by key.
  const bySequence = await client.getEntry(books, { sequence: 2n });
  assert.deepEqual(moves(bySequence.entry), moves(two.entry));
  assert.equal(Buffer.compare(bySequence.entry!.hash, two.entry!.hash), 0);
  const byKey = await client.getEntry(books, { idempotencyKey: "undo-split" });
  assert.equal(byKey.entry?.sequence, 3n);
  assert.equal(byKey.entry?.reversesSequence, 2n);
  await assert.rejects(client.getEntry(books, { sequence: 99n }), failsWith(Code.NotFound, "ENTRY_NOT_FOUND"));
  await assert.rejects(client.getEntry(books, { idempotencyKey: "nope" }), failsWith(Code.NotFound, "ENTRY_NOT_FOUND"));

  // 4: one posting in the postings form, in a batch: the single pair stays empty.
  const batch = await client.postEntries(books, [
    { postings: [{ debitAccount: "bank", creditAccount: "sales", amount: 1n, asset: "USD" }], idempotencyKey: "bank-1" },
  ]);
  const four = batch.results[0];
  assert.equal(four?.entry?.sequence, 4n);
  assert.deepEqual(moves(four?.entry), [["bank", "sales", 1n, "USD"]]);
  assert.deepEqual([four?.entry?.debitAccount, four?.entry?.amount], ["", 0n]);
  assert.deepEqual(totals(four?.balances ?? []), [["bank", "USD", 1n, 0n, 1n], ["sales", "USD", 1000n, 2001n, -1001n]]);

  // Totals as of an earlier entry.
  const cashAt = async (asOfSequence?: bigint) => {
    const account = await client.getAccount(books, "cash", { asOfSequence });
    return [account.asOfSequence, account.balances.map((b) => [b.asset, b.totalDebits, b.totalCredits])];
  };
  assert.deepEqual(await cashAt(1n), [1n, [["USD", 1000n, 0n]]]);
  assert.deepEqual(await cashAt(2n), [2n, [["EUR/2", 0n, MAX], ["USD", 2200n, 0n]]]);
  assert.deepEqual(await cashAt(), [4n, [["EUR/2", MAX, MAX], ["USD", 2200n, 1200n]]]);
  await assert.rejects(
    client.getAccount(books, "cash", { asOfSequence: 5n }),
    (error: unknown) => ConnectError.from(error).code === Code.OutOfRange,
  );

  // Every account, two a page: by hand, then with the iterator.
  const names = ["bank", "cash", "fx:eur", "sales", "tax:vat"];
  const pages: string[][] = [];
  let pageToken = "";
  do {
    const page = await client.listAccounts(books, { pageSize: 2, pageToken });
    assert.equal(page.asOfSequence, 4n);
    pages.push(page.accounts.map((a) => a.account));
    pageToken = page.nextPageToken;
  } while (pageToken !== "" && pages.length < 10);
  assert.deepEqual(pages, [["bank", "cash"], ["fx:eur", "sales"], ["tax:vat"]]);
  const listed = [];
  for await (const account of client.accounts(books, { pageSize: 2 })) listed.push(account);
  assert.deepEqual(listed.map((a) => a.account), names);
  const cash = listed.find((a) => a.account === "cash")!;
  assert.deepEqual(cash.balances.map((b) => [b.asset, b.balance]), [["EUR/2", 0n], ["USD", 1000n]]);

  // Limits: cash may hold at most 1500 USD net debit. Beyond it a post is
  // refused and takes no number; up to it, or netting to nothing, it passes.
  const limited = await client.setAccountLimits(books, "cash", "USD", { maxNetDebit: 1500n });
  assert.deepEqual(
    [limited.account, limited.balance?.asset, limited.balance?.balance, limited.balance?.maxNetDebit, limited.balance?.maxNetCredit],
    ["cash", "USD", 1000n, 1500n, undefined],
  );
  assert.equal(limited.asOfSequence, 4n);
  await assert.rejects(
    client.postEntry(books, { ...single, amount: 501n, idempotencyKey: "over" }),
    failsWith(Code.FailedPrecondition, "BALANCE_LIMIT_EXCEEDED"),
  );
  await assert.rejects(
    client.postEntry(books, { postings: [{ ...single, amount: 300n }, { ...single, amount: 201n }], idempotencyKey: "over-2" }),
    failsWith(Code.FailedPrecondition, "BALANCE_LIMIT_EXCEEDED"),
  );
  assert.equal((await client.getLedger(books)).headSequence, 4n);
  await assert.rejects(client.getEntry(books, { idempotencyKey: "over" }), failsWith(Code.NotFound, "ENTRY_NOT_FOUND"));
  const five = await client.postEntry(books, { ...single, amount: 500n, idempotencyKey: "to-limit" });
  assert.equal(five.entry?.sequence, 5n);
  const net = [
    { debitAccount: "cash", creditAccount: "sales", amount: 100n, asset: "USD" },
    { debitAccount: "tax:vat", creditAccount: "cash", amount: 100n, asset: "USD" },
  ];
  const six = await client.postEntry(books, { postings: net, idempotencyKey: "net-zero" });
  assert.equal(six.entry?.sequence, 6n);
  await assert.rejects(
    client.setAccountLimits(books, "cash", "USD", { maxNetDebit: 100n }),
    failsWith(Code.FailedPrecondition, "BALANCE_LIMIT_EXCEEDED"),
  );
  const now = await client.getAccount(books, "cash");
  const usd = now.balances.find((b) => b.asset === "USD");
  assert.deepEqual([usd?.balance, usd?.maxNetDebit, usd?.maxNetCredit], [1500n, 1500n, undefined]);

  // All of it chains: the reversal in format version 2.
  const all: Entry[] = [];
  for await (const entry of client.streamEntries(books, { verify: true })) all.push(entry);
  assert.deepEqual(all.map((e) => e.sequence), [1n, 2n, 3n, 4n, 5n, 6n]);
  assert.deepEqual(all.map((e) => e.reversesSequence), [0n, 0n, 2n, 0n, 0n, 0n]);
  assert.deepEqual(all.map((e) => e.postings.length), [1, 3, 3, 1, 1, 2]);
  assert.equal(canonicalBytes(all[2]!)[0], 2);
  const head = await client.getLedger(books);
  assert.equal(head.headSequence, 6n);
  assert.equal(Buffer.compare(head.headHash, all[5]!.hash), 0);
  const resumed: bigint[] = [];
  for await (const entry of client.streamEntries(books, { verify: true, afterSequence: 2n, previousHash: all[1]!.hash })) {
    resumed.push(entry.sequence);
  }
  assert.deepEqual(resumed, [3n, 4n, 5n, 6n]);
}
