// Interop scenario for a client this project did not write: @grpc/grpc-js with
// the .proto loaded at run time (longs as strings, so int64 stays exact).
//
//   LEDGER_TOKEN=<token> node interop.mjs 127.0.0.1:50051 <ledger>
//
// The token (of an admin: it initializes the counter) comes from the
// environment, never the command line. Prints one JSON line with what it
// observed; exits 1 with a message on the first expectation that does not
// hold. tests/e2e/test_interop.py runs it against a server with an auth file.
import path from "node:path";
import { fileURLToPath } from "node:url";
import grpc from "@grpc/grpc-js";
import protoLoader from "@grpc/proto-loader";
import protobuf from "protobufjs";

const [address, ledger] = process.argv.slice(2);
const here = path.dirname(fileURLToPath(import.meta.url));
const protos = path.resolve(here, "../../../protos");

const definition = protoLoader.loadSync("ledger/v1/ledger.proto", {
  includeDirs: [protos],
  keepCase: true, // field names as in the .proto (idempotency_key, not idempotencyKey)
  longs: String,
  enums: String,
  defaults: true,
  oneofs: true,
});
const { LedgerService } = grpc.loadPackageDefinition(definition).ledger.v1;
const client = new LedgerService(address, grpc.credentials.createInsecure());

// The bearer token rides as metadata on every call: grpc-js refuses call
// credentials on an insecure channel. Over TLS, combine them instead:
//   grpc.credentials.combineChannelCredentials(grpc.credentials.createSsl(ca),
//     grpc.credentials.createFromMetadataGenerator((_, cb) => cb(null, auth)))
const auth = new grpc.Metadata();
if (process.env.LEDGER_TOKEN) auth.set("authorization", `Bearer ${process.env.LEDGER_TOKEN}`);

// google.rpc.Status and ErrorInfo, to read the grpc-status-details-bin trailer.
const rpc = protobuf.parse(`
  syntax = "proto3";
  package google.rpc;
  message Any { string type_url = 1; bytes value = 2; }
  message Status { int32 code = 1; string message = 2; repeated Any details = 3; }
  message ErrorInfo { string reason = 1; string domain = 2; map<string, string> metadata = 3; }
`, { keepCase: true }).root;
const Status = rpc.lookupType("google.rpc.Status");
const ErrorInfo = rpc.lookupType("google.rpc.ErrorInfo");

function fail(message) {
  console.error(`interop: ${message}`);
  process.exit(1);
}

function expect(condition, message) {
  if (!condition) fail(message);
}

function call(method, request, metadata = auth) {
  return new Promise((resolve, reject) => {
    client[method](request, metadata, { deadline: Date.now() + 10_000 }, (error, response) =>
      error ? reject(error) : resolve(response),
    );
  });
}

async function rejected(method, request, metadata = auth) {
  try {
    await call(method, request, metadata);
  } catch (error) {
    return error;
  }
  fail(`${method} was expected to fail`);
}

function errorInfo(error) {
  const [raw] = error.metadata.get("grpc-status-details-bin");
  expect(raw, "no grpc-status-details-bin trailer");
  const status = Status.decode(raw);
  const detail = status.details.find((d) => d.type_url.endsWith("/google.rpc.ErrorInfo"));
  expect(detail, "no google.rpc.ErrorInfo in the status details");
  return ErrorInfo.decode(detail.value);
}

const BIG = "9007199254740993"; // 2^53 + 1: not a JavaScript number
const post = (key, amount = BIG) => ({
  ledger,
  idempotency_key: key,
  debit_account: "cash",
  credit_account: "sales",
  amount,
  asset: "USD",
  metadata: { client: "node" },
});

const observed = {};

// Without the token: UNAUTHENTICATED, before anything else is looked at.
const anonymous = await rejected("PostEntry", post("anonymous"), new grpc.Metadata());
expect(anonymous.code === grpc.status.UNAUTHENTICATED, `expected UNAUTHENTICATED, got ${anonymous.code}`);
observed.unauthenticated_reason = errorInfo(anonymous).reason;

// Post before the counter exists: FAILED_PRECONDITION with its ErrorInfo reason.
const early = await rejected("PostEntry", post("too-early"));
expect(early.code === grpc.status.FAILED_PRECONDITION, `expected FAILED_PRECONDITION, got ${early.code}`);
const info = errorInfo(early);
observed.precondition_reason = info.reason;
observed.precondition_domain = info.domain;

const init = await call("InitializeCounter", { ledger });
expect(init.created === true && init.value === "0", `unexpected InitializeCounter ${JSON.stringify(init)}`);

// A follower first, so it sees the entries arrive live.
const seen = [];
const followed = new Promise((resolve, reject) => {
  const stream = client.StreamEntries({ ledger, after_sequence: "0", follow: true }, auth);
  stream.on("data", (message) => {
    for (const entry of message.entries) seen.push(entry);
    if (seen.length >= 3) {
      stream.cancel();
      resolve();
    }
  });
  stream.on("error", (error) => {
    if (error.code !== grpc.status.CANCELLED) reject(error);
  });
});

const first = await call("PostEntry", post("k1"));
expect(first.replayed === false && first.entry.sequence === "1", "first post is not entry 1");
expect(first.entry.amount === BIG, `amount not exact: ${first.entry.amount}`);
const replay = await call("PostEntry", post("k1"));
expect(replay.replayed === true && replay.entry.sequence === "1", "retry did not replay entry 1");
const conflict = await rejected("PostEntry", post("k1", "5"));
expect(conflict.code === grpc.status.ALREADY_EXISTS, `expected ALREADY_EXISTS, got ${conflict.code}`);
observed.conflict_reason = errorInfo(conflict).reason;
await call("PostEntry", post("k2"));
await call("PostEntry", post("k3"));

await followed;
observed.streamed = seen.map((e) => e.sequence);
observed.streamed_amounts = seen.map((e) => e.amount);

const account = await call("GetAccount", { ledger, account: "cash" });
observed.total_debits = account.balances[0].total_debits;
observed.as_of_sequence = account.as_of_sequence;

console.log(JSON.stringify(observed));
client.close();
