// A thin client for ledger.v1.LedgerService over gRPC (HTTP/2, connect-node).
// It adds what every caller would otherwise write: credentials (a bearer
// token, TLS, mTLS) on every call, an idempotency key per post, retries of
// UNAVAILABLE and DEADLINE_EXCEEDED with that same key (so a retry never posts
// twice) within a time bound on the whole call, and streams that resume after
// their last entry when the connection drops, for as long as
// reconnectTimeoutMs allows, checking the hash chain if asked
// (docs/integrity.md), and pages of accounts walked to the end; named
// consumers that acknowledge what they processed (consume). int64 fields are
// bigint, exact.
import { randomUUID } from "node:crypto";
import { create } from "@bufbuild/protobuf";
import { BinaryReader } from "@bufbuild/protobuf/wire";
import { Code, ConnectError, createClient, type Client, type Interceptor } from "@connectrpc/connect";
import { createGrpcTransport } from "@connectrpc/connect-node";
import {
  type AccountSummary,
  type AckEntriesResponse,
  type Entry,
  type EntryInput,
  EntryInputSchema,
  ErrorReason,
  type GetAccountResponse,
  type GetEntryResponse,
  GetEntryRequestSchema,
  type GetLedgerResponse,
  type InitializeCounterResponse,
  LedgerService,
  type ListAccountsResponse,
  type ListConsumersResponse,
  type PostEntriesResponse,
  PostEntriesRequestSchema,
  type PostEntryResponse,
  PostEntryRequestSchema,
  PostingSchema,
  type ReverseEntryResponse,
  ReverseEntryRequestSchema,
  type SetAccountLimitsResponse,
  SetAccountLimitsRequestSchema,
  type StreamEntriesResponse,
} from "./gen/ledger/v1/ledger_pb.js";
import { ChainBroken, ChainVerifier, HASH_SIZE, orderProblem } from "./integrity.js";

export * from "./gen/ledger/v1/ledger_pb.js";
export {
  ChainBroken,
  ChainVerifier,
  type CanonicalPosting,
  FORMAT_VERSION,
  GENESIS,
  HASH_SIZE,
  REVERSAL_FORMAT_VERSION,
  canonicalBytes,
  chainHash,
  entryPostings,
  formatVersion,
} from "./integrity.js";

/** One movement of an entry: `amount` of `asset` from `creditAccount` to `debitAccount`. */
export interface PostingInput {
  debitAccount: string;
  creditAccount: string;
  /** Minor units of `asset`, > 0. */
  amount: bigint;
  asset: string;
}

/** What every entry may carry besides its postings. */
export interface EntryDetails {
  /** Defaults to a random UUID, reused by every retry of this call. */
  idempotencyKey?: string;
  entryType?: string;
  description?: string;
  metadata?: Record<string, string>;
}

/** An entry with one posting, given as the single pair of fields. */
export interface SinglePostInput extends PostingInput, EntryDetails {
  postings?: undefined;
}

/**
 * An entry with 1 to 64 postings, applied together under one number (limits
 * are checked on their net effect). The single pair of fields stays unset:
 * an entry uses one form or the other.
 */
export interface MultiPostInput extends EntryDetails {
  postings: readonly PostingInput[];
  debitAccount?: undefined;
  creditAccount?: undefined;
  amount?: undefined;
  asset?: undefined;
}

/** An entry to post, in either form. */
export type PostInput = SinglePostInput | MultiPostInput;

/** SetAccountLimits' limits; one left out is no bound (the call replaces both). */
export interface AccountLimits {
  /** Upper bound of the balance (debits - credits); 0: it cannot go negative. May be negative. */
  maxNetDebit?: bigint;
  /** Upper bound of credits - debits. */
  maxNetCredit?: bigint;
}

/** GetEntry's selector: exactly one of the two. */
export type EntrySelector =
  | { sequence: bigint; idempotencyKey?: undefined }
  | { idempotencyKey: string; sequence?: undefined };

export interface ListAccountsOptions {
  /** Accounts per page: 0 or unset for the server's default (100), at most 1000. */
  pageSize?: number;
  /** The previous page's `nextPageToken`; unset or empty for the first page. */
  pageToken?: string;
}

