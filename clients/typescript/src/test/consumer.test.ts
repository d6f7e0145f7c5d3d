// Named consumers: ackEntries, listConsumers, consumer and account streams and
// consume(), against a real server, and their resume rules over a stubbed
// transport. LEDGER_ADDRESS=127.0.0.1:50051 node --test dist/test/consumer.test.js
// (tests/e2e/test_consumer_helper.py starts a server and runs this).
import assert from "node:assert/strict";
import { randomUUID } from "node:crypto";
import { test } from "node:test";
import { create } from "@bufbuild/protobuf";
import { Code, ConnectError } from "@connectrpc/connect";
import {
  EntrySchema,
  LedgerClient,
  type StreamEntriesRequest,
  type StreamEntriesResponse,
  StreamEntriesResponseSchema,
  errorReason,
} from "../index.js";

const address = process.env.LEDGER_ADDRESS;
if (!address) throw new Error("set LEDGER_ADDRESS to a running ledger server (host:port)");
const client = new LedgerClient(`http://${address}`, { token: process.env.LEDGER_TOKEN });

const failsWith = (code: Code, reason: string) => (error: unknown) =>
  ConnectError.from(error).code === code && errorReason(error) === reason;

/** Posts entries from, to (inclusive); entry number i debits "bank" if bank(i), else "cash". */
async function post(ledger: string, from: number, to: number, bank: (i: number) => boolean = () => false) {
  const inputs = [];
  for (let i = from; i <= to; i++) {
    inputs.push({ debitAccount: bank(i) ? "bank" : "cash", creditAccount: "sales", amount: 1n, asset: "USD" });
  }
  const posted = await client.postEntries(ledger, inputs);
  assert.deepEqual(
    posted.results.map((r) => r.entry?.sequence),
    inputs.map((_, k) => BigInt(from + k)),
  );
}

async function stored(ledger: string, consumer: string): Promise<bigint | undefined> {
  const listed = await client.listConsumers(ledger);
  return listed.consumers.find((c) => c.consumer === consumer)?.sequence;
}

const range = (from: number, to: number) => Array.from({ length: to - from + 1 }, (_, k) => BigInt(from + k));

async function collect(iterable: AsyncIterable<{ sequence: bigint }>): Promise<bigint[]> {
  const seen: bigint[] = [];
  for await (const { sequence } of iterable) seen.push(sequence);
  return seen;
}

test("positions only move forward; consumer and account streams start and filter", async () => {
  const ledger = `ts-${randomUUID().slice(0, 8)}`;
  await client.initializeCounter(ledger);
  await post(ledger, 1, 6, (i) => i === 2 || i === 5);

  const acked = await client.ackEntries(ledger, "b-reader", 2n);
  assert.deepEqual([acked.sequence, acked.headSequence], [2n, 6n]);
  assert.equal((await client.ackEntries(ledger, "b-reader", 2n)).sequence, 2n); // the same again
  await client.ackEntries(ledger, "a-reader", 4n);
  await assert.rejects(client.ackEntries(ledger, "b-reader", 1n), failsWith(Code.FailedPrecondition, "CONSUMER_POSITION_BEHIND"));
  await assert.rejects(client.ackEntries(ledger, "b-reader", 7n), (error: unknown) => ConnectError.from(error).code === Code.OutOfRange);
  const listed = await client.listConsumers(ledger);
  assert.equal(listed.headSequence, 6n);
  assert.deepEqual(listed.consumers.map((c) => [c.consumer, c.sequence, c.lag]), [["a-reader", 4n, 2n], ["b-reader", 2n, 4n]]);

  assert.deepEqual(await collect(client.streamEntries(ledger, { consumer: "b-reader" })), [3n, 4n, 5n, 6n]);
  assert.deepEqual(await collect(client.streamEntries(ledger, { consumer: "b-reader", afterSequence: 4n })), [5n, 6n]);
  assert.deepEqual(await collect(client.streamEntries(ledger, { account: "bank" })), [2n, 5n]);
  assert.deepEqual(await collect(client.streamEntries(ledger, { consumer: "b-reader", account: "bank" })), [5n]);
  const messages: StreamEntriesResponse[] = [];
  for await (const message of client.streamMessages(ledger, { account: "bank", afterSequence: 5n })) messages.push(message);
  assert.deepEqual(messages.flatMap((m) => m.entries), []);
  assert.ok(messages.at(-1)?.caughtUp && messages.at(-1)?.throughSequence === 6n);

  // The chain check needs every entry from a known start.
  await assert.rejects(collect(client.streamEntries(ledger, { verify: true, account: "bank" })), TypeError);
  await assert.rejects(collect(client.streamEntries(ledger, { verify: true, consumer: "b-reader" })), TypeError);
  assert.deepEqual(await collect(client.streamEntries(ledger, { verify: true, consumer: "b-reader", afterSequence: 4n })), [5n, 6n]);
});

