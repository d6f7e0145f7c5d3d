// A thin client for ledger.v1.LedgerService over gRPC (HTTP/2, connect-node).
// It adds what every caller would otherwise write: credentials (a bearer
// token, TLS, mTLS) on every call, an idempotency key per post, retries of
// UNAVAILABLE and DEADLINE_EXCEEDED with that same key (so a retry never posts
// twice) within a time bound on the whole call, and streams that resume after
// their last entry when the connection drops, for as long as
// reconnectTimeoutMs allows, checking the hash chain if asked
// (docs/integrity.md), and pages of accounts walked to the end. int64 fields
// are bigint, exact.
import { randomUUID } from "node:crypto";
import { create } from "@bufbuild/protobuf";
import { BinaryReader } from "@bufbuild/protobuf/wire";
import { Code, ConnectError, createClient, type Client, type Interceptor } from "@connectrpc/connect";
import { createGrpcTransport } from "@connectrpc/connect-node";
import {
  type AccountSummary,
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
  type PostEntriesResponse,
  PostEntriesRequestSchema,
  type PostEntryResponse,
  PostEntryRequestSchema,
  PostingSchema,
  type ReverseEntryResponse,
  ReverseEntryRequestSchema,
  type SetAccountLimitsResponse,
  SetAccountLimitsRequestSchema,
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

export interface StreamOptions {
  /** Entries after this number are yielded (default 0: from the first). */
  afterSequence?: bigint;
  /** Keep going as entries commit, instead of ending at the ledger's end. */
  follow?: boolean;
  signal?: AbortSignal;
  /** Check the hash chain; a break throws ChainBroken out of the iterator. */
  verify?: boolean;
  /** With `verify`, the hash of entry `afterSequence`, from your own records. */
  previousHash?: Uint8Array;
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

  /**
   * Entries after `afterSequence`, in order. With `follow`, keeps going as
   * entries commit; after UNAVAILABLE it reconnects from the last entry it
   * yielded, so no entry is yielded twice or skipped, for reconnectTimeoutMs
   * after the last message received.
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
   */
  async *streamEntries(ledger: string, options: StreamOptions = {}): AsyncGenerator<Entry> {
    const verify = options.verify ?? false;
    let position = options.afterSequence ?? 0n;
    let verifier: ChainVerifier | undefined;
    if (verify && (position === 0n || options.previousHash !== undefined)) {
      verifier = new ChainVerifier(position, options.previousHash);
    } else if (verify) {
      position -= 1n; // to read entry N, for its hash
    }
    let failures = 0;
    let since = Date.now(); // the budget restarts with every message
    for (;;) {
      // Leaving the loop over a call (an error, ChainBroken, the caller's break)
      // does not end it: a following call would stay open. Aborted in finally.
      const call = new AbortController();
      const signal = options.signal ? AbortSignal.any([options.signal, call.signal]) : call.signal;
      try {
        const stream = this.raw.streamEntries(
          { ledger, afterSequence: position, follow: options.follow ?? false },
          { signal },
        );
        for await (const message of stream) {
          failures = 0;
          since = Date.now();
          for (const entry of message.entries) {
            if (verifier !== undefined) {
              verifier.check(entry);
            } else if (verify) {
              // Entry N, read only to take its hash on trust as the starting point.
              const problem = orderProblem(position, entry.sequence);
              if (problem !== undefined) throw new ChainBroken(ledger, entry.sequence, problem);
              if (entry.hash.length !== HASH_SIZE) {
                throw new ChainBroken(ledger, entry.sequence, `no hash to start from (${entry.hash.length} bytes)`);
              }
              verifier = new ChainVerifier(entry.sequence, entry.hash);
              position = entry.sequence;
              continue;
            } else if (entry.sequence !== position + 1n) {
              throw new Error(`stream out of order: expected ${position + 1n}, got ${entry.sequence}`);
            }
            position = entry.sequence;
            yield entry;
          }
          if (verifier === undefined && verify && message.caughtUp) {
            // Streaming from N-1 made the server accept a position one beyond its end.
            throw new ConnectError(
              `${ledger}: after_sequence ${position + 1n} is beyond the last entry ${message.headSequence}`,
              Code.OutOfRange,
            );
          }
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
