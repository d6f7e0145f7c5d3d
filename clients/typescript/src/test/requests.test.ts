// What the client's calls send and when they retry, over a stubbed transport
// (no server). node --test dist/test/requests.test.js
import assert from "node:assert/strict";
import { test } from "node:test";
import { create } from "@bufbuild/protobuf";
import { Code, ConnectError } from "@connectrpc/connect";
import {
  AccountSummarySchema,
  GetAccountRequestSchema,
  GetAccountResponseSchema,
  GetEntryRequestSchema,
  GetEntryResponseSchema,
  type GetEntryRequest,
  LedgerClient,
  ListAccountsRequestSchema,
  ListAccountsResponseSchema,
  type PostEntriesRequest,
  PostEntriesRequestSchema,
  PostEntriesResponseSchema,
  type PostEntryRequest,
  PostEntryRequestSchema,
  PostEntryResponseSchema,
  type ReverseEntryRequest,
  ReverseEntryRequestSchema,
  ReverseEntryResponseSchema,
  type SetAccountLimitsRequest,
  SetAccountLimitsRequestSchema,
  SetAccountLimitsResponseSchema,
} from "../index.js";

const unavailable = () => new ConnectError("connection lost", Code.Unavailable);
const client = () => new LedgerClient("http://127.0.0.1:1", { maxAttempts: 5 });
const cash = { debitAccount: "cash", creditAccount: "sales", amount: 2n ** 63n - 1n, asset: "USD" };
const tax = { debitAccount: "cash", creditAccount: "tax:vat", amount: 200n, asset: "USD" };
const plain = (postings: Array<{ debitAccount: string; creditAccount: string; amount: bigint; asset: string }>) =>
  postings.map(({ debitAccount, creditAccount, amount, asset }) => ({ debitAccount, creditAccount, amount, asset }));

test("postEntry and postEntries send the postings form, or the single pair", async () => {
  const c = client();
  const sent: Array<PostEntryRequest> = [];
  c.raw.postEntry = async (request, options) => {
    assert.equal(typeof options?.timeoutMs, "number");
    sent.push(create(PostEntryRequestSchema, request));
    if (sent.length === 1) throw unavailable();
    return create(PostEntryResponseSchema, { replayed: sent.length > 2 });
  };
  await c.postEntry("books", { postings: [cash, tax], description: "split", metadata: { a: "1" } });
  const [first, second] = sent as [PostEntryRequest, PostEntryRequest];
  assert.deepEqual(plain(first.postings), [cash, tax]);
  assert.deepEqual([first.debitAccount, first.creditAccount, first.amount, first.asset], ["", "", 0n, ""]);
  assert.deepEqual([first.ledger, first.description, first.metadata], ["books", "split", { a: "1" }]);
  assert.ok(first.idempotencyKey !== "" && second.idempotencyKey === first.idempotencyKey, "a retry keeps the key");
  assert.deepEqual(plain(second.postings), [cash, tax]);

  await c.postEntry("books", { ...cash, idempotencyKey: "one" });
  const single = sent[2]!;
  assert.deepEqual(single.postings, []);
  assert.deepEqual([single.debitAccount, single.amount, single.idempotencyKey], ["cash", cash.amount, "one"]);

  const batches: Array<PostEntriesRequest> = [];
  c.raw.postEntries = async (request) => {
    batches.push(create(PostEntriesRequestSchema, request));
    return create(PostEntriesResponseSchema);
  };
  await c.postEntries("books", [{ ...tax, idempotencyKey: "a" }, { postings: [cash], idempotencyKey: "b" }]);
  const [a, b] = batches[0]!.entries;
  assert.deepEqual([a!.postings, a!.creditAccount], [[], "tax:vat"]);
  assert.deepEqual([plain(b!.postings), b!.debitAccount, b!.amount], [[cash], "", 0n]);
});

test("reverseEntry retries with its key, and not what is not retryable", async () => {
  const c = client();
  const sent: Array<ReverseEntryRequest> = [];
  c.raw.reverseEntry = async (request) => {
    sent.push(create(ReverseEntryRequestSchema, request));
    if (sent.length < 3) throw sent.length === 1 ? unavailable() : new ConnectError("slow", Code.DeadlineExceeded);
    return create(ReverseEntryResponseSchema, { replayed: true });
  };
  const reversed = await c.reverseEntry("books", 4n, "refund-4", { description: "refund" });
  assert.equal(reversed.replayed, true);
  assert.deepEqual(
    sent.map((r) => [r.ledger, r.sequence, r.idempotencyKey, r.description]),
    Array(3).fill(["books", 4n, "refund-4", "refund"]),
  );
  await c.reverseEntry("books", 5n, "other");
  assert.equal(sent[3]!.description, "");

  let calls = 0;
  c.raw.reverseEntry = async () => {
    calls++;
    throw new ConnectError("already reversed", Code.FailedPrecondition);
  };
  await assert.rejects(c.reverseEntry("books", 4n, "again"), (e: unknown) => ConnectError.from(e).code === Code.FailedPrecondition);
  assert.equal(calls, 1);
});

