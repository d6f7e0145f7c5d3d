"""The server's TLS: credentials whose certificate files are re-read, when they change, at each
new handshake (no restart), and the client identities of a mutual-TLS call."""

from __future__ import annotations

import logging
import os
import ssl
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import grpc

_LOG = logging.getLogger(__name__)

# What identifies a version of a file without reading it; None: it could not be stat'ed.
_Stamp = tuple[int, int, int, int, int] | None


@dataclass(frozen=True)
class TlsFiles:
    """PEM files: the server's certificate chain and private key, and with `client_ca`
    mutual TLS (client certificates required and verified against these CAs)."""

    cert: Path
    key: Path
    client_ca: Path | None = None

    def _paths(self) -> tuple[Path, ...]:
        return (self.cert, self.key) + (() if self.client_ca is None else (self.client_ca,))


class _BadFile(ValueError):
    """A file that cannot be used; the message names it and says why, never its contents."""

    def __init__(self, path: Path, why: str) -> None:
        super().__init__(f"TLS file {str(path)!r}: {why}")


@dataclass(frozen=True)
class _Loaded:
    cert: bytes
    key: bytes
    client_ca: bytes | None

    def configuration(self) -> grpc.ServerCertificateConfiguration:
        return grpc.ssl_server_certificate_configuration(
            [(self.key, self.cert)], root_certificates=self.client_ca
        )


class _FileChanged(_BadFile):
    """A file changed while it was being loaded: try again at the next handshake."""

    def __init__(self, path: Path) -> None:
        super().__init__(path, "changed while it was being loaded")


def _stamp(path: Path) -> _Stamp:
    try:
        st = os.stat(path)
    except OSError:
        return None
    # The inode catches an atomic rename (and Kubernetes' symlink swap) even if size and
    # mtime are equal; ctime catches a rewrite within the file system's mtime granularity.
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _stamps(files: TlsFiles) -> tuple[_Stamp, ...]:
    return tuple(_stamp(path) for path in files._paths())


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise _BadFile(path, f"cannot be read ({e.strerror or type(e).__name__})") from None


def _pem_text(path: Path, data: bytes) -> str:
    try:
        return data.decode("ascii")
    except UnicodeDecodeError:
        raise _BadFile(path, "is not PEM text") from None


def _check_certificates(path: Path, data: bytes) -> None:
    text = _pem_text(path, data)
    if "-----BEGIN CERTIFICATE-----" not in text:
        raise _BadFile(path, "contains no PEM certificate")
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cadata=text)
    except ssl.SSLError as e:
        raise _BadFile(path, f"does not parse as PEM certificates ({e.reason or e})") from None


def _no_passphrase() -> NoReturn:
    # Without this callback OpenSSL would prompt on the terminal, blocking the handshake.
    raise ValueError("the private key is encrypted; gRPC needs an unencrypted key")


def _check_key(files: TlsFiles, key: bytes) -> None:
    _pem_text(files.key, key)
    # The stdlib loads a key only from a file, so this re-reads the paths; _load then checks
    # that they still hold the bytes read before, which are what gRPC gets.
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(
            files.cert, files.key, password=_no_passphrase
        )
    except ValueError as e:
        raise _BadFile(files.key, str(e)) from None
    except ssl.SSLError as e:
        why = e.reason or "not a PEM private key"
        raise _BadFile(
            files.key, f"does not load as the private key of {str(files.cert)!r} ({why})"
        ) from None
    except OSError as e:
        raise _BadFile(files.key, f"cannot be read ({e.strerror or type(e).__name__})") from None


def _load(files: TlsFiles) -> _Loaded:
    cert, key = _read(files.cert), _read(files.key)
    _check_certificates(files.cert, cert)
    client_ca = None
    if files.client_ca is not None:
        client_ca = _read(files.client_ca)
        _check_certificates(files.client_ca, client_ca)
    _check_key(files, key)
    for path, data in ((files.cert, cert), (files.key, key)):
        if _read(path) != data:
            raise _FileChanged(path)
    return _Loaded(cert, key, client_ca)


def validate(files: TlsFiles) -> None:
    """Raises ValueError naming the file when a file is missing, unreadable, or does not load
    (not PEM certificates, or a key that is not the certificate's)."""
    try:
        _load(files)
    except _FileChanged:
        _load(files)  # once more: it was being replaced


class _Reloader:
    """The fetcher gRPC's core calls, on its own threads, before each new TLS handshake."""

    def __init__(self, files: TlsFiles, stamps: tuple[_Stamp, ...]) -> None:
        self._files = files
        self._lock = threading.Lock()
        self._stamps = stamps  # of the last attempt, good or bad: a bad version warns once

    def __call__(self) -> grpc.ServerCertificateConfiguration | None:
        try:
            with self._lock:
                stamps = _stamps(self._files)
                if stamps == self._stamps:
                    return None
                # Stamped before reading, so a change during the read is seen next time.
                self._stamps = stamps
                try:
                    loaded = _load(self._files)
                except _FileChanged:
                    self._stamps = ()
                    return None
                except _BadFile as e:
                    _LOG.warning("%s; keeping the last good TLS certificate", e)
                    return None
                _LOG.info("TLS certificate reloaded from %s", str(self._files.cert))
                return loaded.configuration()
        except Exception:
            # gRPC would log and keep the current certificate too; this says where it came from.
            _LOG.exception("reloading the TLS certificate failed; keeping the last good one")
            return None


def server_credentials(files: TlsFiles) -> grpc.ServerCredentials:
    """Credentials for one `add_secure_port` (make one per port: gRPC hands the initial
    configuration to the first port only). Raises ValueError like `validate`."""
    stamps = _stamps(files)
    try:
        loaded = _load(files)
    except _FileChanged:
        stamps = _stamps(files)
        loaded = _load(files)
    return grpc.dynamic_ssl_server_credentials(
        loaded.configuration(),
        # grpc-stubs omit the None ("no change") that grpc documents and handles.
        _Reloader(files, stamps),  # type: ignore[arg-type]
        require_client_authentication=files.client_ca is not None,
    )


def _texts(values: Iterable[bytes]) -> list[str]:
    texts = []
    for value in values:
        try:
            texts.append(value.decode("utf-8"))
        except UnicodeDecodeError:
            continue  # cannot equal a configured name
    return texts


def peer_identities(auth_context: Mapping[str, Iterable[bytes]]) -> list[str]:
    """The verified client certificate's DNS and URI subject alternative names, or, for a
    certificate without any SAN, its common name; [] unless the call came over mutual TLS.

    Only the transport's auth context is read (`context.auth_context()`), never metadata."""
    if b"ssl" not in list(auth_context.get("transport_security_type", ())):
        return []
    names = _texts(auth_context.get("peer_dns", ())) + _texts(auth_context.get("peer_uri", ()))
    if not names and not list(auth_context.get("x509_subject_alternative_name", ())):
        # As gRPC's own peer identity: the CN counts only when the certificate has no SAN.
        names = _texts(auth_context.get("x509_common_name", ()))
    return list(dict.fromkeys(names))
