// The hash chain, without a server: the shared vectors (docs/integrity-vectors.json,
// which the Python client and the server are tested against too) and a
// verifying stream over a stubbed transport. node --test dist/test/integrity.test.js
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { test } from "node:test";
import { create } from "@bufbuild/protobuf";
import { TimestampSchema } from "@bufbuild/protobuf/wkt";
import { Code, ConnectError } from "@connectrpc/connect";
import {
  ChainBroken,
  ChainVerifier,
  type Entry,
  EntrySchema,
  FORMAT_VERSION,
  GENESIS,
  LedgerClient,
  PostingSchema,
  REVERSAL_FORMAT_VERSION,
  type StreamEntriesResponse,
  StreamEntriesResponseSchema,
  canonicalBytes,
  chainHash,
  entryPostings,
  formatVersion,
} from "../index.js";

interface VectorPosting {
  debit_account: string;
  credit_account: string;
  amount: string;
  asset: string;
}

interface Vector {
  ledger: string;
  sequence: number;
  idempotency_key: string;
  debit_account: string;
  credit_account: string;
  amount: string;
  asset: string;
  entry_type: string;
  description: string;
  metadata: Record<string, string>;
  created_at_micros: string;
  posted_by: string;
  postings: VectorPosting[];
  reverses_sequence: string;
  previous_hash: string;
  canonical: string;
  hash: string;
}

// dist/test/ -> the repository root, wherever the test runs from.
const file = new URL("../../../../docs/integrity-vectors.json", import.meta.url);
const vectors = JSON.parse(readFileSync(file, "utf8")) as { genesis: string; entries: Vector[] };

const hex = (bytes: Uint8Array) => Buffer.from(bytes).toString("hex");
const unhex = (text: string) => new Uint8Array(Buffer.from(text, "hex"));

function entryOf(v: Vector): Entry {
  const micros = BigInt(v.created_at_micros);
  return create(EntrySchema, {
    ledger: v.ledger,
    sequence: BigInt(v.sequence),
    idempotencyKey: v.idempotency_key,
    debitAccount: v.debit_account,
    creditAccount: v.credit_account,
    amount: BigInt(v.amount),
    asset: v.asset,
    entryType: v.entry_type,
    description: v.description,
    metadata: v.metadata,
    createdAt: create(TimestampSchema, {
      seconds: micros / 1_000_000n,
      nanos: Number(micros % 1_000_000n) * 1000,
    }),
    postedBy: v.posted_by,
    hash: unhex(v.hash),
    postings: v.postings.map((p) =>
      create(PostingSchema, {
        debitAccount: p.debit_account,
        creditAccount: p.credit_account,
        amount: BigInt(p.amount),
        asset: p.asset,
      }),
    ),
    reversesSequence: BigInt(v.reverses_sequence),
  });
}

// The vector's entry as an older server sent it, without `postings`: for a
// one-posting entry, the same canonical bytes from the single pair of fields.
function legacyEntryOf(v: Vector): Entry {
  const entry = entryOf(v);
  entry.postings = [];
  return entry;
}

const chain = (): Entry[] => vectors.entries.map(entryOf);

function rejects(entries: Entry[], sequence: bigint, problem: string, verifier = new ChainVerifier()): void {
  assert.throws(
    () => entries.forEach((entry) => verifier.check(entry)),
    (error: unknown) =>
      error instanceof ChainBroken &&
      error.ledger === "books" &&
      error.sequence === sequence &&
      error.problem === problem &&
      error.message === `books: entry ${sequence}: ${problem}`,
  );
}

test("canonical bytes and hashes match the shared vectors", () => {
  assert.equal(hex(GENESIS), vectors.genesis);
  assert.equal(vectors.entries.length, 5);
  let previous = vectors.genesis;
  for (const v of vectors.entries) {
    const entry = entryOf(v);
    assert.equal(v.previous_hash, previous, `entry ${v.sequence} chains to the one before`);
    assert.equal(hex(canonicalBytes(entry)), v.canonical, `entry ${v.sequence}`);
    assert.equal(hex(chainHash(unhex(v.previous_hash), entry)), v.hash, `entry ${v.sequence}`);
    previous = v.hash;
  }
});

