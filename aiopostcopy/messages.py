"""Wire messages: what the source, the destination and clients say to each other.

Every message is a frozen, slotted, keyword-only dataclass that validates its
fields when built, so a message that exists is a message that may be sent.
This module knows nothing of msgpack or sockets: :mod:`aiopostcopy.transport.wire`
turns these into bytes and back (see docs/protocol.md for the byte layout).

Two protocols share the framing:

* the *migration* protocol between destination and source, over two TCP (or
  Unix) connections: an ``urgent`` channel that carries requests and the pages
  that answer them, and a ``background`` channel that carries the sweep;
* the *client control* protocol between the destination service and the
  processes that share its memory, over a Unix socket with SCM_RIGHTS.

A page run is ``(block, first, count)``: ``count`` pages of RAMBlock index
``block`` starting at page ``first``.  Indexes refer to the block list of the
session's :class:`Hello`.

Validation raises :class:`~aiopostcopy.errors.LocalProtocolError`; the wire
decoder re-raises it as :class:`~aiopostcopy.errors.RemoteProtocolError`.
"""

from __future__ import annotations

import dataclasses
import enum
import itertools
import operator
from typing import ClassVar, Union

from aiopostcopy.errors import LocalProtocolError

__all__ = [
    "PROTOCOL_VERSION",
    "Limits",
    "LIMITS",
    "Channel",
    "Role",
    "ClientMode",
    "ErrorCode",
    "BlockInfo",
    "PageRun",
    "MAX_RUN_PAGES",
    "Hello",
    "Request",
    "Pages",
    "Zero",
    "Discard",
    "Resume",
    "Done",
    "Complete",
    "Ack",
    "Ping",
    "Pong",
    "Error",
    "ClientHello",
    "Blocks",
    "Register",
    "Accept",
    "Reject",
    "ClientRequest",
    "Placed",
    "End",
    "Bye",
    "Digests",
    "Changed",
    "Message",
]

PROTOCOL_VERSION = 1


@dataclasses.dataclass(frozen=True, slots=True)
class Limits:
    """Bounds on everything a peer controls.  Going over one is a protocol error."""

    max_header: int = 4 << 20  #: bytes of one msgpack header
    max_payload: int = 16 << 20  #: bytes of page data after one Pages header
    max_blocks: int = 1024  #: RAMBlocks in a session
    max_block_length: int = 1 << 46  #: bytes in one RAMBlock (64 TiB)
    max_name: int = 256  #: characters in a block name, session id, client name
    max_runs: int = 4096  #: runs in one Request / ClientRequest / Placed / Resume.pending
    #: runs in one Resume, all blocks together.  Sized so that the largest
    #: valid Resume (every bound a 9-byte integer) fits in ``max_header``; a
    #: destination with more runs reports a subset (under-reporting is safe).
    max_resume_runs: int = 1 << 17
    max_features: int = 64  #: feature names in a Hello
    max_text: int = 4096  #: characters of an Error / Reject text
    max_zero_runs: int = 4096  #: stretches of zero pages inside one Pages run
    max_digests: int = 4096  #: page digests in one Digests message (feature from-copy)
    #: the largest page size, and so the largest payload of a one-page Pages frame:
    #: a page larger than ``max_payload`` (1 GiB) travels whole in one frame of its own
    max_page_size: int = 1 << 30

    def payload_ok(self, nbytes: object, count: int, zeros: tuple[int, ...] = ()) -> bool:
        """``nbytes`` may follow a Pages header of ``count`` pages with ``zeros``: 1..max_payload
        bytes, or one page alone (count 1, no zeros) of up to ``max_page_size`` bytes."""
        if type(nbytes) is not int or nbytes < 1:
            return False
        return nbytes <= self.max_payload or (count == 1 and not zeros and nbytes <= self.max_page_size)


LIMITS = Limits()

#: 4 KiB base pages, and the x86-64 huge page sizes (2 MiB, 1 GiB) of hugetlbfs
PAGE_SIZES = frozenset({4096, 2 << 20, 1 << 30})


class Channel(str, enum.Enum):
    """Which connection a Hello opens."""

    URGENT = "urgent"  #: requests and the pages that answer them, TCP_NODELAY
    BACKGROUND = "background"  #: the sweep of everything else, flow-controlled


