"""Child process for the EVENT_FORK test (run as a script, not collected).

argv: the fd of a connected Unix socket.  It opens a userfaultfd with
EVENT_FORK, registers an anonymous 4-page range, sends the fd and the range's
address to the test, waits for "go", and forks.  fork() blocks until the test
reads the FORK event.  The grandchild then reads page 1, which faults on the
*new* userfaultfd the test received; it exits 0 if the bytes are 0x5a.
The child exits with the grandchild's status.
"""

import os
import socket
import sys

from aiopostcopy.uffd import Feature, Mapping, Userfaultfd, default_page_size

PAGE = default_page_size()


def main() -> int:
    sock = socket.socket(fileno=int(sys.argv[1]))
    uffd = Userfaultfd.open(Feature.EVENT_FORK)
    mapping = Mapping.anonymous(4 * PAGE)
    uffd.register(mapping.address, mapping.length)
    socket.send_fds(sock, [str(mapping.address).encode()], [uffd.fd])
    if sock.recv(2) != b"go":
        return 3
    pid = os.fork()
    if pid == 0:
        data = bytes(mapping.buffer()[PAGE : 2 * PAGE])  # faults: resolved through the FORK fd
        os._exit(0 if data == b"\x5a" * PAGE else 1)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


if __name__ == "__main__":
    sys.exit(main())