export interface ClientOptions {
  /** Sent as `authorization: Bearer <token>` on every call; never logged. */
  token?: string;
  /**
   * TLS (an "https://" baseUrl): PEM of the CAs to trust, instead of Node's
   * defaults. `cert` and `key` (PEM) add a client certificate (mTLS).
   */
  ca?: string | Buffer;
  cert?: string | Buffer;
  key?: string | Buffer;
  /** The name to verify the server's certificate against, when the URL's host is not it. */
  serverName?: string;
  /** Attempts per call (default: no limit, the time budgets bound them). */
  maxAttempts?: number;
  /** Deadline of each attempt in milliseconds (default 10000). */
  timeoutMs?: number;
  /**
   * Deadline of a whole retried call, backoff included, in milliseconds
   * (default 30000); `null`: only maxAttempts bounds it, at up to
   * maxAttempts × timeoutMs plus backoff.
   */
  totalTimeoutMs?: number | null;
  /**
   * How long a stream keeps reconnecting after its last message, in
   * milliseconds (default 60000: a restart or failover is ridden through);
   * `null`: for ever, unless maxAttempts failures in a row.
   */
  reconnectTimeoutMs?: number | null;
}

export interface MessageStreamOptions {
  /** Entries after this number are yielded (default 0: from the first). */
  afterSequence?: bigint;
  /** Keep going as entries commit, instead of ending at the ledger's end. */
  follow?: boolean;
  signal?: AbortSignal;
  /**
   * A named consumer (ackEntries): with afterSequence 0 the server starts after
   * its stored position; a reconnect resumes from the client's own position.
   */
  consumer?: string;
  /**
   * Only entries with a posting on this account, in number order but not
   * consecutive; the stream resumes from the last message's throughSequence.
   */
  account?: string;
}

export interface StreamOptions extends MessageStreamOptions {
  /**
   * Check the hash chain; a break throws ChainBroken out of the iterator. It
   * needs every entry from a known start: not with `account`, and with
   * `consumer` only with a non-zero afterSequence (a TypeError otherwise).
   */
  verify?: boolean;
  /** With `verify`, the hash of entry `afterSequence`, from your own records. */
  previousHash?: Uint8Array;
}

export interface ConsumeOptions {
  /** Acknowledge after this many processed entries (default 100). */
  ackEvery?: number;
  /**
   * Acknowledge once this many milliseconds passed since the last ack (default
   * 1000), checked as entries and heartbeats arrive; `null`: by count only.
   */
  ackIntervalMs?: number | null;
  /** Only this account's entries; the position still moves over the others. */
  account?: string;
  /** Keep following once caught up (default true); false: end there. */
  follow?: boolean;
  signal?: AbortSignal;
}

// Codes after which a unary call is sent again: a post or reversal with its
// idempotency key (after an unknown outcome the retry replays, never doubles),
// InitializeCounter and SetAccountLimits (idempotent: they set, not add), reads.
const RETRYABLE = new Set([Code.Unavailable, Code.DeadlineExceeded]);
// Codes after which a stream reconnects from its position. A stream has no
// deadline of ours, so a DEADLINE_EXCEEDED on one is the caller's signal.
const RESUMABLE = new Set([Code.Unavailable]);

// A failed call's code, a lost connection as UNAVAILABLE: connect-node reports a
// call cut by a dying HTTP/2 session as CANCELED (stream reset) or ABORTED (with
// the ECONNRESET as cause). Unless the caller cancelled: then CANCELED is theirs.
function failureCode(error: unknown, signal?: AbortSignal): Code {
  const { code, cause } = ConnectError.from(error);
  if (signal?.aborted) return code;
  if (code === Code.Canceled || (code === Code.Aborted && cause instanceof Error)) return Code.Unavailable;
  return code;
}

export class LedgerClient {
  /** The generated client, for anything this wrapper does not cover. */
  readonly raw: Client<typeof LedgerService>;
  private readonly maxAttempts: number;
  private readonly timeoutMs: number;
  private readonly totalTimeoutMs: number | null;
  private readonly reconnectTimeoutMs: number | null;