class Role(str, enum.Enum):
    SOURCE = "source"
    DESTINATION = "destination"


class ClientMode(str, enum.Enum):
    """How a client process shares the destination's memory."""

    #: QEMU's way: the client hands its userfaultfd to the service, which reads
    #: it, requests pages on the client's behalf and wakes the client's threads.
    DELEGATED = "delegated"
    #: The client reads its own userfaultfd, asks for (block, page) runs itself
    #: and wakes its own threads when told the pages are placed.  The service
    #: never learns a client address and never wakes a client fd.
    SELF_SERVED = "self-served"


class ErrorCode(str, enum.Enum):
    PROTOCOL = "protocol"  #: malformed or out-of-order message
    VERSION = "version"  #: no common protocol version
    SESSION = "session"  #: unknown or mismatched session id
    BUSY = "busy"  #: the source already serves a destination
    BLOCK = "block"  #: a run names a block or page out of range
    MAPPING = "mapping"  #: a client's mapping table is invalid
    IO = "io"  #: the peer could not read or write its memory
    ABORTED = "aborted"  #: the migration was aborted
    INTERNAL = "internal"  #: a bug on the sending side


def _fail(message: str, code: str | None = None) -> LocalProtocolError:
    return LocalProtocolError(message, code=code)


def _check_int(name: str, value: object, low: int, high: int, code: str | None = None) -> None:
    if type(value) is not int or not low <= value <= high:
        raise _fail(f"{name} must be an integer in [{low}, {high}], got {value!r:.80}", code)


def _encodable(value: str) -> bool:
    """True unless ``value`` holds a lone surrogate, which UTF-8 cannot carry."""
    try:
        value.encode()
    except UnicodeEncodeError:
        return False
    return True


def _check_str(name: str, value: object, limit: int, *, empty: bool = False) -> None:
    low = 0 if empty else 1
    if (
        type(value) is not str
        or not low <= len(value) <= limit
        or not (value.isascii() or _encodable(value))
    ):
        raise _fail(f"{name} must be a UTF-8 string of {low}..{limit} characters, got {value!r:.80}")


def _check_bounds(bounds: object) -> int:
    """Check one block's Resume bounds; return the number of runs.

    Runs in C-speed passes (``map``) because a Resume may hold 2**18 bounds.
    """
    if type(bounds) is not tuple or len(bounds) % 2:
        raise _fail("resume: bounds must be an even-length tuple")
    if not bounds:
        return 0
    if set(map(type, bounds)) != {int}:
        raise _fail("resume: bounds must be integers")
    if bounds[0] < 0 or bounds[-1] > 1 << 46:
        raise _fail(f"resume: bounds must lie in [0, {1 << 46}]")
    if not all(map(operator.lt, bounds, itertools.islice(bounds, 1, None))):
        raise _fail("resume: bounds must be strictly increasing")
    return len(bounds) // 2


#: The most pages one run may count.
MAX_RUN_PAGES = 1 << 32


def _check_run(name: str, block: object, first: object, count: object) -> None:
    if (  # the common, valid case in one expression: runs are decoded per frame
        type(block) is int and type(first) is int and type(count) is int
        and 0 <= block < LIMITS.max_blocks and 0 <= first < 1 << 46 and 1 <= count <= MAX_RUN_PAGES
    ):
        return
    _check_int(f"{name}.block", block, 0, LIMITS.max_blocks - 1)
    _check_int(f"{name}.first", first, 0, (1 << 46) - 1)
    _check_int(f"{name}.count", count, 1, MAX_RUN_PAGES)


def _check_runs(name: str, runs: object, limit: int) -> None:
    if type(runs) is not tuple or len(runs) > limit:
        raise _fail(f"{name} must be a tuple of at most {limit} runs")
    for run in runs:
        if type(run) is not PageRun:
            raise _fail(f"{name} items must be PageRun, got {type(run).__name__}")


_frozen = dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
_new_object, _set_field = object.__new__, object.__setattr__


