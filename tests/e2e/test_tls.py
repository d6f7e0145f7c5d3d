"""TLS and mutual TLS through a real server process (certificates from
trustme, made here): plaintext and strangers refused, the certificate's
identity as the principal, and a certificate rotated without a restart."""

from __future__ import annotations

import datetime
import uuid
from pathlib import Path

import grpc
import pytest
import trustme
from ledger.v1 import ledger_pb2, ledger_pb2_grpc

from ledger_service.auth.principals import token_digest
from ledger_service.testing import ServerProcess

from .conftest import FAST, details, post_request

REFUSED = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNKNOWN}  # a failed handshake
EXPIRED = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=1)
LEDGER = f"tls-{uuid.uuid4().hex[:8]}"
ADMIN_TOKEN = f"admin-{uuid.uuid4().hex}"


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def server_files(tmp_path: Path, ca: trustme.CA) -> tuple[Path, Path]:
    leaf = ca.issue_cert("localhost", "127.0.0.1")
    chain = b"".join(b.bytes() for b in leaf.cert_chain_pems)
    return write(tmp_path / "server.pem", chain), write(
        tmp_path / "server.key", leaf.private_key_pem.bytes()
    )


def channel(
    server: ServerProcess, ca: trustme.CA | None, client: trustme.LeafCert | None = None
) -> grpc.Channel:
    if ca is None:
        return grpc.insecure_channel(server.address)
    credentials = grpc.ssl_channel_credentials(
        root_certificates=ca.cert_pem.bytes(),
        private_key=client.private_key_pem.bytes() if client else None,
        certificate_chain=b"".join(b.bytes() for b in client.cert_chain_pems) if client else None,
    )
    return grpc.secure_channel(
        server.address,
        credentials,
        options=[
            ("grpc.ssl_target_name_override", "localhost"),
            ("grpc.use_local_subchannel_pool", 1),
        ],
    )


def init(chan: grpc.Channel, token: str | None = None) -> ledger_pb2.InitializeCounterResponse:
    metadata = (("authorization", f"Bearer {token}"),) if token else ()
    stub = ledger_pb2_grpc.LedgerServiceStub(chan)
    response: ledger_pb2.InitializeCounterResponse = stub.InitializeCounter(
        ledger_pb2.InitializeCounterRequest(ledger=LEDGER), metadata=metadata, timeout=10
    )
    return response


def test_tls_serves_its_clients_refuses_plaintext_and_rotates_without_a_restart(
    sqlite_url: str, tmp_path: Path
) -> None:
    first, second = trustme.CA(), trustme.CA()
    cert, key = server_files(tmp_path, first)
    args = [*FAST, "--tls-cert", str(cert), "--tls-key", str(key)]
    with ServerProcess(sqlite_url, extra_args=args) as server:
        opened = channel(server, first)
        assert init(opened).ledger == LEDGER
        for stranger in (channel(server, None), channel(server, second)):
            with stranger, pytest.raises(grpc.RpcError) as error:
                init(stranger)
            assert error.value.code() in REFUSED
        # Rotate to a certificate from the second CA: new connections get it.
        leaf = second.issue_cert("localhost", "127.0.0.1")
        key.write_bytes(leaf.private_key_pem.bytes())
        cert.write_bytes(b"".join(b.bytes() for b in leaf.cert_chain_pems))
        with channel(server, second) as rotated:
            assert init(rotated).ledger == LEDGER
        with channel(server, first) as old, pytest.raises(grpc.RpcError) as error:
            init(old)
        assert error.value.code() in REFUSED
        assert init(opened).ledger == LEDGER  # an open connection is not dropped
        opened.close()


def test_under_mtls_the_certificate_names_the_principal(sqlite_url: str, tmp_path: Path) -> None:
    ca, stranger = trustme.CA(), trustme.CA()
    cert, key = server_files(tmp_path, ca)
    client_ca = write(tmp_path / "clients.pem", ca.cert_pem.bytes())
    auth = tmp_path / "auth.toml"
    auth.write_text(
        '[[principal]]\nname = "ops"\ntls_identities = ["ops.example.internal"]\n'
        'roles = ["admin"]\n\n'
        f'[[principal]]\nname = "payments"\ntoken_sha256 = ["{token_digest(ADMIN_TOKEN)}"]\n'
        f'roles = ["writer:{LEDGER}"]\n'
    )
    args = [
        *FAST,
        *("--tls-cert", str(cert), "--tls-key", str(key), "--tls-client-ca", str(client_ca)),
        *("--auth-file", str(auth)),
    ]
    with ServerProcess(sqlite_url, extra_args=args) as server:
        ops = ca.issue_cert("ops.example.internal")
        with channel(server, ca, ops) as chan:
            assert init(chan).ledger == LEDGER  # ops is admin by its certificate
        unknown = ca.issue_cert("someone.example.internal")
        with channel(server, ca, unknown) as chan, pytest.raises(grpc.RpcError) as error:
            init(chan)
        assert error.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "someone.example.internal" in (error.value.details() or "")
        # A token names its caller even over a certificate: payments may post, not init.
        with channel(server, ca, ops) as chan:
            stub = ledger_pb2_grpc.LedgerServiceStub(chan)
            metadata = (("authorization", f"Bearer {ADMIN_TOKEN}"),)
            stub.PostEntry(post_request(LEDGER, "k1"), metadata=metadata, timeout=10)
            with pytest.raises(grpc.RpcError) as error:
                init(chan, ADMIN_TOKEN)
            assert details(error.value)[0].reason == "PERMISSION_DENIED"
        for refused in (
            channel(server, ca),  # no client certificate
            channel(server, ca, stranger.issue_cert("ops.example.internal")),  # a stranger's
            channel(server, ca, ca.issue_cert("ops.example.internal", not_after=EXPIRED)),
            channel(server, None),  # plaintext
        ):
            with refused, pytest.raises(grpc.RpcError) as error:
                init(refused)
            assert error.value.code() in REFUSED


def test_a_missing_tls_file_stops_the_start_naming_it(sqlite_url: str, tmp_path: Path) -> None:
    args = ["--tls-cert", str(tmp_path / "nope.pem"), "--tls-key", str(tmp_path / "nope.key")]
    with pytest.raises(RuntimeError, match=r"nope\.pem"):
        ServerProcess(sqlite_url, extra_args=args).start()