  /** `baseUrl` like "http://127.0.0.1:50051", or "https://..." for TLS. */
  constructor(baseUrl: string, options: ClientOptions = {}) {
    this.maxAttempts = options.maxAttempts ?? Infinity;
    this.timeoutMs = options.timeoutMs ?? 10_000;
    this.totalTimeoutMs = options.totalTimeoutMs === undefined ? 30_000 : options.totalTimeoutMs;
    this.reconnectTimeoutMs =
      options.reconnectTimeoutMs === undefined ? 60_000 : options.reconnectTimeoutMs;
    if (this.totalTimeoutMs === null && this.maxAttempts === Infinity) {
      throw new Error("totalTimeoutMs null needs a finite maxAttempts");
    }
    const { token, ca, cert, key, serverName } = options;
    const tls = ca !== undefined || cert !== undefined || key !== undefined || serverName !== undefined;
    if (tls && !baseUrl.startsWith("https:")) throw new Error("TLS options need an https:// baseUrl");
    if ((cert === undefined) !== (key === undefined)) throw new Error("cert and key go together (mTLS)");
    const interceptors: Interceptor[] = [];
    if (token !== undefined) {
      // Checked here so a bad token fails at once, with a message that never shows it.
      if (!/^[\x21-\x7e]+$/.test(token)) throw new Error("token must be printable ASCII without spaces");
      const authorization = `Bearer ${token}`;
      interceptors.push((next) => (request) => {
        request.header.set("authorization", authorization);
        return next(request);
      });
    }
    const nodeOptions = tls ? { ca, cert, key, servername: serverName } : undefined;
    this.raw = createClient(LedgerService, createGrpcTransport({ baseUrl, interceptors, nodeOptions }));
  }

  /**
   * Calls `call(timeoutMs)` again after a retryable failure, within maxAttempts and
   * totalTimeoutMs; each attempt's timeoutMs is what is left, at most this.timeoutMs.
   */
  private async retrying<T>(call: (timeoutMs: number) => Promise<T>): Promise<T> {
    const deadline = this.totalTimeoutMs === null ? Infinity : Date.now() + this.totalTimeoutMs;
    for (let attempt = 0; ; attempt++) {
      try {
        return await call(Math.max(1, Math.min(this.timeoutMs, deadline - Date.now())));
      } catch (error) {
        if (!RETRYABLE.has(failureCode(error)) || attempt + 1 >= this.maxAttempts) throw error;
        const delay = backoff(attempt);
        if (Date.now() + delay >= deadline) throw error; // no time left for another attempt
        await sleep(delay);
      }
    }
  }

  initializeCounter(ledger: string): Promise<InitializeCounterResponse> {
    // Idempotent by contract, so safe to retry.
    return this.retrying((timeoutMs) => this.raw.initializeCounter({ ledger }, { timeoutMs }));
  }

  /**
   * Posts one entry, retrying with the same idempotency key. If an attempt
   * committed but its answer was lost, the next returns that entry with
   * `replayed` true.
   */
  postEntry(ledger: string, input: PostInput): Promise<PostEntryResponse> {
    const request = create(PostEntryRequestSchema, { ledger, ...entryInput(input) });
    return this.retrying((timeoutMs) => this.raw.postEntry(request, { timeoutMs }));
  }

  /**
   * Posts entries atomically (all or none), retrying with the same keys: an
   * entry without `idempotencyKey` gets a random UUID, reused by every retry.
   */
  postEntries(ledger: string, inputs: readonly PostInput[]): Promise<PostEntriesResponse> {
    const entries = inputs.map((input) => create(EntryInputSchema, entryInput(input)));
    const request = create(PostEntriesRequestSchema, { ledger, entries });
    return this.retrying((timeoutMs) => this.raw.postEntries(request, { timeoutMs }));
  }

  /**
   * An account's totals per asset, now or, with `asOfSequence` N > 0, as of
   * entry N (entries 1..N exactly; beyond the ledger's last: OUT_OF_RANGE).
   */
  getAccount(
    ledger: string,
    account: string,
    options: { asOfSequence?: bigint } = {},
  ): Promise<GetAccountResponse> {
    // A read: safe to retry.
    const request = { ledger, account, asOfSequence: options.asOfSequence ?? 0n };
    return this.retrying((timeoutMs) => this.raw.getAccount(request, { timeoutMs }));
  }

  /** The ledger's head: its last number and that entry's hash, read together. */
  getLedger(ledger: string): Promise<GetLedgerResponse> {
    // A read: safe to retry.
    return this.retrying((timeoutMs) => this.raw.getLedger({ ledger }, { timeoutMs }));
  }

