"""TLS with mutual authentication for the migration channels (stdlib :mod:`ssl`).

Theory of operation
-------------------
Both channels of a migration may run over TLS 1.2 or later; the frames inside
are unchanged (docs/protocol.md, "Transport").  Authentication is mutual and
anchored in one CA that both sides are given:

* the destination (the TLS client) verifies the source's certificate against
  the CA and checks its name: the host part of the source's address (an IP
  address must be in the certificate's subjectAltName as ``IP:``), or the
  name the destination is given instead (``--tls-server-name``);
* the source (the TLS server) requires a certificate from the destination and
  verifies it against the CA.  It checks no name (a destination has no name
  the source could expect): any certificate the CA signed is a destination
  allowed in, so the CA should be one kept for migration peers.

:class:`TlsConfig` builds the two :class:`ssl.SSLContext` objects from PEM
files.  The destination hands its context to asyncio (``ssl=``).  The source
keeps its threads and raw sockets (source.py): each connection gets a
:class:`ServerTls`, an :class:`ssl.SSLObject` over memory BIOs that the
threads use under one lock, so a thread encrypts what it sends and decrypts
what it reads on the raw socket itself.

:func:`describe_tls_error` turns an :class:`ssl.SSLError` into the one line an
operator reads, with a hint for the usual mistakes (another CA, no
certificate, a peer without TLS).
"""

from __future__ import annotations

import dataclasses
import re
import ssl
import threading
from collections.abc import Sequence

from aiopostcopy.errors import ConfigurationError

__all__ = ["TlsConfig", "ServerTls", "TLS_RECORD", "describe_tls_error", "check_context", "looks_like_tls"]

#: a TLS record's largest plaintext: writes up to this size are joined into one record
TLS_RECORD = 16384
_SSL_WHERE = re.compile(r"\s*\(_ssl\.c:\d+\)$")
#: reasons OpenSSL gives, and what they usually mean here
_HINTS = {
    "CERTIFICATE_VERIFY_FAILED": "the peer's certificate is not signed by --tls-ca, or its name does not match",
    "TLSV1_ALERT_UNKNOWN_CA": "the peer does not trust our certificate: it was signed by another CA than its --tls-ca",
    "SSLV3_ALERT_BAD_CERTIFICATE": "the peer refused our certificate",
    "TLSV13_ALERT_CERTIFICATE_REQUIRED": "the peer requires a certificate: pass --tls-cert/--tls-key",
    "PEER_DID_NOT_RETURN_A_CERTIFICATE": "the peer sent no certificate: it needs --tls-cert/--tls-key",
    "WRONG_VERSION_NUMBER": "the peer does not speak TLS: is it running without --tls-cert?",
    "RECORD_LAYER_FAILURE": "the peer does not speak TLS: is it running without --tls-cert?",
    "UNEXPECTED_EOF_WHILE_READING": "the peer closed the connection during the handshake",
}


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class TlsConfig:
    """PEM files of one side of a migration: its certificate and key, and the CA it trusts.

    Attributes:
        cert: this side's certificate chain (PEM).
        key: its private key (PEM, unencrypted).
        ca: the CA certificate(s) the peer's certificate must chain to (PEM).

    Raises:
        ValueError: a path is empty.
    """

    cert: str
    key: str
    ca: str

    def __post_init__(self) -> None:
        if not (self.cert and self.key and self.ca):
            raise ValueError("TLS needs a certificate, its key and a CA")

    def server_context(self) -> ssl.SSLContext:
        """The source's context: TLS 1.2+, the destination's certificate required and verified.

        Raises:
            ConfigurationError: a file cannot be read or is not what it should be (named).
        """
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self._load(context)
        context.num_tickets = 0  # no resumption: and nothing is written after the handshake
        return context

    def client_context(self) -> ssl.SSLContext:
        """The destination's context: TLS 1.2+, the source's certificate and name verified."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # check_hostname and CERT_REQUIRED by default
        self._load(context)
        return context

    def _load(self, context: ssl.SSLContext) -> None:
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.verify_mode = ssl.CERT_REQUIRED
        try:
            context.load_cert_chain(self.cert, self.key)
        except OSError as exc:
            raise ConfigurationError(f"TLS certificate {self.cert} with key {self.key}: {_file_error(exc)}") from None
        try:
            context.load_verify_locations(cafile=self.ca)
        except OSError as exc:
            raise ConfigurationError(f"TLS CA {self.ca}: {_file_error(exc)}") from None


def _file_error(exc: OSError) -> str:
    if isinstance(exc, ssl.SSLError):
        text = describe_tls_error(exc)
        return "not a PEM certificate and its matching key" if "PEM lib" in text else text
    return exc.strerror or str(exc)


def check_context(context: ssl.SSLContext, *, server: bool) -> None:
    """Refuse a context that would not authenticate the peer (mutual authentication is the point).

    Raises:
        ValueError: it does not require a verified certificate (or, client side, check the name).
    """
    if context.verify_mode != ssl.CERT_REQUIRED:
        raise ValueError("the TLS context must require the peer's certificate (verify_mode CERT_REQUIRED)")
    if not server and not context.check_hostname:
        raise ValueError("the destination's TLS context must check the source's name (check_hostname)")


def looks_like_tls(data: bytes) -> bool:
    """The first bytes of a TLS ClientHello record: handshake (22), version 3.x."""
    return len(data) >= 2 and data[0] == 0x16 and data[1] == 0x03


def describe_tls_error(exc: BaseException) -> str:
    """One line for a failed TLS handshake or record: OpenSSL's reason, and what it likely means."""
    if isinstance(exc, ssl.SSLCertVerificationError) and exc.verify_message:
        text = f"certificate verify failed: {exc.verify_message}"
    elif isinstance(exc, ssl.SSLError):
        text = _SSL_WHERE.sub("", str(exc.args[1] if len(exc.args) > 1 else exc))
    else:
        text = str(exc) or type(exc).__name__
    reason = getattr(exc, "reason", None)
    hint = _HINTS.get(reason or "")
    return f"{text} ({hint})" if hint else text


