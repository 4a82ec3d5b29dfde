"""The vhost-user front-end: a back-end (DPDK, vhost-user-bridge) made a postcopy client.

Theory of operation
-------------------
:class:`VhostUserFrontEnd` connects to a back-end listening on a Unix socket
and runs the conversation of :mod:`aiopostcopy.core.vhost_user` as a task on
the service's event loop, one request at a time.  The service's blocks are
the guest's memory: block ``i`` is region ``i`` of the memory table, at guest
physical addresses laid end to end from 0, with the service's own mapping
address as the region's userspace address (what QEMU sends: its own
addresses).  The guest's split virtqueues sit where :class:`RingLayout` says.

The back-end's userfaultfd arrives in the POSTCOPY_ADVISE reply.  The reply
to SET_MEM_TABLE carries the back-end's mapping addresses: they become its
mapping table, and the fd is attached to the :class:`ClientRegistry` as a
delegated client under the front-end's name *before* the acknowledgement
goes out (the back-end registers its userfaultfd only after the
acknowledgement, and faults at once).  The fault loop keeps running while
the conversation awaits replies: DPDK reads the rings inside its
SET_VRING_KICK handler and answers only once those faults are served.

A back-end whose mapping already has resident pages before it registers
(testpmd without ``--no-mlockall`` locks and fills every mapping) is refused:
those pages are zeros in the shared memory now, its reads would never fault,
and the service's own placements would find the pages present.  The
migration's memory is no longer trustworthy, so the service is aborted.

While running, the socket is watched: EOF or anything the back-end sends
uninvited retires the client (stop reading its fd, drop its waiters, close).
When the migration completes the registry wakes everything and closes its
copy of the fd; the front-end then sends POSTCOPY_END and closes the
service's last copy (the original) once the back-end has answered.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import dataclasses
import os
import socket
import struct
from collections.abc import Awaitable, Callable

from aiopostcopy.core.ramblock import MappingTable
from aiopostcopy.core.vhost_user import (
    MAX_FDS,
    MAX_PAYLOAD,
    Decoder,
    FrontEndConversation,
    MemoryRegion,
    Phase,
    Reply,
    Step,
    VhostFeature,
    Virtqueue,
)
from aiopostcopy.destination.clients import ClientInfo, ClientRegistry
from aiopostcopy.destination.memory import BlockMemory
from aiopostcopy.errors import MappingTableError, PostcopyError, RemoteProtocolError
from aiopostcopy.uffd import Userfaultfd

__all__ = ["FrontEndPort", "RingLayout", "VhostUserFrontEnd", "resident_bytes"]

_RECV_SIZE = 12 + MAX_PAYLOAD
_END_TIMEOUT = 5.0  #: seconds a closing service waits for the back-end to answer POSTCOPY_END


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class RingLayout:
    """Where the guest's split virtqueues live, in guest physical addresses.

    Virtqueue ``q`` (0 receive, 1 transmit for virtio-net) takes ``stride``
    bytes at ``base + q * stride``: descriptor table at +0, available ring at
    +``avail_offset``, used ring at +``used_offset`` (each in its own page by
    default, so the back-end's faults on each ring are counted apart).
    """

    queues: int = 2
    size: int = 256
    base: int = 0
    stride: int = 0x4000
    avail_offset: int = 0x1000
    used_offset: int = 0x2000

    def desc(self, q: int) -> int:
        return self.base + q * self.stride

    def avail(self, q: int) -> int:
        return self.desc(q) + self.avail_offset

    def used(self, q: int) -> int:
        return self.desc(q) + self.used_offset


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class FrontEndPort:
    """All a front-end may use of the service.

    Attributes:
        registry: where the back-end's userfaultfd is attached as a delegated client.
        memory: the blocks (their memfds go to the back-end in SET_MEM_TABLE).
        is_complete: every page is placed.
        abort: end the migration (a back-end that read zeros leaves nothing to save).
        wait_complete: the migration's outcome.
    """

    registry: ClientRegistry
    memory: BlockMemory
    is_complete: Callable[[], bool]
    abort: Callable[[str], None]
    wait_complete: Callable[[], Awaitable[object]]


class VhostUserFrontEnd:
    """Drives one vhost-user back-end through postcopy as a client of the service.

    Args:
        port: what it may use of the destination service (its blocks must exist).
        path: the back-end's listening socket.
        name: the client's name in the report (default ``vhost-user:<path>``).
        layout: where the guest's virtqueues are.
    """

    def __init__(self, port: FrontEndPort, path: str, *, name: str | None = None,
                 layout: RingLayout = RingLayout()) -> None:
        self._port = port
        self._loop = asyncio.get_running_loop()
        self.path = path
        self.name = name or f"vhost-user:{path}"
        self.layout = layout
        self.pid: int | None = None
        self.conversation: FrontEndConversation | None = None
        self.client: ClientInfo | None = None
        self._sock: socket.socket | None = None
        self._decoder = Decoder()
        self._uffd_original: int | None = None  # the service's copy kept until POSTCOPY_END is answered
        self._kick: list[int] = []
        self._call: list[int] = []
        self._watching = False
        self._follower: asyncio.Task | None = None
        self.error: str | None = None

    # -- public ----------------------------------------------------------------

    async def start(self) -> None:
        """Connect and set the back-end up; returns once its virtqueues are running.

        Raises:
            RemoteProtocolError: the back-end lacks a feature, answered out of order,
                failed a request, died, or had its mapping populated already.
            OSError: the socket could not be reached.
        """
        try:
            await self._connect()
            self.conversation = self._conversation()
            await self._set_up()
        except BaseException as exc:
            self.error = f"{self.name}: {exc}"
            if self.client is not None:
                self._port.registry.retire(self.client, str(exc))
            self.release()
            if isinstance(exc, RemoteProtocolError):
                raise RemoteProtocolError(f"vhost-user back-end at {self.path}: {exc}") from exc
            raise
        self._watch()
        self._follower = self._loop.create_task(self._follow(), name=f"vhost-user {self.path}")

    @property
    def features(self) -> int:
        """Negotiated virtio/vhost features (VERSION_1: 12-byte virtio-net header)."""
        return self.conversation.features if self.conversation else 0

    @property
    def net_header_size(self) -> int:
        """Bytes of virtio-net header before each packet in a buffer."""
        return 12 if self.features & VhostFeature.VERSION_1 else 10

    def kick(self, q: int) -> None:
        """Notify the back-end that virtqueue ``q`` has new buffers."""
        os.eventfd_write(self._kick[q], 1)

    def call_fd(self, q: int) -> int:
        """The eventfd the back-end signals when it used buffers of virtqueue ``q``."""
        return self._call[q]

    @property
    def ended(self) -> bool:
        """POSTCOPY_END was sent and answered."""
        return self.conversation is not None and self.conversation.phase is Phase.ENDED

    async def close(self) -> None:
        """After a completed migration, let POSTCOPY_END finish (bounded), then release."""
        follower = self._follower
        if follower is not None and not follower.done() and self._port.is_complete():
            with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(asyncio.shield(follower), _END_TIMEOUT)
        self.release()

    def release(self) -> None:
        """Stop watching, close the socket and eventfds (safe twice).  The registry
        owns its copy of the back-end's userfaultfd; the original is closed here."""
        if self._follower is not None and not self._follower.done():
            self._follower.cancel()
        self._unwatch()
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        for fd in self._decoder.take_fds() + self._kick + self._call:
            os.close(fd)
        self._kick, self._call = [], []
        self._close_uffd_original()

    # -- connecting and the set-up -----------------------------------------------

    async def _connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK)
        self._sock = sock
        await self._loop.sock_connect(sock, self.path)
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        self.pid = struct.unpack("3i", creds)[0] or None

    def _conversation(self) -> FrontEndConversation:
        memory = self._port.memory
        if memory is None:
            raise PostcopyError("vhost-user front-end started before the blocks exist")
        regions, fds, gpa = [], [], 0
        for block in memory:
            regions.append(MemoryRegion(gpa, block.length, block.address, 0))
            fds.append(block.shm.fd)
            gpa += block.length
        self._regions = regions
        queues = []
        for q in range(self.layout.queues):
            self._kick.append(os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK))
            self._call.append(os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK))
            queues.append(Virtqueue(index=q, size=self.layout.size, desc=self._user_address(self.layout.desc(q)),
                                    avail=self._user_address(self.layout.avail(q)),
                                    used=self._user_address(self.layout.used(q)),
                                    kick_fd=self._kick[q], call_fd=self._call[q]))
        return FrontEndConversation(regions, fds, queues)

    def _user_address(self, gpa: int) -> int:
        """A guest physical address as the front-end's (the service's) own address."""
        for region in self._regions:
            if region.guest_phys_addr <= gpa < region.guest_phys_addr + region.memory_size:
                return region.userspace_addr + gpa - region.guest_phys_addr
        raise PostcopyError(f"virtqueue address {gpa:#x} is outside guest memory")

    async def _set_up(self) -> None:
        conv = self.conversation
        assert conv is not None
        while (step := conv.next_step()) is not None:
            await self._send(step)
            if step.answer == "none":
                continue
            answer = conv.receive(await self._receive(step))
            if step.answer == "fd":
                self._uffd_original = answer.value  # type: ignore[assignment]
            elif step.answer == "memory":
                self._attach(answer.value)  # type: ignore[arg-type]
        if conv.phase is not Phase.RUNNING:
            raise RemoteProtocolError(f"set-up ended in phase {conv.phase.value}")

    def _attach(self, theirs: list[MemoryRegion]) -> None:
        """The back-end mapped the blocks at ``theirs``: check them, serve its fd under our name."""
        for index, region in enumerate(theirs):
            resident = resident_bytes(self.pid, region.userspace_addr, region.memory_size)
            if resident:
                reason = (f"its mapping of block {index} already has {resident >> 10} KiB resident before it "
                          "registered its userfaultfd (is it locking memory with mlockall? testpmd needs "
                          "--no-mlockall): its reads would have been zeros, and the shared memory now holds them")
                self._port.abort(f"vhost-user back-end at {self.path}: {reason}")
                raise RemoteProtocolError(f"refused: {reason}")
        entries = [(r.userspace_addr, r.memory_size, index, r.mmap_offset) for index, r in enumerate(theirs)]
        try:
            table = MappingTable.build(self._port.memory.table, entries)
        except MappingTableError as exc:
            raise RemoteProtocolError(f"its mapping addresses do not form a mapping table: {exc}") from exc
        assert self._uffd_original is not None
        uffd = Userfaultfd.adopt(os.dup(self._uffd_original))
        self.client = self._port.registry.attach_delegated(self.name, uffd, table, pid=self.pid)

    # -- the socket ----------------------------------------------------------------

    async def _send(self, step: Step) -> None:
        sock = self._sock
        assert sock is not None
        ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", step.fds))] if step.fds else []
        while True:
            try:
                sent = sock.sendmsg([step.data], ancillary)
                break
            except (BlockingIOError, InterruptedError):
                await self._wait_writable()
            except OSError as exc:
                raise RemoteProtocolError(f"sending {step.request.name} failed: {exc} (back-end gone?)") from exc
        if sent != len(step.data):  # the fds went with the first bytes
            await self._loop.sock_sendall(sock, step.data[sent:])

    async def _wait_writable(self) -> None:
        waiter = self._loop.create_future()
        fd = self._sock.fileno()  # type: ignore[union-attr]
        self._loop.add_writer(fd, lambda: waiter.done() or waiter.set_result(None))
        try:
            await waiter
        finally:
            self._loop.remove_writer(fd)

    async def _receive(self, step: Step) -> Reply:
        """The reply to ``step`` (the fault loop keeps serving meanwhile)."""
        while (reply := self._decoder.next_reply()) is None:
            await self._wait_readable()
            if not self._read_some():
                raise RemoteProtocolError(f"back-end closed the connection while {step.request.name} "
                                          "was awaiting its reply (did it crash? see its log)")
        return reply

    async def _wait_readable(self) -> None:
        waiter = self._loop.create_future()
        fd = self._sock.fileno()  # type: ignore[union-attr]
        self._loop.add_reader(fd, lambda: waiter.done() or waiter.set_result(None))
        try:
            await waiter
        finally:
            self._loop.remove_reader(fd)

    def _read_some(self) -> bool:
        """One recvmsg into the decoder; False at EOF."""
        assert self._sock is not None
        try:
            data, ancdata, flags, _ = self._sock.recvmsg(_RECV_SIZE, socket.CMSG_SPACE(MAX_FDS * 4))
        except (BlockingIOError, InterruptedError):
            return True
        except OSError as exc:
            raise RemoteProtocolError(f"receiving failed: {exc}") from exc
        fds = _fds_of(ancdata)
        self._decoder.feed(data, fds)
        if flags & socket.MSG_CTRUNC:
            raise RemoteProtocolError("back-end sent more fds than one message may carry")
        return bool(data) or bool(fds)

    # -- running -------------------------------------------------------------------

    def _watch(self) -> None:
        if self._sock is not None and not self._watching:
            self._loop.add_reader(self._sock.fileno(), self._on_readable)
            self._watching = True

    def _unwatch(self) -> None:
        if self._watching and self._sock is not None:
            self._loop.remove_reader(self._sock.fileno())
        self._watching = False

    def _on_readable(self) -> None:
        """While running the back-end sends nothing uninvited: EOF or data retires it."""
        try:
            if not self._read_some():
                reason = "vhost-user connection closed by the back-end"
            elif self._decoder.buffered or self._close_received_fds():
                reason = "back-end sent a message nobody asked for"
            else:
                return
        except RemoteProtocolError as exc:
            reason = str(exc)
        self._lost(reason)

    def _close_received_fds(self) -> int:
        fds = self._decoder.take_fds()
        for fd in fds:
            os.close(fd)
        return len(fds)

    def _lost(self, reason: str) -> None:
        self.error = reason
        self._unwatch()
        if self.client is not None:
            self._port.registry.retire(self.client, reason)
        if self._follower is not None and not self._follower.done() and asyncio.current_task() is not self._follower:
            self._follower.cancel()
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    async def _follow(self) -> None:
        """At completion: POSTCOPY_END, then close the service's last copy of the fd."""
        try:
            await self._port.wait_complete()
        except PostcopyError:
            return  # aborted: the back-end's threads stay blocked rather than read zeros
        if self._sock is None or self.conversation is None:
            return
        self._unwatch()
        try:
            step = self.conversation.end()
            await self._send(step)
            self.conversation.receive(await self._receive(step))
        except RemoteProtocolError as exc:
            self._lost(f"POSTCOPY_END: {exc}")
            return
        finally:
            self._close_uffd_original()
        self._watch()

    def _close_uffd_original(self) -> None:
        fd, self._uffd_original = self._uffd_original, None
        if fd is not None:
            os.close(fd)


def _fds_of(ancdata: list) -> list[int]:
    fds: list[int] = []
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            usable = len(data) - len(data) % 4
            fds.extend(array.array("i", data[:usable]))
    return fds


def resident_bytes(pid: int | None, address: int, length: int) -> int:
    """Bytes of process ``pid``'s mappings in ``[address, address+length)`` that are
    resident (``Rss`` in /proc/PID/smaps); 0 when it cannot be read."""
    if pid is None:
        return 0
    try:
        with open(f"/proc/{pid}/smaps", encoding="ascii", errors="replace") as f:
            lines = f.read().splitlines()
    except OSError:
        return 0
    total, inside = 0, False
    for line in lines:
        head = line.split(" ", 1)[0]
        if "-" in head and ":" not in head:
            start, _, end = head.partition("-")
            inside = int(start, 16) < address + length and int(end, 16) > address
        elif inside and line.startswith("Rss:"):
            total += int(line.split()[1]) * 1024
    return total
