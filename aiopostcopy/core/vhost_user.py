"""vhost-user front-end, I/O-free: the message codec and the postcopy conversation.

Theory of operation
-------------------
A vhost-user back-end (DPDK's vhost library, vhost-user-bridge...) shares the
guest's memory with the front-end (the VMM; here the destination service).
Messages are a 12-byte little-endian header ``(request, flags, size)`` and
``size`` bytes of payload; file descriptors ride along with SCM_RIGHTS.  The
front-end sends requests; the back-end answers only those that have a reply,
plus a REPLY_ACK (``u64`` 0 = success) for requests sent with NEED_REPLY.

To make the back-end a postcopy client (QEMU's design, docs/vhost-user.md)
the conversation is one fixed sequence of steps, each sent only after the
previous one was answered:

    SET_OWNER, GET_FEATURES, GET_PROTOCOL_FEATURES (REPLY_ACK and PAGEFAULT
    required), SET_PROTOCOL_FEATURES, SET_FEATURES, POSTCOPY_ADVISE (the reply
    carries the back-end's userfaultfd), POSTCOPY_LISTEN (before any memory
    table: DPDK refuses LISTEN once regions exist), SET_MEM_TABLE (one memfd
    per block; in postcopy the reply carries the back-end's own mapping
    addresses), the acknowledgement of that reply (a SET_MEM_TABLE with
    ``u64`` 0, no reply; the back-end registers its userfaultfd after it),
    then per virtqueue SET_VRING_NUM, BASE, ADDR, KICK, CALL, ENABLE.
    Running.  At the end: POSTCOPY_END (reply ``u64``).

Every request past SET_PROTOCOL_FEATURES that has no reply of its own is sent
with NEED_REPLY, so a failure is an answer, never a silent drop.  A reply
whose request code is not the one asked for, a reply flag missing, a size
that does not fit, an fd where none belongs: :class:`RemoteProtocolError`
naming the step.  The driver (destination/vhost_user.py) owns the socket,
the fds and the timing; this module only packs, unpacks and keeps order.
Fds are plain integers here: it never opens or closes one.
"""

from __future__ import annotations

import dataclasses
import enum
import struct
from collections.abc import Sequence

from aiopostcopy.errors import LocalProtocolError, RemoteProtocolError

__all__ = [
    "Request", "ProtocolFeature", "VhostFeature", "MemoryRegion", "Virtqueue", "Reply", "Step",
    "Decoder", "FrontEndConversation", "Phase", "Answer", "encode", "HEADER_SIZE", "MAX_PAYLOAD", "MAX_FDS",
]

HEADER = struct.Struct("<III")
HEADER_SIZE = HEADER.size
VERSION = 0x1
FLAG_VERSION_MASK = 0x3
FLAG_REPLY = 0x4
FLAG_NEED_REPLY = 0x8
MAX_REGIONS = 8  #: regions in one SET_MEM_TABLE (VHOST_MEMORY_BASELINE_NREGIONS)
MAX_FDS = 8  #: fds accepted with one reply
MAX_PAYLOAD = 8 + 32 * MAX_REGIONS  #: the largest reply this front-end asks for (a memory table)
VRING_NOFD = 1 << 8  #: in KICK/CALL payloads: no fd attached

_U64 = struct.Struct("<Q")
_STATE = struct.Struct("<II")
_ADDR = struct.Struct("<IIQQQQ")
_MEM_HEAD = struct.Struct("<II")
_REGION = struct.Struct("<QQQQ")


class Request(enum.IntEnum):
    """Front-end request codes (docs/interop/vhost-user.rst)."""

    GET_FEATURES = 1
    SET_FEATURES = 2
    SET_OWNER = 3
    SET_MEM_TABLE = 5
    SET_VRING_NUM = 8
    SET_VRING_ADDR = 9
    SET_VRING_BASE = 10
    SET_VRING_KICK = 12
    SET_VRING_CALL = 13
    GET_PROTOCOL_FEATURES = 15
    SET_PROTOCOL_FEATURES = 16
    SET_VRING_ENABLE = 18
    POSTCOPY_ADVISE = 28
    POSTCOPY_LISTEN = 29
    POSTCOPY_END = 30