@_frozen
class BlockInfo:
    """A RAMBlock as the protocol describes it."""

    name: str
    length: int  #: bytes, a multiple of page_size
    page_size: int  #: 4096, 2 MiB or 1 GiB

    def __post_init__(self) -> None:
        _check_str("block name", self.name, LIMITS.max_name)
        if type(self.page_size) is not int or self.page_size not in PAGE_SIZES:
            raise _fail(f"block {self.name!r}: page size {self.page_size!r} not in {sorted(PAGE_SIZES)}")
        _check_int(f"block {self.name!r} length", self.length, self.page_size, LIMITS.max_block_length)
        if self.length % self.page_size:
            raise _fail(f"block {self.name!r}: length {self.length} is not a multiple of {self.page_size}")

    @property
    def pages(self) -> int:
        return self.length // self.page_size


@_frozen
class PageRun:
    """``count`` pages of block index ``block`` from page ``first``."""

    block: int
    first: int
    count: int

    def __post_init__(self) -> None:
        _check_run("run", self.block, self.first, self.count)

    @property
    def stop(self) -> int:
        return self.first + self.count

    @classmethod
    def unchecked(cls, block: int, first: int, count: int) -> PageRun:
        """The run, built without the checks: for values taken from a checked run or from a
        block's own page range (the fault path builds one per fault; checking costs twice this)."""
        run = _new_object(cls)
        _set_field(run, "block", block)
        _set_field(run, "first", first)
        _set_field(run, "count", count)
        return run


# ---------------------------------------------------------------- migration


@_frozen
class Hello:
    """First message on every migration connection, in both directions.

    The destination opens each channel with its Hello (``blocks`` empty); the
    source answers with its own, carrying the block list.  Both channels of
    one migration carry the same ``session_id``.
    """

    TYPE: ClassVar[int] = 1
    version: int
    session_id: str
    role: Role
    channel: Channel
    features: tuple[str, ...] = ()
    blocks: tuple[BlockInfo, ...] = ()

    def __post_init__(self) -> None:
        _check_int("version", self.version, 1, 0xFFFF)
        _check_str("session_id", self.session_id, LIMITS.max_name)
        if not isinstance(self.role, Role) or not isinstance(self.channel, Channel):
            raise _fail("hello: role and channel must be Role and Channel members")
        if type(self.features) is not tuple or len(self.features) > LIMITS.max_features:
            raise _fail(f"hello: at most {LIMITS.max_features} features")
        for feature in self.features:
            _check_str("feature", feature, LIMITS.max_name)
        if type(self.blocks) is not tuple or len(self.blocks) > LIMITS.max_blocks:
            raise _fail(f"hello: at most {LIMITS.max_blocks} blocks")
        names = set()
        for block in self.blocks:
            if type(block) is not BlockInfo:
                raise _fail("hello: blocks must be BlockInfo")
            if block.name in names:
                raise _fail(f"hello: block name {block.name!r} appears twice")
            names.add(block.name)


@_frozen
class Request:
    """Destination -> source, urgent channel: send these runs before anything else."""

    TYPE: ClassVar[int] = 2
    runs: tuple[PageRun, ...]

    def __post_init__(self) -> None:
        _check_runs("request runs", self.runs, LIMITS.max_runs)
        if not self.runs:
            raise _fail("request: no runs")


@_frozen
class Pages:
    """Source -> destination: page contents for one run.

    On the wire the header ``[3, block, first, count, nbytes, zeros]`` is
    followed by exactly ``nbytes`` raw bytes.  ``zeros`` lists the all-zero
    pages inside the run as flattened half-open bounds relative to ``first``
    (``(start0, stop0, start1, stop1, ...)``, strictly increasing, within
    ``[0, count]``); those pages travel as no bytes at all, and the payload
    holds the other pages in order, so the session checks ``nbytes ==
    (count - zero pages) * page_size``.  A run of scattered zero pages thus
    stays one frame instead of one frame per stretch.  ``data`` holds the
    payload when the message was built or decoded in memory; the streaming
    receiver places it straight into staging memory and leaves ``data`` None.
    """

    TYPE: ClassVar[int] = 3
    block: int
    first: int
    count: int
    data: bytes | memoryview | None = None
    zeros: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        _check_run("pages", self.block, self.first, self.count)
        if self.data is not None:
            if type(self.data) not in (bytes, bytearray, memoryview):
                raise _fail("pages: data must be bytes, bytearray, memoryview or None")
            size = self.data.nbytes if type(self.data) is memoryview else len(self.data)
            if not LIMITS.payload_ok(size, self.count, self.zeros):
                raise _fail(f"pages: data must hold 1..{LIMITS.max_payload} bytes (or one page alone of up to "
                            f"{LIMITS.max_page_size}), got {size}")
        if self.zeros != ():  # (a nil, 0 or false from a peer must fail here too, not later)
            _check_zeros(self.zeros, self.count)

    @property
    def run(self) -> PageRun:
        return PageRun(block=self.block, first=self.first, count=self.count)


