"""A client that misbehaves on purpose, speaking the control protocol by hand.

``python rogue_client.py --socket PATH MODE`` where MODE is one of:

``garbage``           connect and send bytes that are no frame at all;
``bad-frame``         a ClientHello frame of the right shape whose fields are all invalid;
``table-past-block``  a mapping entry whose (offset, length) runs past the end of its block;
``table-overlap``     two entries whose address ranges overlap;
``table-bad-block``   an entry naming a block index the service does not have;
``fault-outside``     a valid table covering only the first half of block 0, then a touch
                      of a page in the second half (registered with our uffd, but not in
                      the table the service was given).
``unregistered``      a valid table and a uffd, but block 0 never registered on it, and
                      the 4th, 3rd and 2nd last pages of block 0 read before Register (which
                      fills them with zeros in the shared file).  Pages at the end: the sweep
                      starts at the beginning, so what it sent before the test stopped the
                      source cannot have placed them.
``self-served-touch`` joins self-served, registers nothing, and reads the 8th, 7th and 6th last
                      pages of block 0 (zeros again), then stays until the migration ends.
``request-past-block`` joins self-served and sends one ClientRequest of two one-page runs: the
                      3rd last page of block 0, then the page just past its end.
``version-2``         a ClientHello of protocol version 2.
``table-short-entry`` a Register frame (with our uffd) whose one entry has three integers.
``table-zero-length`` a Register frame whose entry has length 0 (out of range).
``table-empty``       a delegated Register with no entry at all (and our uffd).
``no-bye``            joins delegated with a valid table, waits for End and never says Bye
                      (nor closes): reports whether and when the service closed on its own.

It prints one JSON object: what the service sent back (message type, code,
text), whether the service closed the connection, and for ``fault-outside``
whether the touching thread was still blocked.  Exit status 0 when the run
went as scripted (the verdict is the test's), 2 when it could not even talk.
A thread left blocked on our userfaultfd dies with the process (the kernel
never zero-fills a page for a thread that is being killed).
"""

from __future__ import annotations

import argparse
import array
import ctypes
import json
import os
import select
import socket
import sys
import threading
import time

import msgpack

from aiopostcopy.core.control import SERVICE_SENDS
from aiopostcopy.messages import PROTOCOL_VERSION, Blocks, ClientHello, ClientMode, ClientRequest, PageRun, Register
from aiopostcopy.transport.wire import ConnectionClosed, Decoder, encode
from aiopostcopy.uffd import Feature, RegisterMode, SharedMemory, Userfaultfd

_FD = array.array("i").itemsize


class Conn:
    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(path)
        self.decoder = Decoder(allowed=SERVICE_SENDS)
        self.fds: list[int] = []
        self.eof = False

    def send(self, msg, fds=()) -> None:
        data = encode(msg)
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
        self.sock.sendmsg([data], anc)

    def messages(self, timeout: float, *, until_eof: bool = False, count: int = 1) -> list:
        """Collect messages until ``count`` arrived (or EOF when ``until_eof``), or ``timeout``."""
        got: list = []
        deadline = time.monotonic() + timeout
        while not self.eof and (until_eof or len(got) < count):
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.sock], [], [], left)[0]:
                break
            data, anc, _, _ = self.sock.recvmsg(1 << 20, socket.CMSG_SPACE(64 * _FD))
            for level, kind, payload in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    self.fds += array.array("i", payload[:len(payload) - len(payload) % _FD])
            try:
                self.decoder.receive_data(data)
                while (event := self.decoder.next_event()) is not None:
                    if isinstance(event, ConnectionClosed):
                        self.eof = True
                        break
                    else:
                        got.append(event)
            except Exception as exc:  # noqa: BLE001 - the service sent something we cannot decode
                got.append({"undecodable": f"{type(exc).__name__}: {exc}"})
                self.eof = not data
            if not data:
                self.eof = True
        return got


def describe(messages: list) -> list[dict]:
    out = []
    for msg in messages:
        if isinstance(msg, dict):
            out.append(msg)
            continue
        item = {"type": type(msg).__name__}
        for field in ("code", "text", "complete"):
            if hasattr(msg, field):
                value = getattr(msg, field)
                item[field] = getattr(value, "value", value)
        out.append(item)
    return out


def join(conn: Conn, *, register: bool = True,
         mode: ClientMode = ClientMode.DELEGATED) -> tuple[Blocks, list, Userfaultfd]:
    conn.send(ClientHello(version=PROTOCOL_VERSION, pid=os.getpid(), name="rogue", mode=mode))
    (blocks,) = conn.messages(10)
    assert isinstance(blocks, Blocks), blocks
    mappings = []
    for info in blocks.blocks:
        shm = SharedMemory.adopt(conn.fds.pop(0))
        mappings.append(shm.map(info.length))
    uffd = Userfaultfd.open(Feature.THREAD_ID, nonblocking=True)
    for mapping in mappings if register else mappings[1:]:
        uffd.register(mapping.address, mapping.length, RegisterMode.MISSING)
    return blocks, mappings, uffd


def read_pages(base: int, page: int, pages: list[int]) -> list[int]:
    """Read the first byte of each page (unregistered: the kernel fills a missing page with zeros)."""
    scratch = ctypes.create_string_buffer(1)
    seen = []
    for index in pages:
        ctypes.memmove(scratch, base + index * page, 1)
        seen.append(scratch.raw[0])
    return seen