test("setAccountLimits sends the limits given, 0 included, and is retried", async () => {
  const c = client();
  const sent: Array<SetAccountLimitsRequest> = [];
  c.raw.setAccountLimits = async (request) => {
    sent.push(create(SetAccountLimitsRequestSchema, request));
    if (sent.length === 1) throw unavailable();
    return create(SetAccountLimitsResponseSchema);
  };
  await c.setAccountLimits("books", "cash", "USD", { maxNetDebit: 0n });
  assert.equal(sent.length, 2);
  assert.deepEqual([sent[1]!.ledger, sent[1]!.account, sent[1]!.asset], ["books", "cash", "USD"]);
  assert.equal(sent[1]!.maxNetDebit, 0n); // 0 is a limit (cannot go negative), not "none"
  assert.equal(sent[1]!.maxNetCredit, undefined);
  await c.setAccountLimits("books", "cash", "USD", { maxNetCredit: -5n });
  assert.deepEqual([sent[2]!.maxNetDebit, sent[2]!.maxNetCredit], [undefined, -5n]);
  await c.setAccountLimits("books", "cash", "USD"); // removes both
  assert.deepEqual([sent[3]!.maxNetDebit, sent[3]!.maxNetCredit], [undefined, undefined]);
});

test("getEntry sends one selector, and refuses none or both", async () => {
  const c = client();
  const sent: Array<GetEntryRequest> = [];
  c.raw.getEntry = async (request) => {
    sent.push(create(GetEntryRequestSchema, request));
    if (sent.length === 1) throw unavailable();
    return create(GetEntryResponseSchema);
  };
  await c.getEntry("books", { sequence: 3n });
  await c.getEntry("books", { idempotencyKey: "order-1" });
  assert.deepEqual(
    sent.map((r) => [r.ledger, r.selector.case, r.selector.value]),
    [["books", "sequence", 3n], ["books", "sequence", 3n], ["books", "idempotencyKey", "order-1"]],
  );
  assert.throws(() => c.getEntry("books", {} as never), TypeError);
  assert.throws(() => c.getEntry("books", { sequence: 1n, idempotencyKey: "k" } as never), TypeError);
  assert.equal(sent.length, 3);
});

test("getAccount sends asOfSequence, 0 when not given", async () => {
  const c = client();
  const sent: bigint[] = [];
  c.raw.getAccount = async (request) => {
    sent.push(create(GetAccountRequestSchema, request).asOfSequence);
    return create(GetAccountResponseSchema);
  };
  await c.getAccount("books", "cash");
  await c.getAccount("books", "cash", { asOfSequence: 7n });
  assert.deepEqual(sent, [0n, 7n]);
});

test("listAccounts sends a page's size and token; accounts() follows the tokens", async () => {
  const c = client();
  const pages: Record<string, { names: string[]; next: string }> = {
    "": { names: ["a", "b"], next: "t1" },
    t1: { names: ["c", "d"], next: "t2" },
    t2: { names: ["e"], next: "" },
  };
  const sent: Array<[number, string]> = [];
  let failed = false;
  c.raw.listAccounts = async (request) => {
    const r = create(ListAccountsRequestSchema, request);
    sent.push([r.pageSize, r.pageToken]);
    if (r.pageToken === "t1" && !failed) {
      failed = true;
      throw unavailable(); // a page is retried, the walk goes on
    }
    const page = pages[r.pageToken]!;
    return create(ListAccountsResponseSchema, {
      accounts: page.names.map((account) => create(AccountSummarySchema, { account })),
      nextPageToken: page.next,
    });
  };
  const first = await c.listAccounts("books", { pageSize: 2 });
  assert.deepEqual([first.accounts.map((a) => a.account), first.nextPageToken], [["a", "b"], "t1"]);
  await c.listAccounts("books");
  assert.deepEqual(sent.splice(0), [[2, ""], [0, ""]]);

  const names: string[] = [];
  for await (const account of c.accounts("books", { pageSize: 2 })) names.push(account.account);
  assert.deepEqual(names, ["a", "b", "c", "d", "e"]);
  assert.deepEqual(sent, [[2, ""], [2, "t1"], [2, "t1"], [2, "t2"]]);
});