def _check_zeros(zeros: object, count: int) -> None:
    """Pages.zeros: an even tuple of strictly increasing ints in [0, count], at least one data page left.

    Only the shape is checked: strictly increasing bounds never touch, so they
    cover every page exactly when they are ``(0, count)``.  (How many pages
    they cover is the core's arithmetic, :func:`aiopostcopy.core.rangeset.bounds_total`.)
    """
    if type(zeros) is not tuple or not zeros or len(zeros) % 2 or len(zeros) > 2 * LIMITS.max_zero_runs:
        raise _fail(f"pages: zeros must be an even-length tuple of at most {2 * LIMITS.max_zero_runs} bounds")
    if set(map(type, zeros)) != {int}:
        raise _fail("pages: zeros bounds must be integers")
    if zeros[0] < 0 or zeros[-1] > count:
        raise _fail(f"pages: zeros bounds must lie in [0, {count}]")
    if not all(map(operator.lt, zeros, itertools.islice(zeros, 1, None))):
        raise _fail("pages: zeros bounds must be strictly increasing")
    if zeros == (0, count):
        raise _fail("pages: every page is zero (send Zero instead)")


@_frozen
class Zero:
    """Source -> destination: these pages are all zeros (no payload)."""

    TYPE: ClassVar[int] = 4
    block: int
    first: int
    count: int

    def __post_init__(self) -> None:
        _check_run("zero", self.block, self.first, self.count)


@_frozen
class Discard:
    """Source -> destination: treat these pages as missing again (drop any copy)."""

    TYPE: ClassVar[int] = 5
    block: int
    first: int
    count: int

    def __post_init__(self) -> None:
        _check_run("discard", self.block, self.first, self.count)


@_frozen
class Resume:
    """Destination -> source after a reconnect: what the destination already has.

    ``received`` holds, per block index, the placed page runs flattened as
    ``(start0, stop0, start1, stop1, ...)`` (half-open, sorted, disjoint).  The
    source must not resend those pages; it re-serves ``pending`` first.
    """

    TYPE: ClassVar[int] = 6
    session_id: str
    received: tuple[tuple[int, tuple[int, ...]], ...]
    pending: tuple[PageRun, ...] = ()

    def __post_init__(self) -> None:
        _check_str("session_id", self.session_id, LIMITS.max_name)
        _check_runs("resume pending", self.pending, LIMITS.max_runs)
        if type(self.received) is not tuple:
            raise _fail("resume: received must be a tuple")
        if len(self.received) > LIMITS.max_blocks:
            raise _fail(f"resume: at most {LIMITS.max_blocks} blocks")
        total = 0
        seen = set()
        for item in self.received:
            if type(item) is not tuple or len(item) != 2:
                raise _fail("resume: received items are (block, bounds)")
            block, bounds = item
            _check_int("resume block", block, 0, LIMITS.max_blocks - 1)
            if block in seen:
                raise _fail(f"resume: block {block} appears twice")
            seen.add(block)
            total += _check_bounds(bounds)
        if total > LIMITS.max_resume_runs:
            raise _fail(f"resume: more than {LIMITS.max_resume_runs} runs")


@_frozen
class Done:
    """Source -> destination: every page has been sent on this channel."""

    TYPE: ClassVar[int] = 7
    pages: int  #: pages (data and zero) sent on the channel since its Hello

    def __post_init__(self) -> None:
        _check_int("done pages", self.pages, 0, 1 << 46)


@_frozen
class Complete:
    """Destination -> source: every page is placed; the source may let go."""

    TYPE: ClassVar[int] = 8


@_frozen
class Ack:
    """Destination -> source, background channel: ``nbytes`` more were consumed.

    The source keeps at most its window of background bytes unacknowledged,
    so background data never queues far ahead of an urgent page.
    """

    TYPE: ClassVar[int] = 9
    nbytes: int

    def __post_init__(self) -> None:
        _check_int("ack nbytes", self.nbytes, 1, 1 << 46)