test("the vectors cover several postings, an int64 maximum amount and a reversal (version 2)", () => {
  const [, two, , four, five] = chain() as [Entry, Entry, Entry, Entry, Entry];
  assert.equal(two.amount, 2n ** 63n - 1n);
  // Entry 4: three postings in two assets, its single-pair fields empty.
  assert.equal(four.postings.length, 3);
  assert.deepEqual(new Set(four.postings.map((p) => p.asset)), new Set(["USD", "EUR/2"]));
  assert.ok(four.postings.some((p) => p.amount === 2n ** 63n - 1n));
  assert.deepEqual([four.debitAccount, four.creditAccount, four.amount, four.asset], ["", "", 0n, ""]);
  assert.deepEqual(
    entryPostings(four).map((p) => [p.debitAccount, p.creditAccount, p.amount, p.asset]),
    four.postings.map((p) => [p.debitAccount, p.creditAccount, p.amount, p.asset]),
  );
  // Entry 5 reverses it: the same postings swapped, and version 2.
  assert.equal(five.reversesSequence, 4n);
  assert.deepEqual(
    five.postings.map((p) => [p.debitAccount, p.creditAccount, p.amount, p.asset]),
    four.postings.map((p) => [p.creditAccount, p.debitAccount, p.amount, p.asset]),
  );
  assert.equal(formatVersion(0n), FORMAT_VERSION);
  assert.equal(formatVersion(4n), REVERSAL_FORMAT_VERSION);
  for (const [i, entry] of chain().entries()) {
    const version = canonicalBytes(entry)[0];
    assert.equal(version, i === 4 ? 2 : 1, `entry ${entry.sequence}'s version byte`);
  }
  // Version 2 ends with reverses_sequence, after posted_by.
  assert.equal(hex(canonicalBytes(five).subarray(-8)), "0000000000000004");
});

test("an older server's one-posting entries, without postings, hash the same", () => {
  for (const v of vectors.entries.filter((v) => v.postings.length === 1)) {
    const entry = legacyEntryOf(v);
    assert.equal(entry.postings.length, 0);
    assert.equal(hex(canonicalBytes(entry)), v.canonical, `entry ${v.sequence}`);
    assert.equal(hex(chainHash(unhex(v.previous_hash), entry)), v.hash, `entry ${v.sequence}`);
  }
  // The single pair of fields is then what is hashed.
  const entries = vectors.entries.map((v) => (v.postings.length === 1 ? legacyEntryOf(v) : entryOf(v)));
  const verifier = new ChainVerifier();
  for (const entry of entries) verifier.check(entry);
  const changes: Array<(entry: Entry) => void> = [
    (e) => (e.debitAccount = "bank"),
    (e) => (e.creditAccount = "cash"),
    (e) => (e.amount -= 1n),
    (e) => (e.asset = "EUR/3"),
  ];
  for (const change of changes) {
    const changed = vectors.entries.map(legacyEntryOf);
    change(changed[1]!);
    rejects(changed, 2n, "hash mismatch");
  }
});

test("metadata is ordered by the keys' UTF-8 bytes, not JavaScript's default sort", () => {
  const keys = Object.keys(vectors.entries[1]!.metadata);
  // The vector is built so the two orders differ (U+FFFF against an astral key).
  assert.notDeepEqual([...keys].sort(), [...keys].sort((a, b) => Buffer.compare(Buffer.from(a), Buffer.from(b))));
});

