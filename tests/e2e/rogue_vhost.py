"""A vhost-user back-end that misbehaves one way: ``python rogue_vhost.py SOCK MODE``.

Modes: ``no-pagefault`` (offers REPLY_ACK but not PAGEFAULT), ``out-of-order``
(answers GET_FEATURES with a GET_PROTOCOL_FEATURES reply), ``dies`` (exits
when POSTCOPY_ADVISE arrives, without answering).  Otherwise it answers as
DPDK does until the front-end gives up.  Prints ``listening`` when ready.
"""

from __future__ import annotations

import os
import socket
import struct
import sys

HEADER = struct.Struct("<III")
REPLY = 0x1 | 0x4
NEED_REPLY = 0x8
GET_FEATURES, GET_PROTOCOL_FEATURES, POSTCOPY_ADVISE = 1, 15, 28


def answer(conn: socket.socket, request: int, payload: bytes) -> None:
    conn.sendall(HEADER.pack(request, REPLY, len(payload)) + payload)


def serve(conn: socket.socket, mode: str) -> None:
    while True:
        header = conn.recv(HEADER.size, socket.MSG_WAITALL)
        if len(header) < HEADER.size:
            return
        request, flags, size = HEADER.unpack(header)
        if size:
            conn.recv(size, socket.MSG_WAITALL)
        if request == GET_FEATURES:
            answer(conn, GET_PROTOCOL_FEATURES if mode == "out-of-order" else request,
                   struct.pack("<Q", (1 << 30) | (1 << 32)))
        elif request == GET_PROTOCOL_FEATURES:
            answer(conn, request, struct.pack("<Q", (1 << 3) if mode == "no-pagefault" else (1 << 3) | (1 << 8)))
        elif request == POSTCOPY_ADVISE and mode == "dies":
            os._exit(3)
        elif flags & NEED_REPLY:
            answer(conn, request, struct.pack("<Q", 0))


def main() -> None:
    path, mode = sys.argv[1], sys.argv[2]
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)
    print("listening", flush=True)
    conn, _ = listener.accept()
    serve(conn, mode)


if __name__ == "__main__":
    main()
