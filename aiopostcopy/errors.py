"""The whole exception tree of aiopostcopy.

This module imports nothing from the package, so every layer can raise these.

Errors are named by cause (after trio): *Closed* means we closed it ourselves,
*Broken*/*Lost* means the world broke it, *Busy* means two users wanted one
resource.  Every userfaultfd error is also an :class:`OSError` carrying the
errno, so code written against plain ``os`` calls keeps working.

::

    PostcopyError
     ├─ ProtocolError (abstract) ─ LocalProtocolError / RemoteProtocolError
     ├─ UffdError (also OSError) ─ PageExistsError (EEXIST)
     │                             UffdRetry (EAGAIN: mapping changing, retry the rest)
     │                             RangeGoneError (ENOENT: range unmapped or moved)
     │                             TargetGoneError (ESRCH: the process is gone)
     │                             UffdUnsupportedError (feature or ioctl missing)
     │                             UffdUnavailableError (no way to open a userfaultfd)
     ├─ MappingTableError (a client's mapping table is invalid)
     ├─ SourceLostError (transport broke; __cause__ set)
 │   └─ SourceUnreachableError (no connection could be opened at all)
     ├─ MigrationAborted (explicit abort or deadline)
     ├─ ClosedError (used after we closed it)
     ├─ BusyError (two users of one resource)
 ├─ ServiceGoneError (also ConnectionError: a client's service hung up)
 ├─ ConfigurationError (an input refused before the migration starts)
 └─ NetnsError (an ip/tc command of the tools failed)
    InternalError (a broken invariant: a bug)
"""

from __future__ import annotations

import errno as _errno
from collections.abc import Sequence

__all__ = [
    "PostcopyError",
    "NetnsError",
    "ServiceGoneError",
    "ProtocolError",
    "LocalProtocolError",
    "RemoteProtocolError",
    "UffdError",
    "PageExistsError",
    "UffdRetry",
    "RangeGoneError",
    "TargetGoneError",
    "UffdUnsupportedError",
    "UffdUnavailableError",
    "MappingTableError",
    "SourceLostError",
    "SourceUnreachableError",
    "MigrationAborted",
    "ClosedError",
    "BusyError",
    "ConfigurationError",
    "InternalError",
    "uffd_error_from_errno",
]


class PostcopyError(Exception):
    """Base of every error aiopostcopy raises on purpose."""


class ProtocolError(PostcopyError):
    """A protocol rule was broken. Abstract: raise a subclass.

    Attributes:
        code: the wire error code (see docs/protocol.md) sent to the peer.
    """

    code: str = "protocol"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        if type(self) is ProtocolError:
            raise TypeError("ProtocolError is abstract; raise Local- or RemoteProtocolError")
        super().__init__(message)
        if code is not None:
            self.code = code


class LocalProtocolError(ProtocolError):
    """We were asked to do something the protocol forbids (our bug or misuse)."""


class RemoteProtocolError(ProtocolError):
    """The peer sent something malformed or out of order."""


class UffdError(PostcopyError, OSError):
    """A userfaultfd call failed. ``errno`` and ``strerror`` are set as for OSError."""

    def __init__(self, err: int, message: str | None = None) -> None:
        text = message if message is not None else _errno_text(err)
        OSError.__init__(self, err, text)


class PageExistsError(UffdError):
    """EEXIST: the page is already present (count it placed, then wake)."""


class UffdRetry(UffdError):
    """EAGAIN: the mapping is changing or the copy was partial.

    Attributes:
        done: bytes handled before the call stopped (retry from there after
            draining the fd's events).
    """

    def __init__(self, err: int, message: str | None = None, *, done: int = 0) -> None:
        super().__init__(err, message)
        self.done = done


class RangeGoneError(UffdError):
    """ENOENT: the range was unmapped or moved (or is no longer registered)."""


class TargetGoneError(UffdError):
    """ESRCH: the process that owns the userfaultfd is gone."""


class UffdUnsupportedError(UffdError):
    """A feature, mode or ioctl is not supported by the headers or the kernel."""

    def __init__(self, message: str) -> None:
        super().__init__(_errno.EOPNOTSUPP, message)


class UffdUnavailableError(UffdError):
    """No way to open a userfaultfd works here; the message names the fix."""


class MappingTableError(PostcopyError, ValueError):
    """A mapping table (client range -> RAMBlock/offset) is invalid."""


class SourceLostError(PostcopyError):
    """The connection to the source broke; ``__cause__`` holds the reason."""


class SourceUnreachableError(SourceLostError):
    """No connection to the source could be opened (refused, no route, no such socket);
    ``__cause__`` holds the OSError."""


class TlsHandshakeError(SourceLostError):
    """The TLS handshake with the source failed: a certificate refused or not trusted, a name
    that does not match, or a peer without TLS; ``__cause__`` holds the ssl.SSLError."""


class MigrationAborted(PostcopyError):
    """The migration ended by explicit abort or deadline before every page arrived."""


class ClosedError(PostcopyError):
    """The object was used after we closed it."""


class BusyError(PostcopyError):
    """Two users wanted a resource that serves one."""


class ConfigurationError(PostcopyError):
    """An input refused before the migration starts: a block file, a block
    directory (missing rights, wrong filesystem, no room), an address.

    The message names the object (path, address, filesystem type) and the cause.
    """


class NetnsError(PostcopyError, RuntimeError):
    """An ``ip``/``tc`` command failed.

    Attributes:
        argv: The command that failed.
        returncode: Its exit status (None if it timed out or could not start).
        stderr: What it printed on stderr, stripped.
    """

    def __init__(self, argv: Sequence[str], returncode: int | None, stderr: str) -> None:
        self.argv = list(argv)
        self.returncode = returncode
        self.stderr = stderr
        super().__init__(f"{' '.join(self.argv)!s} failed ({returncode}): {stderr}")


class ServiceGoneError(PostcopyError, ConnectionError):
    """A client's service closed the control connection (it was not us): it may come back."""


class InternalError(Exception):
    """A broken invariant inside aiopostcopy: this is a bug, please report it."""


_BY_ERRNO: dict[int, type[UffdError]] = {
    _errno.EEXIST: PageExistsError,
    _errno.EAGAIN: UffdRetry,
    _errno.ENOENT: RangeGoneError,
    _errno.ESRCH: TargetGoneError,
}


def _errno_text(err: int) -> str:
    import os

    return os.strerror(err)


def uffd_error_from_errno(err: int, what: str, *, done: int = 0) -> UffdError:
    """Build the typed exception for a failed userfaultfd call.

    Args:
        err: the errno value.
        what: the call that failed, e.g. ``"UFFDIO_COPY"``; it leads the message.
        done: bytes handled before the failure (only kept by :class:`UffdRetry`).

    Returns:
        An instance of the :class:`UffdError` subclass for ``err``.
    """
    cls = _BY_ERRNO.get(err, UffdError)
    message = f"{what}: {_errno_text(err)}"
    if cls is UffdRetry:
        return UffdRetry(err, message, done=done)
    return cls(err, message)
