"""Client process for the SCM_RIGHTS test (run as a script, not collected).

argv: a connected Unix socket fd, then a memfd fd (both inherited).  Like a
vhost-user back-end it maps the shared memory, opens its own userfaultfd,
registers its mapping, and passes the fd plus its mapping table to the
service over the socket.  Then it reads page ``argv[3]`` (blocking on the
fault until the service places the page and wakes this fd) and replies "ok"
if every byte is 0xa5.
"""

import json
import os
import socket
import sys

from aiopostcopy.uffd import Feature, SharedMemory, Userfaultfd, default_page_size

PAGE = default_page_size()


def main() -> int:
    sock = socket.socket(fileno=int(sys.argv[1]))
    shm = SharedMemory.adopt(int(sys.argv[2]))
    page = int(sys.argv[3])
    mapping = shm.map()
    uffd = Userfaultfd.open(Feature.THREAD_ID)
    uffd.register(mapping.address, mapping.length)
    table = {"address": mapping.address, "length": mapping.length, "offset": 0, "pid": os.getpid()}
    socket.send_fds(sock, [json.dumps(table).encode()], [uffd.fd])
    data = bytes(mapping.buffer()[page * PAGE : (page + 1) * PAGE])
    sock.sendall(b"ok" if data == b"\xa5" * PAGE else b"bad")
    sock.recv(1)  # stay alive (fd and mapping intact) until the test says bye
    return 0


if __name__ == "__main__":
    sys.exit(main())