class ServerTls:
    """The source's TLS state of one connection: an SSLObject over two memory BIOs.

    Threads use it under :attr:`lock`; a writer holds its connection's send
    lock around :meth:`encrypt` and the socket write, so records reach the
    wire in the order they were made.  Bytes a read makes (a TLS alert, a
    key update) wait in the outgoing BIO for the next write.
    """

    def __init__(self, context: ssl.SSLContext) -> None:
        self.incoming = ssl.MemoryBIO()
        self.outgoing = ssl.MemoryBIO()
        self.obj = context.wrap_bio(self.incoming, self.outgoing, server_side=True)
        self.lock = threading.Lock()
        self.handshake_done = False

    def handshake(self, data: bytes) -> bytes:
        """Feed ``data`` (ciphertext) to the handshake; returns the bytes to send to the peer.

        Raises:
            ssl.SSLError: the handshake failed (the alert for the peer is in :meth:`pending`).
        """
        with self.lock:
            self.incoming.write(data)
            try:
                self.obj.do_handshake()
                self.handshake_done = True
            except ssl.SSLWantReadError:
                pass
            return self.outgoing.read()

    def pending(self) -> bytes:
        """What waits in the outgoing BIO (after a failed handshake: the alert)."""
        with self.lock:
            return self.outgoing.read()

    def feed(self, data: bytes) -> None:
        """Ciphertext read from the socket."""
        with self.lock:
            self.incoming.write(data)

    def decrypt(self, data: bytes) -> bytes:
        """Feed ciphertext; every byte of plaintext now available (b"" if none).

        Raises:
            ssl.SSLZeroReturnError: the peer closed TLS (close_notify).
            ssl.SSLError: a bad record.
        """
        chunks = []
        with self.lock:
            if data:
                self.incoming.write(data)
            while True:
                try:
                    chunk = self.obj.read(65536)
                except ssl.SSLWantReadError:
                    break
                if not chunk:
                    break
                chunks.append(chunk)
        return b"".join(chunks)

    def read_into(self, view: memoryview) -> int | None:
        """Plaintext into ``view``: its length, 0 at close_notify, None when more ciphertext is needed."""
        with self.lock:
            try:
                return self.obj.read(len(view), view)
            except ssl.SSLWantReadError:
                return None
            except ssl.SSLZeroReturnError:
                return 0

    def encrypt(self, buffers: Sequence[bytes | bytearray | memoryview]) -> bytes:
        """Records for ``buffers`` (plaintext, in order), with anything a read left to send before them."""
        if len(buffers) > 1 and sum(len(b) for b in buffers) <= TLS_RECORD:
            buffers = [b"".join(buffers)]  # a header and a small payload: one record
        with self.lock:
            for buffer in buffers:
                view = memoryview(buffer)
                while len(view):
                    view = view[self.obj.write(view):]
            return self.outgoing.read()