  /**
   * Sets an account's balance limits in one asset, replacing both: a limit
   * left out is no bound, so `{}` removes them. Refused with
   * BALANCE_LIMIT_EXCEEDED when the current balance already breaks one.
   */
  setAccountLimits(
    ledger: string,
    account: string,
    asset: string,
    limits: AccountLimits = {},
  ): Promise<SetAccountLimitsResponse> {
    // It sets values, so sending it again changes nothing: safe to retry.
    const request = create(SetAccountLimitsRequestSchema, {
      ledger,
      account,
      asset,
      maxNetDebit: limits.maxNetDebit,
      maxNetCredit: limits.maxNetCredit,
    });
    return this.retrying((timeoutMs) => this.raw.setAccountLimits(request, { timeoutMs }));
  }

  /**
   * Reverses entry `sequence`: posts a new entry with its postings swapped
   * and `reversesSequence` set, retrying with `idempotencyKey` (keep it: the
   * same key replays the reversal, another fails ALREADY_REVERSED).
   */
  reverseEntry(
    ledger: string,
    sequence: bigint,
    idempotencyKey: string,
    options: { description?: string } = {},
  ): Promise<ReverseEntryResponse> {
    const request = create(ReverseEntryRequestSchema, {
      ledger,
      sequence,
      idempotencyKey,
      description: options.description ?? "",
    });
    return this.retrying((timeoutMs) => this.raw.reverseEntry(request, { timeoutMs }));
  }

  /** One entry, by number or by idempotency key (NOT_FOUND, ENTRY_NOT_FOUND, if none). */
  getEntry(ledger: string, selector: EntrySelector): Promise<GetEntryResponse> {
    const bySequence = selector.sequence !== undefined;
    if (bySequence === (selector.idempotencyKey !== undefined)) {
      throw new TypeError("getEntry needs exactly one of sequence and idempotencyKey");
    }
    const request = create(GetEntryRequestSchema, {
      ledger,
      selector: bySequence
        ? { case: "sequence", value: selector.sequence! }
        : { case: "idempotencyKey", value: selector.idempotencyKey! },
    });
    // A read: safe to retry.
    return this.retrying((timeoutMs) => this.raw.getEntry(request, { timeoutMs }));
  }

  /**
   * One page of a ledger's accounts with their balances, ordered by name;
   * pass its `nextPageToken` as `pageToken` for the next (empty on the last).
   */
  listAccounts(ledger: string, options: ListAccountsOptions = {}): Promise<ListAccountsResponse> {
    const request = { ledger, pageSize: options.pageSize ?? 0, pageToken: options.pageToken ?? "" };
    // A read: safe to retry.
    return this.retrying((timeoutMs) => this.raw.listAccounts(request, { timeoutMs }));
  }

  /**
   * Every account of a ledger, ordered by name, page after page. Each page is
   * read in a snapshot of its own (its `asOfSequence`), so accounts posted to
   * meanwhile may show totals of different moments.
   */
  async *accounts(ledger: string, options: { pageSize?: number } = {}): AsyncGenerator<AccountSummary> {
    let pageToken = "";
    do {
      const page = await this.listAccounts(ledger, { pageSize: options.pageSize, pageToken });
      yield* page.accounts;
      pageToken = page.nextPageToken;
    } while (pageToken !== "");
  }

  /** Stores `consumer`'s position: it has processed every entry up to `sequence`. */
  ackEntries(ledger: string, consumer: string, sequence: bigint): Promise<AckEntriesResponse> {
    // The same position again is a success: safe to retry. Below the stored one:
    // FAILED_PRECONDITION, CONSUMER_POSITION_BEHIND.
    const request = { ledger, consumer, sequence };
    return this.retrying((timeoutMs) => this.raw.ackEntries(request, { timeoutMs }));
  }

  /** A ledger's named consumers with their positions and lag. */
  listConsumers(ledger: string): Promise<ListConsumersResponse> {
    // A read: safe to retry.
    return this.retrying((timeoutMs) => this.raw.listConsumers({ ledger }, { timeoutMs }));
  }

