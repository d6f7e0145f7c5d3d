// The hash chain along a ledger's gap-free sequence (docs/integrity.md).
//
// Each entry's `hash` is SHA-256 over the previous entry's hash (32 zero bytes
// before entry 1) followed by the entry's canonical bytes, an encoding of our
// own: protobuf's serialization is not canonical across languages. Mirrors
// clients/python/src/ledger_client/integrity.py; both are tested against
// docs/integrity-vectors.json.
import { createHash } from "node:crypto";
import type { Entry } from "./gen/ledger/v1/ledger_pb.js";

export const FORMAT_VERSION = 1;
/**
 * Version 2: version 1 plus the entry's `reverses_sequence`, for the entries
 * that have one (ReverseEntry).
 */
export const REVERSAL_FORMAT_VERSION = 2;
export const HASH_SIZE = 32;
/** The "previous hash" of entry 1. */
export const GENESIS: Uint8Array = new Uint8Array(HASH_SIZE);

const INT64_MIN = -(2n ** 63n);
const INT64_MAX = 2n ** 63n - 1n;
const utf8 = new TextEncoder();

/** An entry does not chain to the one before it, or a number is skipped or repeated. */
export class ChainBroken extends Error {
  constructor(
    readonly ledger: string,
    readonly sequence: bigint,
    readonly problem: string,
  ) {
    super(`${ledger}: entry ${sequence}: ${problem}`);
    this.name = "ChainBroken";
  }
}

// Big-endian fixed-width integers and u32-length-prefixed UTF-8 strings.
class Writer {
  private readonly parts: Uint8Array[] = [];

  u8(value: number): void {
    this.parts.push(Uint8Array.of(value));
  }

  u32(value: number): void {
    const part = new Uint8Array(4);
    new DataView(part.buffer).setUint32(0, value); // big-endian by default
    this.parts.push(part);
  }

  i64(value: bigint): void {
    // setBigInt64 would wrap silently; the Python side refuses too.
    if (value < INT64_MIN || value > INT64_MAX) throw new RangeError(`${value} is not an int64`);
    const part = new Uint8Array(8);
    new DataView(part.buffer).setBigInt64(0, value);
    this.parts.push(part);
  }

  bytes(raw: Uint8Array): void {
    this.u32(raw.length);
    this.parts.push(raw);
  }

  text(value: string): void {
    this.bytes(utf8.encode(value));
  }

  done(): Uint8Array {
    return Buffer.concat(this.parts);
  }
}

/** One posting as the canonical bytes take it. */
export interface CanonicalPosting {
  debitAccount: string;
  creditAccount: string;
  amount: bigint;
  asset: string;
}

/** The canonical bytes' version for an entry: 2 for a reversal, else 1. */
export function formatVersion(reversesSequence: bigint): number {
  return reversesSequence !== 0n ? REVERSAL_FORMAT_VERSION : FORMAT_VERSION;
}

/**
 * An Entry's postings: `postings` when the server listed them, else the
 * single pair of fields as one posting (an older server's entries).
 */
export function entryPostings(entry: Entry): CanonicalPosting[] {
  if (entry.postings.length > 0) {
    return entry.postings.map(({ debitAccount, creditAccount, amount, asset }) => ({
      debitAccount,
      creditAccount,
      amount,
      asset,
    }));
  }
  const { debitAccount, creditAccount, amount, asset } = entry;
  return [{ debitAccount, creditAccount, amount, asset }];
}

/**
 * The hash covers `postings`; the single-pair fields, outside it, must be
 * empty or repeat the entry's one posting (else they could be changed unseen).
 */
export function singlePairAgrees(entry: Entry): boolean {
  const { debitAccount, creditAccount, amount, asset } = entry;
  if (entry.postings.length === 0) return true;
  if (debitAccount === "" && creditAccount === "" && amount === 0n && asset === "") return true;
  const [only] = entry.postings;
  return (
    entry.postings.length === 1 &&
    only.debitAccount === debitAccount &&
    only.creditAccount === creditAccount &&
    only.amount === amount &&
    only.asset === asset
  );
}