test("a verifier accepts the chain, from the start or after an entry with its hash", () => {
  const entries = chain();
  const verifier = new ChainVerifier();
  for (const entry of entries) verifier.check(entry);
  assert.equal(verifier.sequence, 5n);
  assert.equal(hex(verifier.hash), vectors.entries[4]!.hash);
  const resumed = new ChainVerifier(1n, entries[0]!.hash);
  for (const entry of entries.slice(1)) resumed.check(entry);
  const reversal = new ChainVerifier(4n, entries[3]!.hash);
  reversal.check(entries[4]!);
  assert.equal(hex(reversal.hash), vectors.entries[4]!.hash);
  assert.throws(() => new ChainVerifier(1n), /needs entry N's hash/);
  assert.throws(() => new ChainVerifier(0n, new Uint8Array(31)), /32 bytes, not 31/);
});

test("single-pair fields that do not repeat the one posting are refused", () => {
  const changes: Array<(entry: Entry) => void> = [
    (e) => (e.debitAccount = "someone-else"), // outside the hash: checked against postings
    (e) => (e.amount += 1n),
    (e) => e.postings.push(create(PostingSchema, { debitAccount: "x", creditAccount: "y", amount: 1n, asset: "USD" })),
  ];
  for (const change of changes) {
    const entries = chain();
    change(entries[1]!);
    rejects(entries, 2n, "single-pair fields disagree with postings");
  }
});

test("a verifier rejects any changed field, naming the entry", () => {
  const changes: Array<(entry: Entry) => void> = [
    (e) => (e.idempotencyKey += "x"),
    // A one-posting entry repeats its posting in the single pair: changed together.
    (e) => (e.postings[0]!.debitAccount = e.debitAccount = "bank"),
    (e) => (e.postings[0]!.creditAccount = e.creditAccount = "cash"),
    (e) => (e.postings[0]!.amount = e.amount -= 1n),
    (e) => (e.postings[0]!.asset = e.asset = "EUR/3"),
    (e) => {
      e.postings.push(create(PostingSchema, { debitAccount: "x", creditAccount: "y", amount: 1n, asset: "USD" }));
      Object.assign(e, { debitAccount: "", creditAccount: "", amount: 0n, asset: "" });
    },
    (e) => (e.reversesSequence = 1n), // version 2, and one more field
    (e) => (e.entryType = "refund"),
    (e) => (e.description = e.description.normalize("NFD")), // same text to a reader, other bytes
    (e) => (e.metadata = { ...e.metadata, a: "First" }),
    (e) => (e.metadata = { ...e.metadata, extra: "" }),
    (e) => (e.createdAt!.nanos += 1000),
    (e) => (e.postedBy = "someone-else"),
    (e) => (e.hash = new Uint8Array(32)),
    (e) => (e.hash = new Uint8Array(0)),
  ];
  for (const change of changes) {
    const entries = chain();
    change(entries[1]!);
    rejects(entries, 2n, "hash mismatch");
  }
  // In entries of several postings, and in a reversal, likewise.
  const postingChanges: Array<(entry: Entry) => void> = [
    (e) => (e.postings[2]!.amount -= 1n),
    (e) => (e.postings[1]!.creditAccount = "tax:gst"),
    (e) => (e.postings[2]!.asset = "USD"),
    (e) => e.postings.reverse(), // the order is hashed
    (e) => e.postings.pop(),
    (e) => (e.postings = e.postings.map((p) => create(PostingSchema, { ...p, debitAccount: p.creditAccount, creditAccount: p.debitAccount }))),
  ];
  for (const index of [3, 4]) {
    for (const change of [...postingChanges, (e: Entry) => (e.reversesSequence += 1n), (e: Entry) => (e.description += ".")]) {
      const entries = chain();
      change(entries[index]!);
      rejects(entries, BigInt(index + 1), "hash mismatch");
    }
  }
  // A reversal passed off as a plain entry (version 1), or the other way round.
  const unreversed = chain();
  unreversed[4]!.reversesSequence = 0n;
  rejects(unreversed, 5n, "hash mismatch");
  const reversed = chain();
  reversed[3]!.reversesSequence = 3n;
  rejects(reversed, 4n, "hash mismatch");

  // A changed entry breaks the next one too, whose hash commits to it.
  const entries = chain();
  entries[0]!.postings[0]!.amount = entries[0]!.amount += 1n;
  entries[0]!.hash = chainHash(GENESIS, entries[0]!);
  rejects(entries, 2n, "hash mismatch");
  // The ledger is hashed, and named in the error as the entry says.
  const moved = chain();
  moved[1]!.ledger = "other";
  const verifier = new ChainVerifier();
  assert.throws(() => moved.forEach((e) => verifier.check(e)), {
    name: "ChainBroken",
    message: "other: entry 2: hash mismatch",
  });
});

test("a verifier rejects entries swapped, skipped or repeated", () => {
  const [one, two, three] = chain() as [Entry, Entry, Entry];
  rejects([one, three, two], 3n, "expected entry 2 next");
  rejects([two, one], 2n, "expected entry 1 next");
  rejects([one, three], 3n, "expected entry 2 next");
  rejects([one, two, two], 2n, "out of order after entry 2");
  rejects([one, two, one], 1n, "out of order after entry 2");
  // Renumbered to hide the swap: the hashes catch it.
  const swapped = [one, entryOf({ ...vectors.entries[2]!, sequence: 2 }), entryOf({ ...vectors.entries[1]!, sequence: 3 })];
  rejects(swapped, 2n, "hash mismatch");
});

// A client whose StreamEntries answers from `streams`, one per call, each a list
// of messages then an optional failure; it records each call's afterSequence.
function stubbed(streams: Array<{ messages: Entry[][]; then?: Error; caughtUp?: boolean }>) {
  const client = new LedgerClient("http://127.0.0.1:1");
  const requested: bigint[] = [];
  const signals: AbortSignal[] = [];
  client.raw.streamEntries = (request, options) => {
    requested.push(request.afterSequence ?? 0n);
    if (options?.signal) signals.push(options.signal);
    const stream = streams.shift();
    if (stream === undefined) throw new Error("no more streams");
    return (async function* (): AsyncGenerator<StreamEntriesResponse> {
      for (const [i, entries] of stream.messages.entries()) {
        const last = i === stream.messages.length - 1;
        yield create(StreamEntriesResponseSchema, { entries, caughtUp: last && (stream.caughtUp ?? false) });
      }
      if (stream.then) throw stream.then;
    })();
  };
  return { client, requested, signals };
}

async function collect(iterable: AsyncIterable<Entry>): Promise<bigint[]> {
  const seen: bigint[] = [];
  for await (const entry of iterable) seen.push(entry.sequence);
  return seen;
}

const dropped = () => new ConnectError("connection lost", Code.Unavailable);

test("a verifying stream checks every entry across a reconnect", async () => {
  const [one, two, three] = chain() as [Entry, Entry, Entry];
  const { client, requested } = stubbed([{ messages: [[one]], then: dropped() }, { messages: [[two, three]] }]);
  assert.deepEqual(await collect(client.streamEntries("books", { verify: true })), [1n, 2n, 3n]);
  assert.deepEqual(requested, [0n, 1n]);

  // Entries of several postings and a reversal (version 2) too.
  const [, , , four, five] = chain() as [Entry, Entry, Entry, Entry, Entry];
  const longer = stubbed([{ messages: [[one, two], [three]], then: dropped() }, { messages: [[four], [five]] }]);
  assert.deepEqual(await collect(longer.client.streamEntries("books", { verify: true })), [1n, 2n, 3n, 4n, 5n]);
  assert.deepEqual(longer.requested, [0n, 3n]);

  // A changed entry after the reconnect throws, and is not retried.
  const third = vectors.entries[2]!;
  const changed = entryOf({ ...third, amount: "2", postings: [{ ...third.postings[0]!, amount: "2" }] });
  const broken = stubbed([{ messages: [[one]], then: dropped() }, { messages: [[two, changed]] }]);
  const seen: bigint[] = [];
  await assert.rejects(
    (async () => {
      for await (const entry of broken.client.streamEntries("books", { verify: true })) seen.push(entry.sequence);
    })(),
    (error: unknown) => error instanceof ChainBroken && error.sequence === 3n && error.problem === "hash mismatch",
  );
  assert.deepEqual(seen, [1n, 2n]);
  assert.deepEqual(broken.requested, [0n, 1n]);
  // Each call is cancelled once left, so a following one does not stay open.
  assert.ok(broken.signals.length === 2 && broken.signals.every((signal) => signal.aborted));

  // Without verify, the same stream is yielded as it comes.
  const plain = stubbed([{ messages: [[one, two, changed]] }]);
  assert.deepEqual(await collect(plain.client.streamEntries("books")), [1n, 2n, 3n]);
});

test("a verifying stream after entry N starts at its hash, or reads N to trust its hash", async () => {
  const [one, two, three] = chain() as [Entry, Entry, Entry];
  const given = stubbed([{ messages: [[two, three]] }]);
  const options = { afterSequence: 1n, verify: true, previousHash: one.hash };
  assert.deepEqual(await collect(given.client.streamEntries("books", options)), [2n, 3n]);
  assert.deepEqual(given.requested, [1n]);

  const wrong = stubbed([{ messages: [[two, three]] }]);
  await assert.rejects(
    collect(wrong.client.streamEntries("books", { ...options, previousHash: new Uint8Array(32) })),
    (error: unknown) => error instanceof ChainBroken && error.sequence === 2n,
  );

  // Entry 1 is read, not yielded; a drop right after it resumes after it.
  const trusted = stubbed([{ messages: [[one]], then: dropped() }, { messages: [[two], [three]] }]);
  assert.deepEqual(await collect(trusted.client.streamEntries("books", { afterSequence: 1n, verify: true })), [2n, 3n]);
  assert.deepEqual(trusted.requested, [0n, 1n]);

  // Entry 1's hash is trusted, so entry 2 must chain to it.
  const changed = entryOf({ ...vectors.entries[0]!, hash: vectors.entries[1]!.hash });
  const untrue = stubbed([{ messages: [[changed, two]] }]);
  await assert.rejects(
    collect(untrue.client.streamEntries("books", { afterSequence: 1n, verify: true })),
    (error: unknown) => error instanceof ChainBroken && error.sequence === 2n && error.problem === "hash mismatch",
  );

  // A position one beyond the ledger's end is refused, as the server refuses one further.
  const ahead = stubbed([{ messages: [[]], caughtUp: true }]); // after entry 3, the last
  await assert.rejects(
    collect(ahead.client.streamEntries("books", { afterSequence: 4n, verify: true, follow: true })),
    (error: unknown) => ConnectError.from(error).code === Code.OutOfRange,
  );
});