  /**
   * Follows `consumer` from after its stored position and acknowledges what the
   * caller processed: an entry is processed once the next one is asked for.
   * Acks go out every `ackEvery` entries or `ackIntervalMs`, whichever first,
   * on `ack()` and on `close()`. After a crash the consumer gets again exactly
   * the entries after its last ack: at least once, in order.
   */
  consume(ledger: string, consumer: string, options: ConsumeOptions = {}): ConsumerStream {
    const stop = new AbortController();
    const signal = options.signal ? AbortSignal.any([options.signal, stop.signal]) : stop.signal;
    const messages = this.streamMessages(ledger, {
      follow: options.follow ?? true,
      consumer,
      account: options.account,
      signal,
    });
    return new ConsumerStream(messages, (sequence) => this.ackEntries(ledger, consumer, sequence), stop, {
      ackEvery: options.ackEvery ?? 100,
      ackIntervalMs: options.ackIntervalMs === undefined ? 1000 : options.ackIntervalMs,
    });
  }

  /**
   * StreamEntries messages (entries, caught-up markers, heartbeats) after
   * `afterSequence`. After UNAVAILABLE it reconnects from its position (the
   * last message's throughSequence, or its last entry), so no entry is
   * yielded twice or skipped, for reconnectTimeoutMs after the last message.
   */
  streamMessages(ledger: string, options: MessageStreamOptions = {}): AsyncGenerator<StreamEntriesResponse> {
    return this.messages(ledger, options, true);
  }

  /**
   * Entries after `afterSequence` (with `consumer` and afterSequence 0: after
   * the consumer's stored position), in order; with `account`, only those
   * posting to it. With `follow`, keeps going as entries commit; after
   * UNAVAILABLE it reconnects from its position, so no entry is yielded twice
   * or skipped, for reconnectTimeoutMs after the last message received.
   *
   * With `verify`, every entry is checked against the hash chain before it
   * is yielded, across reconnects too: a changed, skipped or repeated entry
   * throws ChainBroken, naming it (docs/integrity.md). From afterSequence 0
   * the chain starts at the 32 zero bytes. After entry N > 0 it starts at
   * `previousHash`, N's hash from your own records (keep it with your
   * position). Without previousHash the client reads entry N too, does not
   * yield it, and trusts its hash as the starting point: the entries after N
   * are proven to extend N, not N itself. If the ledger has no entry N yet
   * that fails OUT_OF_RANGE, as the server does for a position beyond its end.
   * The chain needs a known start and every entry: verify with `account`, or
   * with `consumer` and afterSequence 0, throws a TypeError.
   */
  async *streamEntries(ledger: string, options: StreamOptions = {}): AsyncGenerator<Entry> {
    const verify = options.verify ?? false;
    let start = options.afterSequence ?? 0n;
    if (verify && (options.account ?? "") !== "") {
      throw new TypeError("verify checks consecutive entries: it cannot be combined with account");
    }
    if (verify && (options.consumer ?? "") !== "" && start === 0n) {
      throw new TypeError(
        "verify needs a known start: with consumer, pass afterSequence (the consumer's position) and previousHash",
      );
    }
    let verifier: ChainVerifier | undefined;
    if (verify && (start === 0n || options.previousHash !== undefined)) {
      verifier = new ChainVerifier(start, options.previousHash);
    } else if (verify) {
      start -= 1n; // to read entry N, for its hash
    }
    const { follow, signal, account } = options;
    // With verify, afterSequence wins over a consumer's position, so it is not sent;
    // the verifier checks the order, naming the entry.
    const consumer = verify ? undefined : options.consumer;
    const messages = this.messages(ledger, { afterSequence: start, follow, signal, consumer, account }, !verify);
    for await (const message of messages) {
      for (const entry of message.entries) {
        if (verifier !== undefined) {
          verifier.check(entry);
        } else if (verify) {
          // Entry N, read only to take its hash on trust as the starting point.
          const problem = orderProblem(start, entry.sequence);
          if (problem !== undefined) throw new ChainBroken(ledger, entry.sequence, problem);
          if (entry.hash.length !== HASH_SIZE) {
            throw new ChainBroken(ledger, entry.sequence, `no hash to start from (${entry.hash.length} bytes)`);
          }
          verifier = new ChainVerifier(entry.sequence, entry.hash);
          continue;
        }
        yield entry;
      }
      if (verifier === undefined && verify && message.caughtUp) {
        // Streaming from N-1 made the server accept a position one beyond its end.
        throw new ConnectError(
          `${ledger}: after_sequence ${start + 1n} is beyond the last entry ${message.headSequence}`,
          Code.OutOfRange,
        );
      }
    }
  }

