// A thin client for ledger.v1.LedgerService over gRPC (HTTP/2, connect-node).
// It adds what every caller would otherwise write: an idempotency key per
// post, retries of UNAVAILABLE and DEADLINE_EXCEEDED with that same key (so a
// retry never posts twice) within a bound on the whole call, and streams that
// resume after their last entry when the connection drops. int64 fields are
// bigint, exact.
import { randomUUID } from "node:crypto";
import { create } from "@bufbuild/protobuf";
import { BinaryReader } from "@bufbuild/protobuf/wire";
import { Code, ConnectError, createClient, type Client } from "@connectrpc/connect";
import { createGrpcTransport } from "@connectrpc/connect-node";
import {
  type Entry,
  ErrorReason,
  type GetAccountResponse,
  type InitializeCounterResponse,
  LedgerService,
  type PostEntryResponse,
  PostEntryRequestSchema,
} from "./gen/ledger/v1/ledger_pb.js";

export * from "./gen/ledger/v1/ledger_pb.js";

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
  /** Attempts per call after UNAVAILABLE or DEADLINE_EXCEEDED (default 6). */
  maxAttempts?: number;
  /** Deadline of each attempt in milliseconds (default 10000). */
  timeoutMs?: number;
  /**
   * Deadline of a whole retried call, backoff included, in milliseconds
   * (default 30000); `null`: only maxAttempts bounds it, at up to
   * maxAttempts × timeoutMs plus backoff.
   */
  totalTimeoutMs?: number | null;
}

// Codes after which a post (with its idempotency key) or InitializeCounter is
// sent again: after an unknown outcome the retry replays, never doubles.
const RETRYABLE = new Set([Code.Unavailable, Code.DeadlineExceeded]);
// Codes after which a stream reconnects from its position. A stream has no
// deadline of ours, so a DEADLINE_EXCEEDED on one is the caller's signal.
const RESUMABLE = new Set([Code.Unavailable]);

export class LedgerClient {
  /** The generated client, for anything this wrapper does not cover. */
  readonly raw: Client<typeof LedgerService>;
  private readonly maxAttempts: number;
  private readonly timeoutMs: number;
  private readonly totalTimeoutMs: number | null;

  /** `baseUrl` like "http://127.0.0.1:50051". */
  constructor(baseUrl: string, options: ClientOptions = {}) {
    this.raw = createClient(LedgerService, createGrpcTransport({ baseUrl }));
    this.maxAttempts = options.maxAttempts ?? 6;
    this.timeoutMs = options.timeoutMs ?? 10_000;
    this.totalTimeoutMs = options.totalTimeoutMs === undefined ? 30_000 : options.totalTimeoutMs;
  }

  /**
   * Calls `call(timeoutMs)` again after a retryable failure, within maxAttempts and
   * totalTimeoutMs; each attempt's timeoutMs is what is left, at most this.timeoutMs.
   */
  private async retrying<T>(call: (timeoutMs: number) => Promise<T>): Promise<T> {
    const deadline = this.totalTimeoutMs === null ? Infinity : Date.now() + this.totalTimeoutMs;
    for (let attempt = 0; ; attempt++) {
      try {
        return await call(Math.min(this.timeoutMs, deadline - Date.now()));
      } catch (error) {
        const code = ConnectError.from(error).code;
        if (!RETRYABLE.has(code) || attempt + 1 >= this.maxAttempts) throw error;
        const delay = Math.random() * Math.min(3000, 100 * 2 ** attempt);
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
    const request = create(PostEntryRequestSchema, {
      ledger,
      idempotencyKey: input.idempotencyKey ?? randomUUID(),
      debitAccount: input.debitAccount,
      creditAccount: input.creditAccount,
      amount: input.amount,
      asset: input.asset,
      entryType: input.entryType ?? "",
      description: input.description ?? "",
      metadata: input.metadata ?? {},
    });
    return this.retrying((timeoutMs) => this.raw.postEntry(request, { timeoutMs }));
  }

  getAccount(ledger: string, account: string): Promise<GetAccountResponse> {
    return this.raw.getAccount({ ledger, account }, { timeoutMs: this.timeoutMs });
  }

  /**
   * Entries after `afterSequence`, in order. With `follow`, keeps going as
   * entries commit; after UNAVAILABLE it reconnects from the last entry it
   * yielded, so no entry is yielded twice or skipped.
   */
  async *streamEntries(
    ledger: string,
    options: { afterSequence?: bigint; follow?: boolean; signal?: AbortSignal } = {},
  ): AsyncGenerator<Entry> {
    let position = options.afterSequence ?? 0n;
    let failures = 0;
    for (;;) {
      try {
        const stream = this.raw.streamEntries(
          { ledger, afterSequence: position, follow: options.follow ?? false },
          { signal: options.signal },
        );
        for await (const message of stream) {
          failures = 0;
          for (const entry of message.entries) {
            if (entry.sequence !== position + 1n) {
              throw new Error(`stream out of order: expected ${position + 1n}, got ${entry.sequence}`);
            }
            position = entry.sequence;
            yield entry;
          }
        }
        return;
      } catch (error) {
        const code = ConnectError.from(error).code;
        if (!RESUMABLE.has(code) || ++failures >= this.maxAttempts) throw error;
        await sleep(Math.random() * Math.min(3000, 100 * 2 ** failures));
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

function sleep(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}
