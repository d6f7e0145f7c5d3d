// A thin client for ledger.v1.LedgerService over gRPC (HTTP/2, connect-node).
// It adds what every caller would otherwise write: credentials (a bearer
// token, TLS, mTLS) on every call, an idempotency key per post, retries of
// UNAVAILABLE and DEADLINE_EXCEEDED with that same key (so a retry never posts
// twice) within a time bound on the whole call, and streams that resume after
// their last entry when the connection drops, for as long as
// reconnectTimeoutMs allows, checking the hash chain if asked
// (docs/integrity.md). int64 fields are bigint, exact.
import { randomUUID } from "node:crypto";
import { create } from "@bufbuild/protobuf";
import { BinaryReader } from "@bufbuild/protobuf/wire";
import { Code, ConnectError, createClient, type Client, type Interceptor } from "@connectrpc/connect";
import { createGrpcTransport } from "@connectrpc/connect-node";
import {
  type Entry,
  type EntryInput,
  EntryInputSchema,
  ErrorReason,
  type GetAccountResponse,
  type GetLedgerResponse,
  type InitializeCounterResponse,
  LedgerService,
  type PostEntriesResponse,
  PostEntriesRequestSchema,
  type PostEntryResponse,
  PostEntryRequestSchema,
} from "./gen/ledger/v1/ledger_pb.js";
import { ChainBroken, ChainVerifier, HASH_SIZE, orderProblem } from "./integrity.js";

export * from "./gen/ledger/v1/ledger_pb.js";
export {
  ChainBroken,
  ChainVerifier,
  FORMAT_VERSION,
  GENESIS,
  HASH_SIZE,
  canonicalBytes,
  chainHash,
} from "./integrity.js";

export interface PostInput {
  debitAccount: string;
  creditAccount: string;
  /** Minor units of `asset`, > 0. */
  amount: bigint;
  asset: string;
  /** Defaults to a random UUID, reused by every retry of this call. */
  idempotencyKey?: string;
  entryType?: string;
  description?: string;
  metadata?: Record<string, string>;
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

// Codes after which a post (with its idempotency key) or InitializeCounter is
// sent again: after an unknown outcome the retry replays, never doubles.
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

  getAccount(ledger: string, account: string): Promise<GetAccountResponse> {
    // A read: safe to retry.
    return this.retrying((timeoutMs) => this.raw.getAccount({ ledger, account }, { timeoutMs }));
  }

  /** The ledger's head: its last number and that entry's hash, read together. */
  getLedger(ledger: string): Promise<GetLedgerResponse> {
    // A read: safe to retry.
    return this.retrying((timeoutMs) => this.raw.getLedger({ ledger }, { timeoutMs }));
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
  return {
    idempotencyKey: input.idempotencyKey ?? randomUUID(),
    debitAccount: input.debitAccount,
    creditAccount: input.creditAccount,
    amount: input.amount,
    asset: input.asset,
    entryType: input.entryType ?? "",
    description: input.description ?? "",
    metadata: input.metadata ?? {},
  };
}

// Full jitter, up to 3 s: many clients retrying after one outage do not stampede.
function backoff(attempt: number): number {
  return Math.random() * Math.min(3000, 100 * 2 ** attempt);
}

function sleep(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}