  /** The resuming stream of messages; `checkOrder` false when a verifier checks it instead. */
  private async *messages(
    ledger: string,
    options: MessageStreamOptions,
    checkOrder: boolean,
  ): AsyncGenerator<StreamEntriesResponse> {
    const account = options.account ?? "";
    const consumer = options.consumer ?? "";
    let position = options.afterSequence ?? 0n;
    // Until a message came, a consumer's start (position 0) is the server's.
    let startUnknown = consumer !== "" && position === 0n;
    let failures = 0;
    let since = Date.now(); // the budget restarts with every message
    for (;;) {
      // Leaving the loop over a call (an error, ChainBroken, the caller's break)
      // does not end it: a following call would stay open. Aborted in finally.
      const call = new AbortController();
      const signal = options.signal ? AbortSignal.any([options.signal, call.signal]) : call.signal;
      try {
        const request = {
          ledger,
          afterSequence: position,
          follow: options.follow ?? false,
          consumer: startUnknown ? consumer : "",
          account,
        };
        for await (const message of this.raw.streamEntries(request, { signal })) {
          failures = 0;
          since = Date.now();
          if (checkOrder) {
            // Guards the guarantee rather than trusting it.
            let last = startUnknown ? undefined : position;
            for (const { sequence } of message.entries) {
              if (last !== undefined && (account !== "" ? sequence <= last : sequence !== last + 1n)) {
                const expected = account !== "" ? `above ${last}` : `${last + 1n}`;
                throw new Error(`stream out of order: expected ${expected}, got ${sequence}`);
              }
              last = sequence;
            }
          }
          for (const { sequence } of message.entries) if (sequence > position) position = sequence;
          if (message.throughSequence > position) position = message.throughSequence;
          startUnknown = false;
          yield message;
        }
        return;
      } catch (error) {
        const code = failureCode(error, options.signal);
        if (!RESUMABLE.has(code) || ++failures >= this.maxAttempts) throw error;
        const delay = backoff(failures);
        const budget = this.reconnectTimeoutMs ?? Infinity;
        if (Date.now() + delay >= since + budget) throw error; // away longer than the budget
        await sleep(delay);
      } finally {
        call.abort();
      }
    }
  }
}

/**
 * A named consumer's entries from after its stored position (LedgerClient.consume),
 * an async iterator that acknowledges what was processed.
 *
 * An entry counts as processed once the next one is asked for, or on `ack()` or
 * `close()`. Leaving a `for await` loop (break, or an error in its body) ends the
 * call and acknowledges the entries before the one in hand, which a restart then
 * delivers again: a loop cannot tell a break from a failure. Call `close()` (or
 * `ack()`) first to count the one in hand too.
 */
export class ConsumerStream implements AsyncIterableIterator<Entry> {
  private readonly ackEvery: number;
  private readonly ackIntervalMs: number | null;
  private position_ = 0n;
  private acked_ = 0n;
  private pending: Entry[] = [];
  private through = 0n;
  private inHand: bigint | undefined; // the position the entry in hand reaches
  private processed = 0; // entries processed since the last ack
  private lastAck = Date.now();
  private closed = false;

  constructor(
    private readonly messages: AsyncGenerator<StreamEntriesResponse>,
    private readonly sendAck: (sequence: bigint) => Promise<AckEntriesResponse>,
    private readonly stop: AbortController,
    options: { ackEvery: number; ackIntervalMs: number | null },
  ) {
    if (!(options.ackEvery >= 1)) throw new RangeError("ackEvery must be at least 1");
    if (options.ackIntervalMs !== null && !(options.ackIntervalMs > 0)) {
      throw new RangeError("ackIntervalMs must be positive, or null");
    }
    this.ackEvery = options.ackEvery;
    this.ackIntervalMs = options.ackIntervalMs;
  }

  /**
   * The number the next ack stores: every entry the stream should send up to it
   * was processed (0n before any). With `account` it moves over the entries that
   * did not match, as the messages' throughSequence does.
   */
  get position(): bigint {
    return this.position_;
  }

  /** The last position this stream acknowledged (0n: none yet). */
  get acked(): bigint {
    return this.acked_;
  }

  [Symbol.asyncIterator](): ConsumerStream {
    return this;
  }

