"""The TLS pieces without sockets: ServerTls against a client SSLObject, pumped in memory.

Certificates are made with the ``openssl`` command (the bench's helper); the
client side is the destination's context, so these are the checks both sides
make in a migration: mutual authentication, names, a refused certificate, and
frames that go through unchanged.
"""

from __future__ import annotations

import shutil
import ssl
from pathlib import Path

import pytest

from aiopostcopy.errors import ConfigurationError
from aiopostcopy.tools.bench_procs import make_tls_files
from aiopostcopy.transport.tls import ServerTls, TlsConfig, check_context, describe_tls_error, looks_like_tls

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")


def _config(directory: Path, role: str) -> TlsConfig:
    return TlsConfig(cert=str(directory / f"{role}.pem"), key=str(directory / f"{role}.key"),
                     ca=str(directory / "ca.pem"))


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Two CAs, each with a source (for 127.0.0.1) and a dest certificate."""
    one, other = tmp_path_factory.mktemp("ca"), tmp_path_factory.mktemp("other")
    make_tls_files(one, "127.0.0.1")
    make_tls_files(other, "127.0.0.1")
    return one, other


def _handshake(server: ServerTls, client: ssl.SSLObject, incoming: ssl.MemoryBIO, outgoing: ssl.MemoryBIO) -> None:
    """Pump until both sides are done (or one raises)."""
    for _ in range(10):
        try:
            client.do_handshake()
            done = True
        except ssl.SSLWantReadError:
            done = False
        reply = server.handshake(outgoing.read())
        incoming.write(reply)
        if done and server.handshake_done:
            return
    raise AssertionError("the handshake did not finish")


def _pair(server_config: TlsConfig, client_config: TlsConfig, name: str = "127.0.0.1"):
    server = ServerTls(server_config.server_context())
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    client = client_config.client_context().wrap_bio(incoming, outgoing, server_hostname=name)
    return server, client, incoming, outgoing


def test_frames_go_through_both_ways(pki: tuple[Path, Path]) -> None:
    one, _ = pki
    server, client, incoming, outgoing = _pair(_config(one, "source"), _config(one, "dest"))
    _handshake(server, client, incoming, outgoing)
    assert client.version() in ("TLSv1.2", "TLSv1.3")
    client.write(b"\x00\x00\x00\x03abc")
    assert server.decrypt(outgoing.read()) == b"\x00\x00\x00\x03abc"
    payload = bytes(range(256)) * 200  # larger than one record
    incoming.write(server.encrypt([b"head", memoryview(payload)]))
    received = b""
    while len(received) < 4 + len(payload):
        received += client.read(65536)
    assert received == b"head" + payload
    view = memoryview(bytearray(8))
    assert server.read_into(view) is None  # nothing more: the caller reads the socket
    client.write(b"12345678")
    server.feed(outgoing.read())
    assert server.read_into(view) == 8 and bytes(view) == b"12345678"


def test_a_certificate_from_another_ca_is_refused_on_both_sides(pki: tuple[Path, Path]) -> None:
    one, other = pki
    # the source refuses a destination certificate another CA signed
    server, client, incoming, outgoing = _pair(_config(one, "source"),
                                               TlsConfig(cert=str(other / "dest.pem"), key=str(other / "dest.key"),
                                                         ca=str(one / "ca.pem")))
    with pytest.raises(ssl.SSLError) as refused:
        _handshake(server, client, incoming, outgoing)
    assert "certificate verify failed" in describe_tls_error(refused.value)
    # the destination refuses a source certificate another CA signed
    server, client, incoming, outgoing = _pair(_config(other, "source"), _config(one, "dest"))
    with pytest.raises(ssl.SSLCertVerificationError) as refused:
        _handshake(server, client, incoming, outgoing)
    assert "not signed by --tls-ca" in describe_tls_error(refused.value)


def test_the_source_name_is_checked(pki: tuple[Path, Path]) -> None:
    one, _ = pki
    server, client, incoming, outgoing = _pair(_config(one, "source"), _config(one, "dest"), name="elsewhere.example")
    with pytest.raises(ssl.SSLCertVerificationError, match="mismatch"):
        _handshake(server, client, incoming, outgoing)


def test_contexts_that_do_not_authenticate_are_refused(pki: tuple[Path, Path]) -> None:
    lax = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    with pytest.raises(ValueError, match="CERT_REQUIRED"):
        check_context(lax, server=True)
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.check_hostname = False
    with pytest.raises(ValueError, match="check_hostname"):
        check_context(client, server=False)
    check_context(_config(pki[0], "source").server_context(), server=True)
    check_context(_config(pki[0], "dest").client_context(), server=False)


def test_bad_files_are_named(pki: tuple[Path, Path], tmp_path: Path) -> None:
    one, other = pki
    with pytest.raises(ConfigurationError, match="TLS CA .*missing.pem: No such file"):
        TlsConfig(cert=str(one / "dest.pem"), key=str(one / "dest.key"), ca=str(tmp_path / "missing.pem")).client_context()
    with pytest.raises(ConfigurationError, match="key values mismatch"):
        TlsConfig(cert=str(one / "dest.pem"), key=str(other / "dest.key"), ca=str(one / "ca.pem")).server_context()
    with pytest.raises(ValueError):
        TlsConfig(cert="", key="k", ca="c")


def test_a_client_hello_is_recognised() -> None:
    assert looks_like_tls(b"\x16\x03\x01\x02\x00")
    assert not looks_like_tls(b"\x00\x00\x00\x2a")  # a frame's length prefix
    assert not looks_like_tls(b"\x16")