class ProtocolFeature(enum.IntFlag):
    """vhost-user protocol features this front-end knows of."""

    MQ = 1 << 0
    REPLY_ACK = 1 << 3
    PAGEFAULT = 1 << 8


class VhostFeature(enum.IntFlag):
    """Virtio/vhost feature bits this front-end may negotiate."""

    PROTOCOL_FEATURES = 1 << 30  #: VHOST_USER_F_PROTOCOL_FEATURES
    VERSION_1 = 1 << 32  #: VIRTIO_F_VERSION_1: 12-byte virtio-net header


REQUIRED_PROTOCOL = ProtocolFeature.REPLY_ACK | ProtocolFeature.PAGEFAULT
WANTED_FEATURES = VhostFeature.PROTOCOL_FEATURES | VhostFeature.VERSION_1


@dataclasses.dataclass(frozen=True, slots=True)
class MemoryRegion:
    """One region of a memory table (``VhostUserMemoryRegion``)."""

    guest_phys_addr: int
    memory_size: int
    userspace_addr: int
    mmap_offset: int = 0


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Virtqueue:
    """A split virtqueue as the guest driver laid it out.

    Attributes:
        index: virtqueue number (virtio-net: 0 receive, 1 transmit).
        size: descriptors (a power of two).
        desc, avail, used: front-end (userspace) addresses of the three rings.
        base: the first available index the back-end reads.
        kick_fd, call_fd: eventfds (guest -> back-end, back-end -> guest).
    """

    index: int
    size: int
    desc: int
    avail: int
    used: int
    kick_fd: int
    call_fd: int
    base: int = 0


@dataclasses.dataclass(frozen=True, slots=True)
class Reply:
    """A message from the back-end: header fields, payload, fds received with it."""

    request: int
    flags: int
    payload: bytes
    fds: tuple[int, ...] = ()


@dataclasses.dataclass(frozen=True, slots=True)
class Step:
    """One request to send: its bytes, its fds and what answers it.

    ``answer`` is ``"none"``, ``"ack"`` (REPLY_ACK u64), ``"u64"``, ``"fd"`` or ``"memory"``.
    """

    request: Request
    data: bytes
    fds: tuple[int, ...]
    answer: str


# ---------------------------------------------------------------- codec

def encode(request: Request, payload: bytes = b"", *, need_reply: bool = False) -> bytes:
    """One request: header and payload."""
    flags = VERSION | (FLAG_NEED_REPLY if need_reply else 0)
    return HEADER.pack(int(request), flags, len(payload)) + payload


def pack_u64(value: int) -> bytes:
    return _U64.pack(value)


def pack_state(index: int, num: int) -> bytes:
    return _STATE.pack(index, num)


def pack_addr(queue: Virtqueue) -> bytes:
    # struct vhost_vring_addr: index, flags, desc, used, avail, log (used before avail)
    return _ADDR.pack(queue.index, 0, queue.desc, queue.used, queue.avail, 0)


def pack_memory(regions: Sequence[MemoryRegion]) -> bytes:
    if not 0 < len(regions) <= MAX_REGIONS:
        raise LocalProtocolError(f"a memory table holds 1 to {MAX_REGIONS} regions, not {len(regions)}")
    body = b"".join(_REGION.pack(r.guest_phys_addr, r.memory_size, r.userspace_addr, r.mmap_offset)
                    for r in regions)
    return _MEM_HEAD.pack(len(regions), 0) + body


def unpack_memory(payload: bytes) -> list[MemoryRegion]:
    """Regions of a memory-table payload.

    Raises:
        RemoteProtocolError: truncated, or a region count the size does not match.
    """
    if len(payload) < _MEM_HEAD.size:
        raise RemoteProtocolError(f"memory table of {len(payload)} bytes is truncated")
    count, _ = _MEM_HEAD.unpack_from(payload)
    if count > MAX_REGIONS or len(payload) != _MEM_HEAD.size + count * _REGION.size:
        raise RemoteProtocolError(f"memory table says {count} regions in {len(payload)} bytes")
    return [MemoryRegion(*_REGION.unpack_from(payload, _MEM_HEAD.size + i * _REGION.size)) for i in range(count)]