  async next(): Promise<IteratorResult<Entry, undefined>> {
    if (this.closed) return { done: true, value: undefined };
    this.settle();
    await this.ackIfDue();
    for (;;) {
      const entry = this.pending.shift();
      if (entry !== undefined) {
        this.inHand = this.pending.length > 0 ? entry.sequence : max(entry.sequence, this.through);
        return { done: false, value: entry };
      }
      let step: IteratorResult<StreamEntriesResponse>;
      try {
        step = await this.messages.next();
      } catch (error) {
        if (this.closed) return { done: true, value: undefined }; // close() ended the call
        throw error;
      }
      if (step.done) {
        await this.close(); // the stream ended (follow false): all of it processed
        return { done: true, value: undefined };
      }
      const message = step.value;
      if (message.entries.length > 0) {
        this.pending = [...message.entries];
        this.through = message.throughSequence;
      } else {
        // A caught-up marker or heartbeat: the filter's progress moves on.
        this.position_ = max(this.position_, message.throughSequence);
        await this.ackIfDue();
      }
    }
  }

  /** Leaving a `for await` loop: ends the call, the entry in hand not counted. */
  async return(): Promise<IteratorResult<Entry, undefined>> {
    this.inHand = undefined;
    await this.close();
    return { done: true, value: undefined };
  }

  /** Counts the entry in hand as processed and stores the position now; returns the stored position. */
  async ack(): Promise<bigint> {
    this.settle();
    await this.sendIfAhead();
    return this.acked_;
  }

  /** Counts the entry in hand as processed, acknowledges, and ends the call. */
  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    try {
      await this.ack();
    } finally {
      this.stop.abort();
      await this.messages.return(undefined).catch(() => undefined);
    }
  }

  private settle(): void {
    if (this.inHand !== undefined) {
      this.position_ = max(this.position_, this.inHand);
      this.processed++;
      this.inHand = undefined;
    }
  }

  private async ackIfDue(): Promise<void> {
    if (this.position_ <= this.acked_) return;
    const interval = this.ackIntervalMs;
    if (this.processed >= this.ackEvery || (interval !== null && Date.now() - this.lastAck >= interval)) {
      await this.sendIfAhead();
    }
  }

  private async sendIfAhead(): Promise<void> {
    const position = this.position_;
    if (position <= this.acked_) return;
    const stored = await this.sendAck(position);
    this.acked_ = max(this.acked_, stored.sequence);
    this.processed = 0;
    this.lastAck = Date.now();
  }
}

function max(a: bigint, b: bigint): bigint {
  return a > b ? a : b;
}

/**
 * The wire reason of an `ErrorReason` value: its name in the contract without
 * the `ERROR_REASON_` prefix, e.g. "COUNTER_NOT_INITIALIZED". Compare it with
 * `errorReason(error)`.
 */
export function reasonName(reason: ErrorReason): string {
  // protoc-gen-es already drops the shared prefix from the member names.
  return ErrorReason[reason];
}

/** The `google.rpc.ErrorInfo` reason of a failed call (e.g. "COUNTER_NOT_INITIALIZED"). */
export function errorReason(error: unknown): string | undefined {
  for (const detail of ConnectError.from(error).details) {
    if ("type" in detail && detail.type === "google.rpc.ErrorInfo") {
      const reader = new BinaryReader(detail.value);
      while (reader.pos < reader.len) {
        const [field, wireType] = reader.tag();
        if (field === 1) return reader.string(); // ErrorInfo.reason
        reader.skip(wireType);
      }
    }
  }
  return undefined;
}

function entryInput(input: PostInput): Omit<EntryInput, "$typeName"> {
  // Whatever is given is sent: an entry with both forms is the server's to
  // refuse (INVALID_ARGUMENT), naming the fields.
  return {
    idempotencyKey: input.idempotencyKey ?? randomUUID(),
    debitAccount: input.debitAccount ?? "",
    creditAccount: input.creditAccount ?? "",
    amount: input.amount ?? 0n,
    asset: input.asset ?? "",
    entryType: input.entryType ?? "",
    description: input.description ?? "",
    metadata: input.metadata ?? {},
    postings: (input.postings ?? []).map(({ debitAccount, creditAccount, amount, asset }) =>
      create(PostingSchema, { debitAccount, creditAccount, amount, asset }),
    ),
  };
}

// Full jitter, up to 3 s: many clients retrying after one outage do not stampede.
function backoff(attempt: number): number {
  return Math.random() * Math.min(3000, 100 * 2 ** attempt);
}

function sleep(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}
