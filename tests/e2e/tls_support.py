"""Certificates for the TLS tests, made with the ``openssl`` command into a test's directory.

:func:`make_pki` makes a CA and two certificates it signs: ``source`` (for
127.0.0.1 and localhost) and ``dest``.  Keys are P-256 (quick to make), valid
for a day.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess

import pytest

OPENSSL = shutil.which("openssl")
needs_openssl = pytest.mark.skipif(OPENSSL is None, reason="the openssl command is needed to make certificates "
                                   "(apt-get install -y openssl)")


@dataclasses.dataclass(frozen=True)
class Pki:
    """A CA and the certificates it signed, by role: ``cert(role)``, ``key(role)``."""

    directory: str
    ca: str

    def cert(self, role: str) -> str:
        return os.path.join(self.directory, f"{role}.pem")

    def key(self, role: str) -> str:
        return os.path.join(self.directory, f"{role}.key")

    def options(self, role: str) -> list[str]:
        """``--tls-cert/--tls-key/--tls-ca`` for ``role``."""
        return ["--tls-cert", self.cert(role), "--tls-key", self.key(role), "--tls-ca", self.ca]


def _openssl(*args: str) -> None:
    subprocess.run([OPENSSL, *args], check=True, capture_output=True, timeout=60)


def make_pki(directory: str, name: str = "ca", roles: tuple[str, ...] = ("source", "dest")) -> Pki:
    """A CA called ``name`` in ``directory``/``name`` and a certificate for each role."""
    where = os.path.join(directory, name)
    os.makedirs(where, exist_ok=True)
    ca, ca_key = os.path.join(where, "ca.pem"), os.path.join(where, "ca.key")
    curve = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    _openssl("req", "-x509", *curve, "-keyout", ca_key, "-out", ca, "-days", "1", "-subj", f"/CN=aiopostcopy {name}")
    pki = Pki(where, ca)
    for role in roles:
        csr, ext = os.path.join(where, f"{role}.csr"), os.path.join(where, f"{role}.ext")
        with open(ext, "w", encoding="utf-8") as f:
            f.write("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
        _openssl("req", *curve, "-keyout", pki.key(role), "-out", csr, "-subj", f"/CN=aiopostcopy {role}")
        _openssl("x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial", "-out", pki.cert(role),
                 "-days", "1", "-extfile", ext)
    return pki