/**
 * The canonical bytes of an Entry as a reader received it: format version 2
 * for a reversal (`reversesSequence` set, then appended), else version 1.
 */
export function canonicalBytes(entry: Entry): Uint8Array {
  const seconds = entry.createdAt?.seconds ?? 0n;
  const nanos = entry.createdAt?.nanos ?? 0;
  const w = new Writer();
  w.u8(formatVersion(entry.reversesSequence));
  w.i64(entry.sequence);
  w.i64(seconds * 1_000_000n + BigInt(Math.floor(nanos / 1000)));
  w.text(entry.ledger);
  w.text(entry.idempotencyKey);
  const postings = entryPostings(entry);
  w.u32(postings.length);
  for (const posting of postings) {
    w.text(posting.debitAccount);
    w.text(posting.creditAccount);
    w.i64(posting.amount);
    w.text(posting.asset);
  }
  w.text(entry.entryType);
  w.text(entry.description);
  // By the keys' UTF-8 bytes, the same order in every language; JavaScript's
  // default sort compares UTF-16 code units, which differs above U+FFFF.
  const pairs = Object.entries(entry.metadata).map(([key, value]) => [utf8.encode(key), value] as const);
  pairs.sort(([a], [b]) => Buffer.compare(a, b));
  w.u32(pairs.length);
  for (const [key, value] of pairs) {
    w.bytes(key);
    w.text(value);
  }
  w.text(entry.postedBy);
  if (entry.reversesSequence !== 0n) w.i64(entry.reversesSequence);
  return w.done();
}

/** SHA-256(previous || canonical bytes of entry): the hash `entry` must carry. */
export function chainHash(previous: Uint8Array, entry: Entry): Uint8Array {
  return createHash("sha256").update(previous).update(canonicalBytes(entry)).digest();
}

/** Why `sequence` cannot follow `last`, or undefined if it can. */
export function orderProblem(last: bigint, sequence: bigint): string | undefined {
  if (sequence === last + 1n) return undefined;
  return sequence > last ? `expected entry ${last + 1n} next` : `out of order after entry ${last}`;
}

/**
 * Checks entries as they arrive, in order: each must be the next number and
 * carry the hash that chains it to the one before.
 *
 * Start after entry 0 with nothing, or after entry N with N's hash (from your
 * own records, or GetLedger's head when you start at the head).
 */
export class ChainVerifier {
  private last: bigint;
  private head: Uint8Array;

  constructor(afterSequence = 0n, previousHash?: Uint8Array) {
    if (previousHash === undefined) {
      if (afterSequence !== 0n) throw new Error("verifying after entry N needs entry N's hash");
      previousHash = GENESIS;
    }
    if (previousHash.length !== HASH_SIZE) {
      throw new Error(`a hash is ${HASH_SIZE} bytes, not ${previousHash.length}`);
    }
    this.last = afterSequence;
    this.head = Uint8Array.from(previousHash); // a copy: the caller's array may change
  }

  /** The number of the last entry checked (or the starting point). */
  get sequence(): bigint {
    return this.last;
  }

  /** That entry's hash: keep it with your position to resume verified. */
  get hash(): Uint8Array {
    return Uint8Array.from(this.head);
  }

  /** Throws ChainBroken, naming the entry, unless it chains. */
  check(entry: Entry): void {
    const problem = orderProblem(this.last, entry.sequence);
    if (problem !== undefined) throw new ChainBroken(entry.ledger, entry.sequence, problem);
    if (!singlePairAgrees(entry)) {
      throw new ChainBroken(entry.ledger, entry.sequence, "single-pair fields disagree with postings");
    }
    const expected = chainHash(this.head, entry);
    if (Buffer.compare(expected, entry.hash) !== 0) {
      throw new ChainBroken(entry.ledger, entry.sequence, "hash mismatch");
    }
    this.last = entry.sequence;
    this.head = expected;
  }
}
