"""The server's TLS (ledger_service/tls.py) over real handshakes on loopback: who is refused,
the client identities mutual TLS yields, and certificates replaced without a restart."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import ipaddress
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from ledger_service import tls

# Each channel its own connection: gRPC may otherwise share one between channels.
_OPTIONS = [("grpc.use_local_subchannel_pool", 1)]
# A refused handshake fails the call with UNAVAILABLE; under TLS 1.3 a client certificate is
# refused after the client's side of the handshake ended, which gRPC may report as UNKNOWN.
_REFUSED = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNKNOWN}

KeyAndChain = tuple[bytes, bytes]


def _issued(ca: trustme.CA, *identities: str, **kwargs: Any) -> KeyAndChain:
    leaf = ca.issue_cert(*identities, **kwargs)
    return leaf.private_key_pem.bytes(), b"".join(b.bytes() for b in leaf.cert_chain_pems)


def _built(ca: trustme.CA, common_name: str | None, sans: list[x509.GeneralName]) -> KeyAndChain:
    """A client certificate trustme cannot make: URI SANs, or no SAN extension at all."""
    ca_key: Any = serialization.load_pem_private_key(ca.private_key_pem.bytes(), None)
    ca_cert = x509.load_pem_x509_certificate(ca.cert_pem.bytes())
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    subject = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, "test")]
    if common_name is not None:
        subject.append(x509.NameAttribute(NameOID.COMMON_NAME, common_name))
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name(subject))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return key_pem, cert.public_bytes(serialization.Encoding.PEM)


def _replace(path: Path, data: bytes) -> None:
    """As a deployment should: the new file appears whole, by rename."""
    new = path.with_name(path.name + ".new")
    new.write_bytes(data)
    os.replace(new, path)


def _files(tmp_path: Path, server: KeyAndChain, client_ca: trustme.CA | None) -> tls.TlsFiles:
    files = tls.TlsFiles(
        cert=tmp_path / "server.crt",
        key=tmp_path / "server.key",
        client_ca=None if client_ca is None else tmp_path / "clients-ca.crt",
    )
    _install(files, server)
    if client_ca is not None and files.client_ca is not None:
        files.client_ca.write_bytes(client_ca.cert_pem.bytes())
    return files


def _install(files: tls.TlsFiles, server: KeyAndChain) -> None:
    _replace(files.key, server[0])
    _replace(files.cert, server[1])


class _Health:
    """The standard aio health servicer, noting the client identities of each Check."""

    def __init__(self) -> None:
        self.identities: list[list[str]] = []
        self._inner: Any = health.aio.HealthServicer()  # type: ignore[attr-defined]

    async def Check(self, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        self.identities.append(tls.peer_identities(context.auth_context()))
        return await self._inner.Check(request, context)

    def __getattr__(self, name: str) -> Any:  # the other methods, as they are
        return getattr(self._inner, name)


@contextlib.asynccontextmanager
async def _serving(files: tls.TlsFiles) -> AsyncIterator[tuple[int, _Health]]:
    server = grpc.aio.server()
    servicer = _Health()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_secure_port("127.0.0.1:0", tls.server_credentials(files))
    await server.start()
    try:
        yield port, servicer
    finally:
        await server.stop(None)


def _credentials(trust: trustme.CA, client: KeyAndChain | None = None) -> grpc.ChannelCredentials:
    key, chain = client if client is not None else (None, None)
    return grpc.ssl_channel_credentials(trust.cert_pem.bytes(), key, chain)


async def _call(channel: grpc.aio.Channel) -> None:
    response = await health_pb2_grpc.HealthStub(channel).Check(
        health_pb2.HealthCheckRequest(), timeout=10
    )
    assert response.status == health_pb2.HealthCheckResponse.SERVING


async def _served(port: int, credentials: grpc.ChannelCredentials) -> None:
    async with grpc.aio.secure_channel(f"127.0.0.1:{port}", credentials, options=_OPTIONS) as ch:
        await _call(ch)


async def _refused(call: Awaitable[None]) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await call
    assert refused.value.code() in _REFUSED, refused.value


def _run(scenario: Callable[[], Awaitable[None]]) -> None:
    async def bounded() -> None:
        async with asyncio.timeout(60):
            await scenario()

    asyncio.run(bounded())


def test_tls_serves_clients_trusting_its_ca_and_refuses_plaintext_and_other_cas(
    tmp_path: Path,
) -> None:
    ca, other = trustme.CA(), trustme.CA()
    files = _files(tmp_path, _issued(ca, "localhost", "127.0.0.1"), client_ca=None)

    async def scenario() -> None:
        async with _serving(files) as (port, servicer):
            await _served(port, _credentials(ca))
            assert servicer.identities == [[]]  # TLS without a client certificate

            def blocking_client() -> None:
                with grpc.secure_channel(f"127.0.0.1:{port}", _credentials(ca), _OPTIONS) as ch:
                    stub = health_pb2_grpc.HealthStub(ch)
                    stub.Check(health_pb2.HealthCheckRequest(), timeout=10)

            await asyncio.to_thread(blocking_client)

            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=_OPTIONS) as ch:
                await _refused(_call(ch))
            await _refused(_served(port, _credentials(other)))
            assert len(servicer.identities) == 2  # the refused calls never reached it

    _run(scenario)


def test_mtls_refuses_clients_without_a_certificate_its_ca_issued_and_still_valid(
    tmp_path: Path,
) -> None:
    ca, clients, stranger = trustme.CA(), trustme.CA(), trustme.CA()
    files = _files(tmp_path, _issued(ca, "localhost", "127.0.0.1"), client_ca=clients)
    strangers = _issued(stranger, "ops.example.internal")
    servers = _issued(ca, "ops.example.internal")
    now = datetime.datetime.now(datetime.UTC)
    expired = _issued(
        clients,
        "ops.example.internal",
        not_before=now - datetime.timedelta(days=2),
        not_after=now - datetime.timedelta(days=1),
    )

    async def scenario() -> None:
        async with _serving(files) as (port, servicer):
            await _refused(_served(port, _credentials(ca)))
            await _refused(_served(port, _credentials(ca, strangers)))
            await _refused(_served(port, _credentials(ca, expired)))
            await _refused(_served(port, _credentials(ca, servers)))  # the servers' CA
            assert servicer.identities == []
            await _served(port, _credentials(ca, _issued(clients, "ops.example.internal")))
            assert servicer.identities == [["ops.example.internal"]]

    _run(scenario)


def test_mtls_identities_are_the_dns_and_uri_sans_else_the_common_name(tmp_path: Path) -> None:
    ca, clients = trustme.CA(), trustme.CA()
    files = _files(tmp_path, _issued(ca, "localhost", "127.0.0.1"), client_ca=clients)
    sans: list[x509.GeneralName] = [
        x509.DNSName("ops.example.internal"),
        x509.UniformResourceIdentifier("spiffe://example.internal/ops"),
        x509.DNSName("ops-2.example.internal"),
        x509.RFC822Name("ops@example.internal"),
        x509.IPAddress(ipaddress.ip_address("10.0.0.7")),
    ]

    async def scenario() -> None:
        async with _serving(files) as (port, servicer):
            for client in (
                _built(clients, "ignored-cn", sans),
                _built(clients, "batch-poster", []),
                _built(clients, "ignored-cn", [x509.IPAddress(ipaddress.ip_address("10.0.0.7"))]),
            ):
                await _served(port, _credentials(ca, client))
        assert servicer.identities == [
            ["ops.example.internal", "ops-2.example.internal", "spiffe://example.internal/ops"],
            ["batch-poster"],  # no SAN at all: the common name
            [],  # SANs, but none a name: the common name does not count
        ]

    _run(scenario)


def test_identities_come_from_a_verified_tls_peer_only() -> None:
    assert tls.peer_identities({}) == []
    assert tls.peer_identities({"x509_common_name": [b"ops"], "peer_dns": [b"ops"]}) == []
    insecure = {"transport_security_type": [b"insecure"], "x509_common_name": [b"ops"]}
    assert tls.peer_identities(insecure) == []
    assert tls.peer_identities({"transport_security_type": [b"ssl"]}) == []


@pytest.mark.parametrize("mutual", [False, True], ids=["tls", "mtls"])
def test_a_replaced_certificate_serves_new_connections_and_open_ones_keep_working(
    tmp_path: Path, mutual: bool
) -> None:
    ca1, ca2, clients = trustme.CA(), trustme.CA(), trustme.CA()
    files = _files(tmp_path, _issued(ca1, "localhost", "127.0.0.1"), clients if mutual else None)
    client = _issued(clients, "ops.example.internal") if mutual else None

    async def scenario() -> None:
        async with (
            _serving(files) as (port, _),
            grpc.aio.secure_channel(
                f"127.0.0.1:{port}", _credentials(ca1, client), options=_OPTIONS
            ) as first,
        ):
            await _call(first)
            _install(files, _issued(ca2, "localhost", "127.0.0.1"))

            await _served(port, _credentials(ca2, client))
            await _refused(_served(port, _credentials(ca1, client)))
            await _call(first)  # still its first connection: a new one would be refused

    _run(scenario)


def test_a_replaced_client_ca_applies_to_new_connections(tmp_path: Path) -> None:
    ca, clients1, clients2 = trustme.CA(), trustme.CA(), trustme.CA()
    files = _files(tmp_path, _issued(ca, "localhost", "127.0.0.1"), client_ca=clients1)
    client1, client2 = _issued(clients1, "a.example"), _issued(clients2, "b.example")

    async def scenario() -> None:
        async with _serving(files) as (port, _):
            await _refused(_served(port, _credentials(ca, client2)))
            assert files.client_ca is not None
            _replace(files.client_ca, clients2.cert_pem.bytes())
            await _served(port, _credentials(ca, client2))
            await _refused(_served(port, _credentials(ca, client1)))

    _run(scenario)


def test_a_broken_replacement_keeps_the_last_good_certificate_and_warns_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="ledger_service.tls")
    ca1, ca2 = trustme.CA(), trustme.CA()
    good_key, _ = first = _issued(ca1, "localhost", "127.0.0.1")
    files = _files(tmp_path, first, client_ca=None)
    next_key, next_chain = _issued(ca2, "localhost", "127.0.0.1")
    fake_key = b"-----BEGIN PRIVATE KEY-----\nc2VjcmV0LWtleS1ieXRlcw==\n-----END PRIVATE KEY-----\n"

    def warnings_about(path: Path) -> list[str]:
        return [
            r.getMessage()
            for r in caplog.records
            if r.levelno == logging.WARNING and str(path) in r.getMessage()
        ]

    async def still_the_first(port: int) -> None:
        for _ in range(3):  # several handshakes, each asking for a reload
            await _served(port, _credentials(ca1))
        await _refused(_served(port, _credentials(ca2)))

    async def scenario() -> None:
        async with _serving(files) as (port, _):
            files.cert.write_bytes(b"-----BEGIN CERTIFICATE-----\ngarbage\n")  # in place
            await still_the_first(port)
            (cert_warning,) = warnings_about(files.cert)
            assert "does not parse" in cert_warning

            _replace(files.cert, next_chain)  # new certificate, old key
            await still_the_first(port)
            (mismatch,) = warnings_about(files.key)
            assert "does not load as the private key of" in mismatch
            assert "KEY_VALUES_MISMATCH" in mismatch

            _replace(files.key, fake_key)
            await still_the_first(port)
            files.key.unlink()
            await still_the_first(port)
            assert len(warnings_about(files.key)) == 3
            assert "No such file or directory" in warnings_about(files.key)[-1]

            _replace(files.key, next_key)  # both good again
            await _served(port, _credentials(ca2))
            await _refused(_served(port, _credentials(ca1)))

        for key in (good_key, next_key, fake_key):
            for line in key.splitlines():
                if b"-----" not in line:
                    assert line.decode() not in caplog.text
        assert "TLS certificate reloaded" in caplog.text

    _run(scenario)


@pytest.mark.parametrize("which", ["cert", "key", "client_ca"])
def test_validate_and_server_credentials_name_a_missing_file(tmp_path: Path, which: str) -> None:
    files = _files(tmp_path, _issued(trustme.CA(), "localhost"), client_ca=trustme.CA())
    tls.validate(files)
    missing: Path = getattr(files, which)
    missing.unlink()
    with pytest.raises(ValueError, match=f"{missing}.*No such file") as error:
        tls.validate(files)
    with pytest.raises(ValueError, match="No such file"):
        tls.server_credentials(files)
    assert str(missing) in str(error.value)


def test_validate_names_a_file_that_does_not_load(tmp_path: Path) -> None:
    ca = trustme.CA()
    files = _files(tmp_path, _issued(ca, "localhost"), client_ca=ca)
    assert files.client_ca is not None
    files.client_ca.write_bytes(b"not a certificate")
    with pytest.raises(ValueError, match=f"{files.client_ca}.*no PEM certificate"):
        tls.validate(files)
    files.client_ca.write_bytes(ca.cert_pem.bytes())
    _replace(files.key, _issued(ca, "localhost")[0])  # another certificate's key
    with pytest.raises(ValueError, match=f"{files.key}.*private key of"):
        tls.validate(files)