@_frozen
class Ping:
    """Keep-alive; the peer answers with a Pong carrying the same token."""

    TYPE: ClassVar[int] = 10
    token: int

    def __post_init__(self) -> None:
        _check_int("ping token", self.token, 0, (1 << 63) - 1)


@_frozen
class Pong:
    TYPE: ClassVar[int] = 11
    token: int

    def __post_init__(self) -> None:
        _check_int("pong token", self.token, 0, (1 << 63) - 1)


@_frozen
class Error:
    """Either side, either protocol: a fatal error; the sender closes next."""

    TYPE: ClassVar[int] = 12
    code: ErrorCode
    text: str

    def __post_init__(self) -> None:
        if not isinstance(self.code, ErrorCode):
            raise _fail("error code must be an ErrorCode")
        _check_str("error text", self.text, LIMITS.max_text, empty=True)


# ----------------------------------------------------------- client control


@_frozen
class ClientHello:
    """Client -> service, first message: who it is and how it wants to work."""

    TYPE: ClassVar[int] = 20
    version: int
    pid: int
    name: str
    mode: ClientMode

    def __post_init__(self) -> None:
        _check_int("version", self.version, 1, 0xFFFF)
        _check_int("pid", self.pid, 1, (1 << 31) - 1)
        _check_str("client name", self.name, LIMITS.max_name)
        if not isinstance(self.mode, ClientMode):
            raise _fail("client mode must be a ClientMode")


@_frozen
class Blocks:
    """Service -> client (phase *advise*): the blocks; one fd per block rides along.

    The fds travel as SCM_RIGHTS ancillary data on the same sendmsg(), in
    block order.  ``page_size`` of each block tells the client how to map it.
    """

    TYPE: ClassVar[int] = 21
    session_id: str
    blocks: tuple[BlockInfo, ...]

    def __post_init__(self) -> None:
        _check_str("session_id", self.session_id, LIMITS.max_name)
        if type(self.blocks) is not tuple or not 1 <= len(self.blocks) <= LIMITS.max_blocks:
            raise _fail(f"blocks: 1..{LIMITS.max_blocks} blocks")
        for block in self.blocks:
            if type(block) is not BlockInfo:
                raise _fail("blocks: items must be BlockInfo")


@_frozen
class Register:
    """Client -> service (phase *listen*): mappings registered with userfaultfd.

    Delegated clients send their userfaultfd as SCM_RIGHTS with this message
    and a mapping table of ``(address, length, block, offset)`` entries.
    Self-served clients send no fd and an empty table.
    """

    TYPE: ClassVar[int] = 22
    mappings: tuple[tuple[int, int, int, int], ...]

    def __post_init__(self) -> None:
        # Code ``mapping``: a frame that decodes but holds a bad table is refused
        # with Reject(mapping) naming the entry, like a table that fails the
        # service's own checks (docs/protocol.md, sections 3 and 5.2).
        mapping = ErrorCode.MAPPING.value
        if type(self.mappings) is not tuple or len(self.mappings) > LIMITS.max_blocks:
            raise _fail(f"register: the mapping table must be an array of at most {LIMITS.max_blocks} "
                        "entries", mapping)
        for index, entry in enumerate(self.mappings):
            if type(entry) is not tuple or len(entry) != 4:
                raise _fail(f"register: mapping entry {index}: expected [address, length, block, offset], "
                            f"got {entry!r:.120}", mapping)
            for name, value, low, high in zip(_ENTRY_FIELDS, entry, _ENTRY_LOW, _ENTRY_HIGH):
                _check_int(f"register: mapping entry {index}: {name}", value, low, high, mapping)


_ENTRY_FIELDS = ("address", "length", "block", "offset")
_ENTRY_LOW = (1, 1, 0, 0)
_ENTRY_HIGH = ((1 << 64) - 1, LIMITS.max_block_length, LIMITS.max_blocks - 1, LIMITS.max_block_length)


@_frozen
class Accept:
    """Service -> client: registration accepted; the client is *running*."""

    TYPE: ClassVar[int] = 23


@_frozen
class Reject:
    """Service -> client: registration refused; the text says which entry and why."""

    TYPE: ClassVar[int] = 24
    code: ErrorCode
    text: str

    def __post_init__(self) -> None:
        if not isinstance(self.code, ErrorCode):
            raise _fail("reject code must be an ErrorCode")
        _check_str("reject text", self.text, LIMITS.max_text, empty=True)


