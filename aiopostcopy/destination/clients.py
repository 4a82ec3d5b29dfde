"""Client processes of the destination service: the control socket and their userfaultfds.

Theory of operation
-------------------
Clients connect to a Unix socket.  Each gets a :class:`ServiceControl` state
machine (phases advise -> listen -> running -> end, see core/control.py) and a
:class:`~aiopostcopy.transport.fdstream.ControlChannel` that carries frames
and file descriptors.

* ClientHello: the service answers Blocks with one fd per block.
* Register (delegated): the client's userfaultfd arrives; its mapping table
  is validated (a bad table is rejected with the entry and the reason); the
  fd is watched with ``add_reader`` and its faults go to the session under
  the client's key.  Wakes for the client's threads go to that fd.
* Register (self-served): no fd, no addresses; the client sends
  ClientRequest runs and is told Placed runs.  A ClientRequest of a few runs
  (the faults of one read of its userfaultfd) takes the channel's shortcut:
  no message is built, and the missing pages' Request leaves at once
  (:meth:`ServicePort.request_runs`);
  Placed goes out as a frame encoded straight from the session's runs.
* EOF, Bye, garbage, or a fault outside the client's table: the client is
  retired in order (stop reading its fd, drop its waiters in the session,
  close our copy of the fd, close the socket).  Nothing it did reaches the
  other clients: every per-client failure ends in :meth:`ClientRegistry.retire`.
* End: the client answers Bye at once, and the service closes that
  connection when it reads it.  Shutting down (:meth:`ClientRegistry.aclose`)
  waits at most :data:`BYE_GRACE` seconds for the Byes still due, so a
  client's Bye does not meet a closed socket, and a client that never says
  it does not hold the service up.

A dead client gives no signal on its userfaultfd, which is why the socket's
EOF is what retires it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import itertools
import os
import socket
import stat
import time
from collections.abc import Callable
from typing import Any

from aiopostcopy import trace
from aiopostcopy.core.control import TRANSITIONS, Phase, ServiceControl, Side, version_reject
from aiopostcopy.core.ramblock import MappingTable
from aiopostcopy.core.commands import NotifyPlaced, UnknownFault
from aiopostcopy.core.session import DestinationSession
from aiopostcopy.destination.memory import BlockMemory
from aiopostcopy.errors import BusyError, MappingTableError, ProtocolError, RemoteProtocolError, UffdError
from aiopostcopy.messages import (
    Accept,
    Blocks,
    Bye,
    ClientHello,
    ClientMode,
    ClientRequest,
    End,
    Error,
    ErrorCode,
    Message,
    PageRun,
    Placed,
    Register,
    Reject,
)
from aiopostcopy.transport.fdstream import ControlChannel, error_for
from aiopostcopy.transport.wire import encode_placed
from aiopostcopy.uffd import ForkEvent, RegisterMode, RemapEvent, Userfaultfd

__all__ = ["ClientRegistry", "ClientInfo", "ServicePort", "BYE_GRACE"]

#: Seconds a closing service waits for the Bye of clients it sent End (they answer at once).
BYE_GRACE = 1.0

_FROM_CLIENT = frozenset({ClientHello, Register, ClientRequest, Bye, Error})


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class ServicePort:
    """All the registry may use of the service.

    Attributes:
        session_id: the migration's id, told to clients in Blocks.
        session: the core session: clients' fds, requests and retirements go to it.
        memory: the blocks (their fds go to clients; tables are checked against them).
        read_faults: drain a userfaultfd's events into the session under a key.
        schedule_pass: ask for one processing pass of the service.
        fd_retired: a client's userfaultfd (key, fd number) is about to be closed.
        request_runs: a self-served client's ClientRequest of a few runs, ``(key, ((block,
            first, count), ...))``: into the session, the Request of its missing pages sent at
            once when it may be, the rest left to the pass.  Raises as
            ``DestinationSession.client_fault_request`` (a refused request changes nothing).
    """

    session_id: str
    session: DestinationSession
    memory: BlockMemory
    read_faults: Callable[[str, Userfaultfd], None]
    schedule_pass: Callable[[], None]
    fd_retired: Callable[[str, int], None] = lambda key, fd: None
    request_runs: Callable[[str, tuple[tuple[int, int, int], ...]], None] | None = None


@dataclasses.dataclass(slots=True)
class ClientInfo:
    """What the service knows of one client."""

    key: str
    pid: int | None
    name: str = "?"
    mode: ClientMode | None = None
    uffd: Userfaultfd | None = None
    table: MappingTable | None = None
    channel: ControlChannel | None = None
    control: ServiceControl = dataclasses.field(default_factory=ServiceControl)
    error: str | None = None
    children: list[Userfaultfd] = dataclasses.field(default_factory=list)
    said_bye: bool = False  #: the client said Bye (after End: it read End and left in order)


class ClientRegistry:
    """Accepts clients on ``path`` and keeps them apart from each other."""

    def __init__(self, port: ServicePort, path: str | None) -> None:
        self._port = port
        self._session = port.session
        self._loop = asyncio.get_running_loop()
        self._clients: dict[str, ClientInfo] = {}
        self._retired: list[ClientInfo] = []
        self._ids = itertools.count(1)
        self._byes: asyncio.Future[None] | None = None  # set while aclose() waits for Byes
        self.path = path
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        if path is None:  # attached clients only (vhost-user back-ends): no control socket
            self._listener.close()
            return
        _bind_replacing_stale(self._listener, path)
        self._listener.listen(64)
        self._listener.setblocking(False)
        self._loop.add_reader(self._listener.fileno(), self._on_accept)

    # -- queries ---------------------------------------------------------------

    def __iter__(self):
        return iter(list(self._clients.values()) + self._retired)

    def get(self, key: object) -> ClientInfo | None:
        return self._clients.get(key)  # type: ignore[arg-type]

    def summaries(self) -> list[dict[str, Any]]:
        """One record per client, current and retired, for the report."""
        return [{"key": c.key, "pid": c.pid, "name": c.name, "mode": c.mode.value if c.mode else None,
                 "error": c.error} for c in self]

    # -- accepting ---------------------------------------------------------------

    def _on_accept(self) -> None:
        while True:
            try:
                sock, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            key = f"client-{next(self._ids)}"
            client = ClientInfo(key=key, pid=None)
            self._clients[key] = client
            client.channel = ControlChannel(
                sock,
                lambda msg, c=client: self._on_message(c, msg),
                lambda exc, c=client: self._on_lost(c, exc),
                allowed=_FROM_CLIENT,
                refusal=lambda exc, c=client: self._refusal(c, exc),
                on_client_request=lambda runs, c=client: self._on_client_request(c, runs),
            )
            client.pid = client.channel.peer_pid()

    def _on_message(self, client: ClientInfo, msg: Message) -> None:
        try:
            client.control.receive(msg, nfds=client.channel.pending_fds)
            handler = _HANDLERS.get(type(msg))
            if handler is not None:
                handler(self, client, msg)
        except ProtocolError as exc:
            self._refuse(client, exc)

    def _refuse(self, client: ClientInfo, exc: ProtocolError) -> None:
        """A message of the client broke the protocol: reject it with the error's code."""
        code = ErrorCode(exc.code) if exc.code in ErrorCode._value2member_map_ else ErrorCode.PROTOCOL
        self._reject(client, code, str(exc))

    def _on_hello(self, client: ClientInfo, msg: ClientHello) -> None:
        client.name, client.mode = msg.name, msg.mode
        refusal = version_reject(msg)
        if refusal is not None:
            self._reject(client, refusal.code, refusal.text)
            return
        memory = self._port.memory
        infos = tuple(b.info for b in memory)
        self._send(client, Blocks(session_id=self._port.session_id, blocks=infos), [b.shm.fd for b in memory])

    def _on_register(self, client: ClientInfo, msg: Register) -> None:
        if self._session.complete:
            self._join_after_end(client, msg)
            return
        if client.mode is ClientMode.SELF_SERVED:
            if msg.mappings:
                raise RemoteProtocolError("a self-served client sends no mapping table", code=ErrorCode.MAPPING.value)
            self._session.add_self_served(client.key)
            self._send(client, Accept())
            return
        (fd,) = client.channel.take_fds(1)
        uffd = Userfaultfd.adopt(fd)
        try:
            table = MappingTable.build(self._port.memory.table, msg.mappings)
            self._verify_registration(uffd, table)
        except MappingTableError as exc:
            uffd.close()  # its process still holds its own copy: no thread is zero-filled
            self._reject(client, ErrorCode.MAPPING, str(exc))
            return
        client.uffd, client.table = uffd, table
        self._session.add_fd(client.key, table)
        self._loop.add_reader(uffd.fd, self._on_uffd_readable, client)
        self._send(client, Accept())
        self._on_uffd_readable(client)  # faults may have queued before we watched the fd
        self._wake_mapped(client)

    def _wake_mapped(self, client: ClientInfo) -> None:
        """Wake every mapped range once: a client that joins again after its service died has
        threads whose faults the dead service read.  Those on pages already here go on; the
        others fault again, and this service sees it."""
        if client.uffd is None or client.table is None:  # retired while reading its first faults
            return
        try:
            for address, length, _block, _offset in client.table.entries:
                client.uffd.wake(address, length)
        except UffdError as exc:
            self.retire(client, f"waking it failed: {exc}")

    def _verify_registration(self, uffd: Userfaultfd, table: MappingTable) -> None:
        """Make sure every range of ``table`` is registered on ``uffd`` and nothing was filled early.

        Registration acts on the fd's process, so the service registers each
        range itself (a no-op where the client already did): a range it cannot
        register (not mapped there, or on another userfaultfd) is refused.  Then
        the block's backing file is asked which pages hold data (SEEK_DATA): a
        page the service never placed was filled by a touch before registration,
        i.e. with zeros.  Those pages are dropped again (they migrate as any
        missing page), counted as integrity pages, and the client is refused.
        hugetlbfs cannot say which pages hold data: there the placement's
        EEXIST catches such a page instead.

        Raises:
            MappingTableError: a range is not registrable, or pages were filled early.
        """
        memory = self._port.memory
        for address, length, index, offset in table.entries:
            block = memory.block(index)
            try:
                uffd.register(address, length, RegisterMode.MISSING)
            except UffdError as exc:
                raise MappingTableError(
                    f"mapping [{address:#x}, +{length:#x}) of block {block.info.name!r} cannot be registered "
                    f"through the userfaultfd passed with the table: {exc}") from exc
            filled = self._filled_early(index, offset, length)
            if filled:
                pages = sum(stop - start for start, stop in filled)
                for start, stop in filled:
                    memory.discard(index, start, stop - start)
                self._session.filled_elsewhere(pages)
                raise MappingTableError(
                    f"{pages} pages of block {block.info.name!r} (first: page {filled[0][0]}) were filled before "
                    "the mapping was registered: a touch of a missing page reads zeros unless it is registered "
                    "first; the pages were dropped again")

    def _filled_early(self, index: int, offset: int, length: int) -> list[tuple[int, int]]:
        """Page runs of block ``index`` in ``[offset, offset + length)`` holding data the service did not place."""
        block = self._port.memory.block(index)
        runs = block.shm.data_runs(offset, length)
        size = block.page_size
        filled: list[tuple[int, int]] = []
        for start, stop in runs or ():
            first = start // size
            filled.extend(self._session.unplaced_runs(index, first, -(-stop // size) - first))
        return filled

    def attach_delegated(self, name: str, uffd: Userfaultfd, table: MappingTable, *,
                         pid: int | None = None) -> ClientInfo:
        """Serve an already-open userfaultfd (a vhost-user back-end's) as delegated client ``name``.

        What :meth:`_on_register` does for a delegated client, without a control
        socket: the caller watches the client's own connection and calls
        :meth:`retire` when it dies.  The registry owns ``uffd`` from here on.

        Raises:
            BusyError: a client named ``name`` is already served.
        """
        if name in self._clients:
            raise BusyError(f"a client named {name!r} is already attached")
        client = ClientInfo(key=name, pid=pid, name=name, mode=ClientMode.DELEGATED, uffd=uffd, table=table)
        self._clients[name] = client
        if self._session.complete:  # every page is there: nothing will ever wait on it
            self._end(client, complete=True)
            return client
        self._session.add_fd(name, table)
        self._loop.add_reader(uffd.fd, self._on_uffd_readable, client)
        self._on_uffd_readable(client)  # faults may have queued before we watched the fd
        return client

    def _join_after_end(self, client: ClientInfo, msg: Register) -> None:
        """Every page is already placed: accept, wake what may wait (a client joining again
        after its service died has threads blocked since), then end at once."""
        if msg.mappings:
            uffd = Userfaultfd.adopt(client.channel.take_fds(1)[0])
            try:
                for address, length, _block, _offset in msg.mappings:
                    uffd.wake(address, length)
            except UffdError:
                pass  # an invalid range: its own threads can only be on valid ones
            finally:
                uffd.close()  # every page is in: closing it zero-fills nothing
        self._send(client, Accept())
        self._end(client, complete=True)

    def _on_request(self, client: ClientInfo, msg: ClientRequest) -> None:
        self._session.client_request(client.key, msg.runs, time.monotonic())
        self._port.schedule_pass()

    def _on_client_request(self, client: ClientInfo, runs: tuple[tuple[int, int, int], ...]) -> None:
        """A ClientRequest of a few runs, as the channel's shortcut took it: a running self-served
        client's faults go straight to the session; anything else (another phase or mode,
        descriptors riding along) is built into the message and checked the general way."""
        request_runs = self._port.request_runs
        if (request_runs is None or client.control.phase is not Phase.RUNNING
                or client.mode is not ClientMode.SELF_SERVED or client.channel is None or client.channel.pending_fds):
            msg = ClientRequest(runs=tuple([PageRun(block=block, first=first, count=count)
                                            for block, first, count in runs]))
            return self._on_message(client, msg)
        if trace.ENABLED:
            for block, first, _count in runs:
                trace.mark("client-request", block, first)
        try:
            request_runs(client.key, runs)
        except ProtocolError as exc:
            self._refuse(client, exc)

    def _on_bye(self, client: ClientInfo, msg: Bye) -> None:
        client.said_bye = True
        if client.key in self._clients:  # leaving before End
            self.retire(client, None)
        elif client.channel is not None:  # the answer to End: this connection is done
            client.channel.close()

    def _on_error(self, client: ClientInfo, msg: Error) -> None:
        self.retire(client, f"client reported {msg.code.value}: {msg.text}")

    # -- the client's userfaultfd -------------------------------------------------

    def _on_uffd_readable(self, client: ClientInfo) -> None:
        if client.uffd is None:
            return
        try:
            self._port.read_faults(client.key, client.uffd)
        except UffdError as exc:
            self.retire(client, f"reading its userfaultfd failed: {exc}")

    def non_cooperative_event(self, key: object, event: object) -> None:
        """A fork / remap / remove / unmap event read from a client's fd (reading it
        already unblocked the client).  Fork children get no pages from us: their
        fd is kept open (closing it could zero-fill a waiting child) until the end."""
        client = self._clients.get(key)  # type: ignore[arg-type]
        if client is None:
            return
        if isinstance(event, ForkEvent):
            client.children.append(Userfaultfd.adopt(event.fd))
        elif isinstance(event, RemapEvent):
            self.retire(client, "client moved a registered mapping (mremap); it must register again")

    def uffd_of(self, key: object) -> Userfaultfd | None:
        """The userfaultfd of delegated client ``key`` (None: unknown, self-served or closed)."""
        client = self._clients.get(key)  # type: ignore[arg-type]
        return client.uffd if client is not None else None

    def wake(self, key: object, start: int, length: int) -> None:
        client = self._clients.get(key)  # type: ignore[arg-type]
        if client is None or client.uffd is None:
            return
        try:
            client.uffd.wake(start, length)
        except UffdError as exc:
            self.retire(client, f"waking it failed: {exc}")

    def carry_out(self, command: object) -> None:
        """NotifyPlaced -> Placed to a self-served client; UnknownFault -> reject the client."""
        client = self._clients.get(command.key)  # type: ignore[attr-defined]
        if client is None:
            return
        if type(command) is NotifyPlaced:
            if client.control.phase is Phase.RUNNING and client.channel is not None and client.channel.is_open:
                client.channel.send_frame(encode_placed(command.runs))  # Placed keeps the phase: nothing to advance
            else:
                self._send(client, Placed(runs=tuple(command.runs)))
            if trace.ENABLED:  # every page of each run (runs of several faults are merged)
                for run in command.runs:
                    for page in range(run.first, run.first + run.count):
                        trace.mark("placed-sent", run.block, page)
        elif isinstance(command, UnknownFault):
            self._reject(client, ErrorCode.MAPPING, f"fault at {command.address:#x} is outside the registered mapping table")

    # -- ending ----------------------------------------------------------------

    def _send(self, client: ClientInfo, msg: Message, fds: list[int] = ()) -> None:
        if client.channel is None or not client.channel.is_open:
            return
        client.control.send(msg)
        client.channel.send(msg, fds)

    def _reject(self, client: ClientInfo, code: ErrorCode, text: str) -> None:
        """Refuse (Reject while joining, Error once running) and retire the client."""
        kind = _refusal_kind(client, code)
        if client.channel is not None and client.channel.is_open and _may_send(client, kind):
            msg = kind(code=code, text=text[:4000])
            client.control.send(msg)
            client.channel.send(msg)
        self.retire(client, text)

    def _refusal(self, client: ClientInfo, exc: RemoteProtocolError) -> Message:
        """The last frame for a frame the decoder refused: a Register whose table is
        malformed gets Reject(mapping) naming the entry, anything else Error(code)."""
        answer = error_for(exc)
        kind = _refusal_kind(client, answer.code)
        if kind is Reject and _may_send(client, Reject):
            answer = Reject(code=answer.code, text=answer.text)
            client.control.send(answer)
        return answer

    def _on_lost(self, client: ClientInfo, exc: BaseException | None) -> None:
        client.channel = None  # a retired client's record stays for the report; its buffers go now
        if client.key not in self._clients:  # ended earlier (abort kept its fds): its socket
            self._close_fds(client)          # is gone, so no thread of it can still wait
            self._note_goodbye()
            return
        if exc is None and client.key in self._clients and client.control.phase.value not in ("ended", "closed"):
            exc = ConnectionError("control connection closed before End")
        self.retire(client, None if exc is None else f"control connection: {exc}")

    def retire(self, client: ClientInfo, error: str | None) -> None:
        """Retire a client in order: stop reading, drop its waiters, close its fds."""
        if self._clients.pop(client.key, None) is None:
            return
        client.error = error
        self._retired.append(client)
        if client.uffd is not None:
            self._loop.remove_reader(client.uffd.fd)
        self._session.retire(client.key, time.monotonic())
        self._close_fds(client)
        if client.channel is not None:
            client.channel.close()

    def _wake_everything(self, client: ClientInfo) -> None:
        """Every page is placed: read what is still queued and wake every mapped range,
        so a fault queued during the last placement is not left asleep."""
        uffd = client.uffd
        if uffd is None or client.table is None:
            return
        try:
            while uffd.read_events(64):
                pass
            for address, length, _block, _offset in client.table.entries:
                uffd.wake(address, length)
        except UffdError as exc:
            client.error = client.error or f"final wake failed: {exc}"

    def _close_fds(self, client: ClientInfo) -> None:
        if client.uffd is not None:
            self._port.fd_retired(client.key, client.uffd.fd)  # before its number can be reused
        for uffd in [client.uffd, *client.children]:
            if uffd is not None:
                uffd.close()
        client.uffd = None
        client.children.clear()

    def end_all(self, *, complete: bool) -> None:
        """Tell every client the migration ended; on completion close our copies of their fds.

        After an abort our copies stay open, so a thread still waiting for a page
        stays blocked instead of reading zeros, until its own process lets go or the
        registry is closed (:meth:`_close_channels`).
        """
        for client in list(self._clients.values()):
            self._end(client, complete)

    def _end(self, client: ClientInfo, complete: bool) -> None:
        if client.uffd is not None:
            self._loop.remove_reader(client.uffd.fd)
        if client.channel is not None and client.channel.is_open and _may_send(client, End):
            self._send(client, End(complete=complete))
        if complete:
            self._wake_everything(client)
            self._close_fds(client)
        self._clients.pop(client.key, None)
        self._retired.append(client)

    def close(self, *, complete: bool) -> None:
        """Stop accepting; end every client; close every connection now; remove the socket file."""
        self._stop_listening()
        self.end_all(complete=complete)
        self._close_channels()

    async def aclose(self, *, complete: bool, grace: float = BYE_GRACE) -> None:
        """:meth:`close`, but first wait up to ``grace`` seconds for the Bye of each ended client."""
        self._stop_listening()
        self.end_all(complete=complete)
        if self._awaiting_bye():
            self._byes = self._loop.create_future()
            try:
                await asyncio.wait_for(asyncio.shield(self._byes), grace)
            except asyncio.TimeoutError:
                pass  # a client that does not answer End is closed all the same
            finally:
                self._byes = None
        self._close_channels()

    def _awaiting_bye(self) -> list[ClientInfo]:
        return [c for c in self._retired
                if c.channel is not None and c.channel.is_open and c.control.phase is Phase.ENDED]

    def _note_goodbye(self) -> None:
        if self._byes is not None and not self._byes.done() and not self._awaiting_bye():
            self._byes.set_result(None)

    def _stop_listening(self) -> None:
        if self._listener.fileno() >= 0:
            self._loop.remove_reader(self._listener.fileno())
            self._listener.close()
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass

    def _close_channels(self) -> None:
        """At close, our side of every ended client's connection closes (:meth:`_on_lost` then
        closes the fds an abort kept).  A client with no connection of ours, a vhost-user
        back-end, has its fds closed here: its front-end has closed its connection, and its
        own userfaultfd is its own (docs/vhost-user.md, "After an abort")."""
        for client in self._retired:
            if client.channel is not None:
                client.channel.close()
            else:
                self._close_fds(client)


def _bind_replacing_stale(listener: socket.socket, path: str) -> None:
    """Bind ``path``; a socket file nobody listens on (a dead service's) is replaced.

    Raises:
        OSError: the path is taken by a live service, or by something else than a socket.
    """
    try:
        listener.bind(path)
        return
    except OSError as exc:
        if exc.errno != errno.EADDRINUSE or not stat.S_ISSOCK(os.lstat(path).st_mode):
            raise
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        os.unlink(path)  # stale: its service is gone
        listener.bind(path)
        return
    finally:
        probe.close()
    raise OSError(errno.EADDRINUSE, f"another service is listening on {path}")


def _may_send(client: ClientInfo, kind: type) -> bool:
    return (Side.SERVICE, client.control.phase, kind) in TRANSITIONS


def _refusal_kind(client: ClientInfo, code: ErrorCode) -> type:
    """Reject while the client joins (in ADVISE only for a refused Register's table), else Error."""
    if client.control.phase is Phase.ADVISE and code is not ErrorCode.MAPPING:
        return Error
    return Reject if _may_send(client, Reject) else Error


_HANDLERS = {
    ClientHello: ClientRegistry._on_hello,
    Register: ClientRegistry._on_register,
    ClientRequest: ClientRegistry._on_request,
    Bye: ClientRegistry._on_bye,
    Error: ClientRegistry._on_error,
}