test("a consumer restarted after a break sees exactly the entries after its last ack", async () => {
  const ledger = `ts-${randomUUID().slice(0, 8)}`;
  await client.initializeCounter(ledger);
  await post(ledger, 1, 30);

  // Acks at 10 and 20 (as entries 11 and 21 are asked for). Leaving the loop
  // acknowledges the entries before the one in hand: 24, not 25.
  const first = client.consume(ledger, "books", { ackEvery: 10, ackIntervalMs: null, follow: false });
  const seen: bigint[] = [];
  for await (const entry of first) {
    seen.push(entry.sequence);
    if (entry.sequence === 25n) break;
  }
  assert.deepEqual(seen, range(1, 25));
  assert.deepEqual([first.position, first.acked, await stored(ledger, "books")], [24n, 24n, 24n]);

  // Again from 25; an explicit close() counts the entry in hand.
  const second = client.consume(ledger, "books", { ackEvery: 10, ackIntervalMs: null, follow: false });
  const again: bigint[] = [];
  for await (const entry of second) {
    again.push(entry.sequence);
    if (entry.sequence === 27n) {
      await second.close();
    }
  }
  assert.deepEqual(again, [25n, 26n, 27n]);
  assert.equal(await stored(ledger, "books"), 27n);

  // To the end: the stream ends caught up and everything is acknowledged.
  assert.deepEqual(await collect(client.consume(ledger, "books", { follow: false })), range(28, 30));
  assert.equal(await stored(ledger, "books"), 30n);
});

test("a filtered consumer follows live entries and its position moves over the others", async () => {
  const ledger = `ts-${randomUUID().slice(0, 8)}`;
  await client.initializeCounter(ledger);
  const bank = (i: number) => i % 3 === 0;
  await post(ledger, 1, 10, bank);

  const stream = client.consume(ledger, "bank-feed", { account: "bank", ackEvery: 2, ackIntervalMs: null });
  const seen: bigint[] = [];
  let posted = 10;
  for await (const entry of stream) {
    seen.push(entry.sequence);
    if (entry.sequence === 9n) {
      await post(ledger, 11, 20, bank); // while following
      posted = 20;
    }
    if (entry.sequence === 18n) {
      // Entries 19 and 20 do not match; ack() counts 18 and the filter's progress.
      assert.ok((await stream.ack()) >= 18n);
      await stream.close();
    }
  }
  assert.equal(posted, 20);
  assert.deepEqual(seen, [3n, 6n, 9n, 12n, 15n, 18n]);
  const position = await stored(ledger, "bank-feed");
  assert.ok(position !== undefined && position >= 18n && position <= 20n, `${position}`);

  // Restarted, it sees the bank entries after its position, and only those.
  await post(ledger, 21, 24, bank);
  const rest = await collect(client.consume(ledger, "bank-feed", { account: "bank", follow: false }));
  assert.deepEqual(rest, [21n, 24n]);
  assert.equal(await stored(ledger, "bank-feed"), 24n);
});

// The resume rules over a stubbed transport: what each reconnect asks for.
function stubbed(streams: Array<{ messages: StreamEntriesResponse[]; then?: Error }>) {
  const stub = new LedgerClient("http://127.0.0.1:1");
  const requests: Array<Partial<StreamEntriesRequest>> = [];
  stub.raw.streamEntries = (request) => {
    requests.push({ ...request });
    const stream = streams.shift();
    if (stream === undefined) throw new Error("no more streams");
    return (async function* (): AsyncGenerator<StreamEntriesResponse> {
      yield* stream.messages;
      if (stream.then) throw stream.then;
    })();
  };
  return { stub, requests };
}

const message = (sequences: number[], fields: Partial<{ through: number; caughtUp: boolean; heartbeat: boolean }> = {}) =>
  create(StreamEntriesResponseSchema, {
    entries: sequences.map((s) => create(EntrySchema, { sequence: BigInt(s) })),
    throughSequence: BigInt(fields.through ?? sequences.at(-1) ?? 0),
    caughtUp: fields.caughtUp ?? false,
    heartbeat: fields.heartbeat ?? false,
  });
const dropped = () => new ConnectError("connection lost", Code.Unavailable);

test("a consumer's stream names it until a message came, then resumes from its own position", async () => {
  const { stub, requests } = stubbed([
    { messages: [], then: dropped() },
    { messages: [message([6, 7])], then: dropped() },
    { messages: [message([8], { caughtUp: true })] },
  ]);
  assert.deepEqual(await collect(stub.streamEntries("l", { consumer: "c" })), [6n, 7n, 8n]);
  assert.deepEqual(requests.map((r) => [r.consumer, r.afterSequence]), [["c", 0n], ["c", 0n], ["", 7n]]);
});

test("a filtered stream resumes from throughSequence and checks entries only increase", async () => {
  const { stub, requests } = stubbed([
    { messages: [message([2, 5], { through: 6 }), message([], { through: 9, heartbeat: true })], then: dropped() },
    { messages: [message([12], { through: 14, caughtUp: true })] },
  ]);
  assert.deepEqual(await collect(stub.streamEntries("l", { account: "cash", follow: true })), [2n, 5n, 12n]);
  assert.deepEqual(requests.map((r) => [r.account, r.afterSequence]), [["cash", 0n], ["cash", 9n]]);

  const backwards = stubbed([{ messages: [message([4], { through: 6 }), message([6], { through: 8 })] }]);
  await assert.rejects(collect(backwards.stub.streamEntries("l", { account: "cash" })), /expected above 6, got 6/);
});