def unpack_u64(payload: bytes, what: str) -> int:
    if len(payload) != _U64.size:
        raise RemoteProtocolError(f"{what}: expected an 8-byte u64 payload, got {len(payload)} bytes")
    return _U64.unpack(payload)[0]


class Decoder:
    """Bytes (and fds) in, :class:`Reply` out; bounded by :data:`MAX_PAYLOAD` and :data:`MAX_FDS`.

    Fds received since the last complete reply belong to the next one (the
    conversation has at most one request outstanding).
    """

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._fds: list[int] = []

    def feed(self, data: bytes, fds: Sequence[int] = ()) -> None:
        """Add received bytes and the fds that came with them."""
        self._buffer += data
        self._fds.extend(fds)

    def take_fds(self) -> list[int]:
        """Fds not yet handed out (the driver closes them when giving up)."""
        fds, self._fds = self._fds, []
        return fds

    def next_reply(self) -> Reply | None:
        """The next complete message, or None if more bytes are needed.

        Raises:
            RemoteProtocolError: a size over the bound, or too many fds.
        """
        if len(self._fds) > MAX_FDS:
            raise RemoteProtocolError(f"back-end sent {len(self._fds)} fds with one message (at most {MAX_FDS})")
        if len(self._buffer) < HEADER_SIZE:
            return None
        request, flags, size = HEADER.unpack_from(self._buffer)
        if size > MAX_PAYLOAD:
            raise RemoteProtocolError(f"back-end message {request} declares {size} bytes of payload "
                                      f"(at most {MAX_PAYLOAD})")
        if len(self._buffer) < HEADER_SIZE + size:
            return None
        payload = bytes(self._buffer[HEADER_SIZE:HEADER_SIZE + size])
        del self._buffer[:HEADER_SIZE + size]
        return Reply(request, flags, payload, tuple(self.take_fds()))

    @property
    def buffered(self) -> int:
        return len(self._buffer)


# ---------------------------------------------------------------- the conversation

class Phase(enum.Enum):
    NEGOTIATING = "negotiating"
    ADVISED = "advised"  #: the back-end's userfaultfd received
    MAPPED = "mapped"  #: its mapping addresses received: attach it, then acknowledge
    RUNNING = "running"  #: every virtqueue set up
    ENDED = "ended"  #: POSTCOPY_END answered
    FAILED = "failed"


@dataclasses.dataclass(frozen=True, slots=True)
class Answer:
    """What a reply taught: ``value`` is the u64, the fd, or the back-end's regions."""

    step: Step
    value: object = None


