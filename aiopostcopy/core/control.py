"""The client control protocol as an I/O-free state machine.

Theory of operation
-------------------
One Unix stream socket joins the destination *service* and one *client*
process.  Both ends track the same phase; each end validates what it sends
(:class:`LocalProtocolError`) and what it receives
(:class:`RemoteProtocolError`).  A refused message changes nothing, so the
caller can still answer with :class:`Error` (which closes).

The rules, all of them, are here:

Rule 1. Every transition is one row of :data:`TRANSITIONS`:
        ``(sender side, phase, message type) -> next phase``.  A message with
        no row in the current phase is forbidden::

            CONNECTED --ClientHello--> HELLO --Blocks--> ADVISE --Register--> LISTEN
            LISTEN --Accept--> RUNNING --End--> ENDED
            HELLO/LISTEN --Reject--> CLOSED
            ADVISE --Reject--> CLOSED  (the service refuses a Register whose table
                                        is malformed: the Register did not count)
            RUNNING: ClientRequest (client), Placed (service) keep RUNNING

Rule 2. The client may send Bye, and either side may send Error, in every
        phase but CLOSED; both lead to CLOSED.
Rule 3. ClientHello fixes the mode.  ClientRequest and Placed exist only in
        self-served mode.  A delegated Register carries at least one mapping
        and one fd (the client's userfaultfd); a self-served Register carries
        no mapping and no fd.
Rule 4. Blocks carries exactly ``len(blocks)`` fds, one shared-memory fd per
        block in block order.  No other message carries fds.  Fds travel as
        SCM_RIGHTS on the sendmsg() that carries the frame's first byte.
Rule 5. A ClientHello whose version is not PROTOCOL_VERSION must be answered
        with Reject(code=VERSION): the service may not send Blocks then.
"""

from __future__ import annotations

import enum
from typing import Final

from aiopostcopy.errors import LocalProtocolError, ProtocolError, RemoteProtocolError
from aiopostcopy.messages import (
    PROTOCOL_VERSION, Accept, Blocks, Bye, ClientHello, ClientMode, ClientRequest, End, Error,
    ErrorCode, Message, Placed, Register, Reject,
)

__all__ = [
    "Side", "Phase", "TRANSITIONS", "CLIENT_SENDS", "SERVICE_SENDS",
    "ServiceControl", "ClientControl", "version_reject",
]


class Side(str, enum.Enum):
    """Which end of the control socket."""

    SERVICE = "service"
    CLIENT = "client"


class Phase(str, enum.Enum):
    """Where a client connection stands (shared by both ends)."""

    CONNECTED = "connected"  #: socket open, nothing said
    HELLO = "hello"  #: client said who it is; service answers Blocks or Reject
    ADVISE = "advise"  #: service sent Blocks (+fds); client maps and registers
    LISTEN = "listen"  #: client sent Register; service answers Accept or Reject
    RUNNING = "running"  #: faults are being served
    ENDED = "ended"  #: every page placed (or aborted); client unregisters, says Bye
    CLOSED = "closed"  #: nothing more may be sent


_S, _C, _P = Side.SERVICE, Side.CLIENT, Phase

#: Rule 1 and Rule 2: (sender, phase, message type) -> next phase.
TRANSITIONS: Final[dict[tuple[Side, Phase, type], Phase]] = {
    (_C, _P.CONNECTED, ClientHello): _P.HELLO,
    (_S, _P.HELLO, Blocks): _P.ADVISE,
    (_S, _P.HELLO, Reject): _P.CLOSED,
    (_C, _P.ADVISE, Register): _P.LISTEN,
    (_S, _P.ADVISE, Reject): _P.CLOSED,  # a Register refused as it stands: its table is malformed
    (_S, _P.LISTEN, Accept): _P.RUNNING,
    (_S, _P.LISTEN, Reject): _P.CLOSED,
    (_C, _P.RUNNING, ClientRequest): _P.RUNNING,
    (_S, _P.RUNNING, Placed): _P.RUNNING,
    (_S, _P.RUNNING, End): _P.ENDED,
    **{(_C, phase, Bye): _P.CLOSED for phase in Phase if phase is not _P.CLOSED},
    **{(side, phase, Error): _P.CLOSED for side in Side for phase in Phase if phase is not _P.CLOSED},
}

#: Message types each side may ever send: pass as ``Decoder(allowed=...)`` to the peer.
CLIENT_SENDS: Final = frozenset(t for (side, _, t) in TRANSITIONS if side is _C)
SERVICE_SENDS: Final = frozenset(t for (side, _, t) in TRANSITIONS if side is _S)