RAW_TABLES = {
    "table-short-entry": lambda base, page: [[base, page, 0]],
    "table-zero-length": lambda base, page: [[base, 0, 0, 0]],
    "table-empty": lambda base, page: [],
}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--socket", required=True)
    parser.add_argument("mode")
    args = parser.parse_args()
    conn = Conn(args.socket)
    result: dict = {"mode": args.mode, "pid": os.getpid()}
    if args.mode == "garbage":
        conn.sock.sendall(b"\xff\xfe this is not a frame \x00\x01\x02" * 8)
        result["received"] = describe(conn.messages(10, until_eof=True))
    elif args.mode == "bad-frame":
        # a ClientHello frame of the right shape whose fields are all wrong
        body = msgpack.packb([ClientHello.TYPE, "one", -5, 7, "flying"])
        conn.sock.sendall(len(body).to_bytes(4, "big") + body)
        result["received"] = describe(conn.messages(10, until_eof=True))
    elif args.mode == "version-2":
        conn.send(ClientHello(version=PROTOCOL_VERSION + 1, pid=os.getpid(), name="rogue",
                              mode=ClientMode.DELEGATED))
        result["received"] = describe(conn.messages(10, until_eof=True))
        result["fds"] = len(conn.fds)
    elif args.mode in RAW_TABLES:
        blocks, mappings, uffd = join(conn)
        page = blocks.blocks[0].page_size
        table = RAW_TABLES[args.mode](mappings[0].address, page)
        result["table"] = table
        body = msgpack.packb([Register.TYPE, table])  # by hand: Register() would refuse it
        conn.sock.sendmsg([len(body).to_bytes(4, "big") + body],
                          [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [uffd.fd]))])
        result["received"] = describe(conn.messages(10, until_eof=True))
    elif args.mode == "no-bye":
        blocks, mappings, uffd = join(conn)
        table = tuple((m.address, info.length, i, 0) for i, (m, info) in enumerate(zip(mappings, blocks.blocks)))
        conn.send(Register(mappings=table), (uffd.fd,))
        result["reply"] = describe(conn.messages(10))
        result["received"] = describe(conn.messages(120))  # End
        ended = time.monotonic()
        result["tail"] = describe(conn.messages(120, until_eof=True))  # then nothing until the service closes
        result["closed_after_s"] = round(time.monotonic() - ended, 3) if conn.eof else None
    elif args.mode == "self-served-touch":
        blocks, mappings, _ = join(conn, register=False, mode=ClientMode.SELF_SERVED)
        conn.send(Register(mappings=()))
        result["reply"] = describe(conn.messages(10))
        pages = blocks.blocks[0].length // blocks.blocks[0].page_size
        result["read"] = read_pages(mappings[0].address, blocks.blocks[0].page_size, [pages - 8, pages - 7, pages - 6])
        result["received"] = describe(conn.messages(60, until_eof=True))
    elif args.mode == "request-past-block":
        blocks, mappings, _ = join(conn, register=False, mode=ClientMode.SELF_SERVED)
        conn.send(Register(mappings=()))
        result["reply"] = describe(conn.messages(10))
        pages = blocks.blocks[0].length // blocks.blocks[0].page_size
        conn.send(ClientRequest(runs=(PageRun(block=0, first=pages - 3, count=1),
                                      PageRun(block=0, first=pages, count=1))))
        result["received"] = describe(conn.messages(60, until_eof=True))
    else:
        blocks, mappings, uffd = join(conn, register=args.mode != "unregistered")
        length = blocks.blocks[0].length
        base = mappings[0].address
        page = blocks.blocks[0].page_size
        if args.mode == "table-past-block":
            table = ((base, length, 0, page),)  # offset one page: runs a page past the block
        elif args.mode == "table-overlap":
            table = ((base, length, 0, 0), (base + page, page, 0, 0))
        elif args.mode == "table-bad-block":
            table = ((base, length, len(blocks.blocks) + 3, 0),)
        elif args.mode == "fault-outside":
            table = ((base, length // 2, 0, 0),)
        elif args.mode == "unregistered":
            table = tuple((m.address, info.length, i, 0) for i, (m, info) in enumerate(zip(mappings, blocks.blocks)))
            last = length // page - 1
            result["read"] = read_pages(base, page, [last - 3, last - 2, last - 1])
        else:
            raise SystemExit(f"unknown mode {args.mode}")
        result["table"] = [list(entry) for entry in table]
        conn.send(Register(mappings=table), (uffd.fd,))
        if args.mode == "fault-outside":
            result["reply"] = describe(conn.messages(10))
            scratch = ctypes.create_string_buffer(1)
            target = base + length - page  # the last page: outside the table we gave
            toucher = threading.Thread(target=ctypes.memmove, args=(scratch, target, 1), daemon=True)
            toucher.start()
            result["received"] = describe(conn.messages(10, until_eof=True))
            toucher.join(0.5)
            result["toucher_blocked"] = toucher.is_alive()
        else:
            result["received"] = describe(conn.messages(10, until_eof=True))
    result["eof"] = conn.eof
    print(json.dumps(result, default=str), flush=True)
    os._exit(0)  # a blocked toucher dies with us; never close the uffd under it first


if __name__ == "__main__":
    sys.exit(main())