class FrontEndConversation:
    """The postcopy set-up of one back-end, in order (see the module doc).

    Drive it with :meth:`next_step` -> send ``step.data`` with ``step.fds`` ->
    if ``step.answer != "none"``, :meth:`receive` the reply.  After the set-up
    (``phase is RUNNING``) :meth:`end` gives the POSTCOPY_END step.
    """

    def __init__(self, regions: Sequence[MemoryRegion], region_fds: Sequence[int],
                 queues: Sequence[Virtqueue], *, wanted: int = WANTED_FEATURES) -> None:
        if len(regions) != len(region_fds):
            raise LocalProtocolError(f"{len(regions)} regions but {len(region_fds)} fds")
        pack_memory(regions)  # checks the count
        self.regions = tuple(regions)
        self._region_fds = tuple(region_fds)
        self.queues = tuple(queues)
        self._wanted = wanted
        self.features = 0  #: negotiated virtio/vhost features
        self.protocol_features = 0  #: negotiated protocol features
        self.phase = Phase.NEGOTIATING
        self._plan = self._set_up_plan()
        self._at = 0
        self._pending: Step | None = None

    # -- driving -------------------------------------------------------------

    def next_step(self) -> Step | None:
        """The next request to send, or None when the set-up is done (or a reply is awaited)."""
        if self._pending is not None or self._at >= len(self._plan) or self.phase is Phase.FAILED:
            return None
        step = self._plan[self._at]()
        self._at += 1
        if step.answer != "none":
            self._pending = step
        self._maybe_running()
        return step

    def end(self) -> Step:
        """The POSTCOPY_END request (after the set-up).

        Raises:
            LocalProtocolError: the set-up is not finished.
        """
        if self.phase is not Phase.RUNNING or self._pending is not None:
            raise LocalProtocolError(f"POSTCOPY_END in phase {self.phase.value}")
        self._pending = Step(Request.POSTCOPY_END, encode(Request.POSTCOPY_END), (), "u64")
        return self._pending

    def receive(self, reply: Reply) -> Answer:
        """Check a reply against the request it must answer.

        Returns:
            What it carried (see :class:`Answer`).

        Raises:
            RemoteProtocolError: out of order, malformed, a failure status, or a
                missing feature.  The conversation is then FAILED.
        """
        step = self._pending
        try:
            if step is None:
                raise RemoteProtocolError(f"back-end sent message {reply.request} when nothing was asked")
            self._check_header(step, reply)
            value = _READERS[step.answer](self, step, reply)
        except RemoteProtocolError:
            self.phase = Phase.FAILED
            raise
        self._pending = None
        if step.request is Request.POSTCOPY_END:
            self.phase = Phase.ENDED
        self._maybe_running()
        return Answer(step, value)

    def _maybe_running(self) -> None:
        if self._at >= len(self._plan) and self._pending is None and self.phase is Phase.MAPPED:
            self.phase = Phase.RUNNING

    @property
    def awaiting(self) -> Request | None:
        """The request whose reply is awaited, if any."""
        return self._pending.request if self._pending is not None else None

    # -- checking replies ---------------------------------------------------------

    @staticmethod
    def _check_header(step: Step, reply: Reply) -> None:
        name = step.request.name
        if reply.request != step.request:
            got = Request(reply.request).name if reply.request in Request._value2member_map_ else str(reply.request)
            raise RemoteProtocolError(f"back-end answered {got} while {name} was awaited (out of order)")
        if not reply.flags & FLAG_REPLY or reply.flags & FLAG_VERSION_MASK != VERSION:
            raise RemoteProtocolError(f"{name}: reply flags {reply.flags:#x} lack the reply bit or version 1")
        if reply.fds and step.answer != "fd":
            raise RemoteProtocolError(f"{name}: reply carried {len(reply.fds)} unexpected fds")

    def _read_ack(self, step: Step, reply: Reply) -> None:
        status = unpack_u64(reply.payload, f"{step.request.name} acknowledgement")
        if status != 0:
            raise RemoteProtocolError(f"back-end failed {step.request.name} (status {status}); see its log")

    def _read_u64(self, step: Step, reply: Reply) -> int:
        value = unpack_u64(reply.payload, step.request.name)
        if step.request is Request.GET_FEATURES:
            self._take_features(value)
        elif step.request is Request.GET_PROTOCOL_FEATURES:
            self._take_protocol_features(value)
        elif step.request is Request.POSTCOPY_END and value != 0:
            raise RemoteProtocolError(f"back-end failed POSTCOPY_END (status {value})")
        return value

    def _read_fd(self, step: Step, reply: Reply) -> int:
        if len(reply.fds) != 1:
            raise RemoteProtocolError(f"{step.request.name}: expected the back-end's userfaultfd, "
                                      f"got {len(reply.fds)} fds (is postcopy support enabled in the back-end?)")
        self.phase = Phase.ADVISED
        return reply.fds[0]

    def _read_memory(self, step: Step, reply: Reply) -> list[MemoryRegion]:
        if len(reply.payload) == _U64.size:
            status = _U64.unpack(reply.payload)[0]
            raise RemoteProtocolError(f"back-end failed SET_MEM_TABLE (status {status}) instead of answering "
                                      "with its mapping addresses; see its log")
        theirs = unpack_memory(reply.payload)
        if len(theirs) != len(self.regions):
            raise RemoteProtocolError(f"SET_MEM_TABLE reply has {len(theirs)} regions, {len(self.regions)} were sent")
        for index, (ours, back) in enumerate(zip(self.regions, theirs)):
            if (back.guest_phys_addr, back.memory_size, back.mmap_offset) != \
                    (ours.guest_phys_addr, ours.memory_size, ours.mmap_offset):
                raise RemoteProtocolError(f"SET_MEM_TABLE reply region {index} {back} does not match {ours}")
            if back.userspace_addr == 0:
                raise RemoteProtocolError(f"SET_MEM_TABLE reply region {index} has no mapping address")
        self.phase = Phase.MAPPED
        return theirs

    def _take_features(self, offered: int) -> None:
        if not offered & VhostFeature.PROTOCOL_FEATURES:
            raise RemoteProtocolError("back-end does not offer VHOST_USER_F_PROTOCOL_FEATURES: "
                                      "it cannot do postcopy (PAGEFAULT) or REPLY_ACK")
        self.features = offered & self._wanted

    def _take_protocol_features(self, offered: int) -> None:
        missing = REQUIRED_PROTOCOL & ~offered
        if missing:
            names = ", ".join(f.name for f in ProtocolFeature if f & missing)
            raise RemoteProtocolError(f"back-end lacks protocol feature(s) {names} (offered {offered:#x}); "
                                      "postcopy needs REPLY_ACK and PAGEFAULT (DPDK: postcopy-support=1)")
        self.protocol_features = int(REQUIRED_PROTOCOL)

    # -- the plan ------------------------------------------------------------------

    def _set_up_plan(self) -> list:
        plan = [
            lambda: Step(Request.SET_OWNER, encode(Request.SET_OWNER), (), "none"),
            lambda: Step(Request.GET_FEATURES, encode(Request.GET_FEATURES), (), "u64"),
            lambda: Step(Request.GET_PROTOCOL_FEATURES, encode(Request.GET_PROTOCOL_FEATURES), (), "u64"),
            lambda: Step(Request.SET_PROTOCOL_FEATURES,
                         encode(Request.SET_PROTOCOL_FEATURES, pack_u64(self.protocol_features)), (), "none"),
            lambda: self._acked(Request.SET_FEATURES, pack_u64(self.features)),
            lambda: Step(Request.POSTCOPY_ADVISE, encode(Request.POSTCOPY_ADVISE), (), "fd"),
            lambda: self._acked(Request.POSTCOPY_LISTEN),
            lambda: Step(Request.SET_MEM_TABLE, encode(Request.SET_MEM_TABLE, pack_memory(self.regions),
                                                       need_reply=True), self._region_fds, "memory"),
            lambda: Step(Request.SET_MEM_TABLE, encode(Request.SET_MEM_TABLE, pack_u64(0)), (), "none"),
        ]
        for queue in self.queues:
            plan.extend(self._queue_plan(queue))
        return plan

    def _queue_plan(self, q: Virtqueue) -> list:
        return [
            lambda: self._acked(Request.SET_VRING_NUM, pack_state(q.index, q.size)),
            lambda: self._acked(Request.SET_VRING_BASE, pack_state(q.index, q.base)),
            lambda: self._acked(Request.SET_VRING_ADDR, pack_addr(q)),
            lambda: self._acked(Request.SET_VRING_KICK, pack_u64(q.index), (q.kick_fd,)),
            lambda: self._acked(Request.SET_VRING_CALL, pack_u64(q.index), (q.call_fd,)),
            lambda: self._acked(Request.SET_VRING_ENABLE, pack_state(q.index, 1)),
        ]

    @staticmethod
    def _acked(request: Request, payload: bytes = b"", fds: tuple[int, ...] = ()) -> Step:
        return Step(request, encode(request, payload, need_reply=True), fds, "ack")


_READERS = {
    "ack": FrontEndConversation._read_ack,
    "u64": FrontEndConversation._read_u64,
    "fd": FrontEndConversation._read_fd,
    "memory": FrontEndConversation._read_memory,
}