@_frozen
class ClientRequest:
    """Self-served client -> service: these pages fault here; send Placed when in."""

    TYPE: ClassVar[int] = 25
    runs: tuple[PageRun, ...]

    def __post_init__(self) -> None:
        _check_runs("client request runs", self.runs, LIMITS.max_runs)
        if not self.runs:
            raise _fail("client request: no runs")


@_frozen
class Placed:
    """Service -> self-served client: these requested pages are now in memory."""

    TYPE: ClassVar[int] = 26
    runs: tuple[PageRun, ...]

    def __post_init__(self) -> None:
        _check_runs("placed runs", self.runs, LIMITS.max_runs)
        if not self.runs:
            raise _fail("placed: no runs")


@_frozen
class End:
    """Service -> client (phase *end*): every page is placed; unregister and close."""

    TYPE: ClassVar[int] = 27
    complete: bool = True  #: False when the migration was aborted

    def __post_init__(self) -> None:
        if type(self.complete) is not bool:
            raise _fail("end: complete must be a bool")


@_frozen
class Bye:
    """Client -> service: leaving; the service retires the client's fd in order."""

    TYPE: ClassVar[int] = 28


@_frozen
class Digests:
    """Destination -> source (urgent, feature ``from-copy``): digests of pages of an earlier copy.

    ``digests[i]`` is the 64-bit digest (BLAKE2b, 8 bytes, big-endian) of page
    ``first + i`` of block ``block`` as the destination's copy holds it.  The
    source answers each with one :class:`Changed`, in order.
    """

    TYPE: ClassVar[int] = 13
    block: int
    first: int
    digests: tuple[int, ...]

    def __post_init__(self) -> None:
        digests = self.digests
        if type(digests) is not tuple or not 1 <= len(digests) <= LIMITS.max_digests:
            raise _fail(f"digests: 1..{LIMITS.max_digests} digests in a tuple")
        _check_run("digests", self.block, self.first, len(digests))
        if self.first + len(digests) > 1 << 46:
            raise _fail("digests: pages past 2**46")
        if set(map(type, digests)) != {int} or min(digests) < 0 or max(digests) >= 1 << 64:
            raise _fail("digests: each digest is an integer in [0, 2**64)")

    @property
    def run(self) -> PageRun:
        return PageRun(block=self.block, first=self.first, count=len(self.digests))


@_frozen
class Changed:
    """Source -> destination (urgent, feature ``from-copy``): the answer to one Digests.

    The run is the Digests' own; ``changed`` lists the pages whose digest is
    not the source's as flattened bounds relative to ``first`` (as
    :attr:`Pages.zeros`, possibly empty: nothing changed).
    """

    TYPE: ClassVar[int] = 14
    block: int
    first: int
    count: int
    changed: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        _check_run("changed", self.block, self.first, self.count)
        if self.count > LIMITS.max_digests:
            raise _fail(f"changed: count must be at most {LIMITS.max_digests}")
        bounds = self.changed
        if type(bounds) is not tuple or len(bounds) % 2:
            raise _fail("changed: bounds must be an even-length tuple")
        if bounds:
            if set(map(type, bounds)) != {int} or bounds[0] < 0 or bounds[-1] > self.count:
                raise _fail(f"changed: bounds must be integers in [0, {self.count}]")
            if not all(map(operator.lt, bounds, itertools.islice(bounds, 1, None))):
                raise _fail("changed: bounds must be strictly increasing")

    @property
    def run(self) -> PageRun:
        return PageRun(block=self.block, first=self.first, count=self.count)


Message = Union[
    Hello, Request, Pages, Zero, Discard, Resume, Done, Complete, Ack, Ping, Pong, Error,
    ClientHello, Blocks, Register, Accept, Reject, ClientRequest, Placed, End, Bye, Digests, Changed,
]

MESSAGE_TYPES: dict[int, type] = {
    cls.TYPE: cls
    for cls in (
        Hello, Request, Pages, Zero, Discard, Resume, Done, Complete, Ack, Ping, Pong, Error,
        ClientHello, Blocks, Register, Accept, Reject, ClientRequest, Placed, End, Bye, Digests, Changed,
    )
}