_SELF_SERVED_ONLY: Final = frozenset({ClientRequest, Placed})


def version_reject(hello: ClientHello) -> Reject | None:
    """Rule 5: the answer a service owes a ClientHello of another version.

    Args:
        hello: the client's hello.

    Returns:
        ``Reject(code=VERSION)`` naming both versions, or None if they match.
    """
    if hello.version == PROTOCOL_VERSION:
        return None
    return Reject(code=ErrorCode.VERSION,
                  text=f"protocol version {hello.version} not supported; this service speaks {PROTOCOL_VERSION}")


class _Control:
    """One end of a control connection; subclasses fix the side."""

    side: Side

    def __init__(self) -> None:
        self.phase = Phase.CONNECTED
        self.mode: ClientMode | None = None
        self._version_ok = True

    def __repr__(self) -> str:
        return f"<{type(self).__name__} phase={self.phase.value} mode={self.mode and self.mode.value}>"

    def send(self, msg: Message) -> Phase:
        """Validate a message we are about to send and advance.

        Args:
            msg: the message.

        Returns:
            The new phase.

        Raises:
            LocalProtocolError: the protocol forbids sending it now.
        """
        return self._advance(self.side, msg, LocalProtocolError)

    def receive(self, msg: Message, *, nfds: int | None = None) -> Phase:
        """Validate a message the peer sent and advance.

        Args:
            msg: the decoded message.
            nfds: fds that arrived with the frame, if the caller counts them.

        Returns:
            The new phase.

        Raises:
            RemoteProtocolError: the peer may not send it now, or sent the
                wrong number of fds with it.
        """
        peer = Side.CLIENT if self.side is Side.SERVICE else Side.SERVICE
        next_phase = self._check(peer, msg, RemoteProtocolError)
        if nfds is not None and nfds != self.fds_required(msg):
            raise RemoteProtocolError(
                f"{type(msg).__name__} came with {nfds} fds, expected {self.fds_required(msg)}")
        return self._commit(msg, next_phase)

    def fds_required(self, msg: Message) -> int:
        """Rule 4 and Rule 3: how many fds ride with this message.

        Args:
            msg: a control message (for Register, the mode must be known).

        Returns:
            ``len(blocks)`` for Blocks, 1 for a delegated Register, else 0.
        """
        if type(msg) is Blocks:
            return len(msg.blocks)
        if type(msg) is Register:
            return 1 if self._mode_of(msg) is ClientMode.DELEGATED else 0
        return 0

    def _mode_of(self, msg: Message) -> ClientMode | None:
        return msg.mode if type(msg) is ClientHello else self.mode

    def _advance(self, sender: Side, msg: Message, error: type[ProtocolError]) -> Phase:
        return self._commit(msg, self._check(sender, msg, error))

    def _check(self, sender: Side, msg: Message, error: type[ProtocolError]) -> Phase:
        kind = type(msg)
        next_phase = TRANSITIONS.get((sender, self.phase, kind))
        if next_phase is None:
            raise error(f"{sender.value} may not send {kind.__name__} in phase {self.phase.value}")
        mode = self._mode_of(msg)
        if kind in _SELF_SERVED_ONLY and mode is not ClientMode.SELF_SERVED:
            raise error(f"{kind.__name__} exists only in self-served mode")
        if kind is Register:
            self._check_register(msg, mode, error)
        if kind is Blocks and not self._version_ok:
            raise error("the client's version was refused: answer Reject(code=VERSION)")
        if kind is Reject and not self._version_ok and msg.code is not ErrorCode.VERSION:
            raise error("a refused version is answered with Reject(code=VERSION)")
        return next_phase

    @staticmethod
    def _check_register(msg: Register, mode: ClientMode | None, error: type[ProtocolError]) -> None:
        if mode is ClientMode.DELEGATED and not msg.mappings:
            raise error("a delegated client must register at least one mapping", code=ErrorCode.MAPPING.value)
        if mode is ClientMode.SELF_SERVED and msg.mappings:
            raise error("a self-served client registers no mappings", code=ErrorCode.MAPPING.value)

    def _commit(self, msg: Message, next_phase: Phase) -> Phase:
        if type(msg) is ClientHello:
            self.mode = msg.mode
            self._version_ok = msg.version == PROTOCOL_VERSION
        self.phase = next_phase
        return next_phase


class ServiceControl(_Control):
    """The service's end of one client connection."""

    side = Side.SERVICE


class ClientControl(_Control):
    """A client's end of its connection to the service."""

    side = Side.CLIENT
