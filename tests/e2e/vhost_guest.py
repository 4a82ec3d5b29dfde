"""A guest-memory image for the vhost-user test: split virtqueues and one packet to send.

The image is the pattern of tools/pattern.py (every page checkable) with the
guest's virtio-net rings written over it where the front-end's default
:class:`~aiopostcopy.destination.vhost_user.RingLayout` puts them:

* virtqueue 0 (receive): RX_BUFFERS writable 2 KiB buffers, all offered;
* virtqueue 1 (transmit): one descriptor pointing at a virtio-net header and
  an Ethernet frame whose payload comes from a seeded generator, so it exists
  only in the source's image until the destination receives it.

:func:`expected_after_forward` gives the bytes every page must hold once the
back-end forwarded the packet from the transmit queue to the receive queue:
the source's bytes, except the used rings and the first receive buffer.
"""

from __future__ import annotations

import dataclasses
import mmap
import random
import struct

from aiopostcopy.destination.vhost_user import RingLayout
from aiopostcopy.tools.pattern import fill

PAGE = 4096
RX_BUFFERS = 4
RX_BUFFER_AT = 0x10000  #: receive buffer i at RX_BUFFER_AT + i * PAGE
RX_BUFFER_LEN = 2048
TX_BUFFER_AT = 0x20000
RX_FILL = 0xEE  #: receive buffers start filled with this byte
VRING_DESC_F_WRITE = 2


@dataclasses.dataclass(frozen=True)
class Guest:
    layout: RingLayout
    frame: bytes  #: the Ethernet frame in the transmit buffer
    header_size: int  #: virtio-net header bytes before it

    @property
    def ring_pages(self) -> list[int]:
        pages = []
        for q in range(self.layout.queues):
            pages += [self.layout.desc(q) // PAGE, self.layout.avail(q) // PAGE, self.layout.used(q) // PAGE]
        return pages

    @property
    def touched_pages(self) -> set[int]:
        """Pages the back-end must read or write to forward the packet."""
        return set(self.ring_pages) | {TX_BUFFER_AT // PAGE, RX_BUFFER_AT // PAGE}


def make_frame(seed: int) -> bytes:
    rng = random.Random(seed)
    payload = bytes(rng.getrandbits(8) for _ in range(200))
    return bytes.fromhex("020000000001" "020000000002" "88b5") + payload


def build_image(path: str, size: int, *, seed: int, header_size: int = 12, packet: bool = True) -> Guest:
    """Write the image at ``path`` and return what is in it (``packet=False``: the
    transmit queue offers nothing)."""
    layout = RingLayout()
    guest = Guest(layout, make_frame(seed) if packet else b"", header_size)
    with open(path, "w+b") as f:
        f.truncate(size)
        with mmap.mmap(f.fileno(), size) as memory:
            fill(memory, 0, PAGE, seed, 7, assume_zeroed=True)
            _write_rings(memory, guest)
    return guest


def _write_rings(memory: mmap.mmap, guest: Guest) -> None:
    layout = guest.layout
    for q in range(layout.queues):
        for page in (layout.desc(q), layout.avail(q), layout.used(q)):
            memory[page:page + PAGE] = bytes(PAGE)
    rx, tx = 0, 1
    for i in range(RX_BUFFERS):
        at = RX_BUFFER_AT + i * PAGE
        memory[at:at + PAGE] = bytes([RX_FILL]) * PAGE
        _desc(memory, layout.desc(rx), i, at, RX_BUFFER_LEN, VRING_DESC_F_WRITE)
    _avail(memory, layout.avail(rx), list(range(RX_BUFFERS)))
    memory[TX_BUFFER_AT:TX_BUFFER_AT + PAGE] = bytes(PAGE)
    packet = bytes(guest.header_size) + guest.frame
    memory[TX_BUFFER_AT:TX_BUFFER_AT + len(packet)] = packet
    _desc(memory, layout.desc(tx), 0, TX_BUFFER_AT, len(packet), 0)
    _avail(memory, layout.avail(tx), [0] if guest.frame else [])


def _desc(memory: mmap.mmap, table: int, index: int, addr: int, length: int, flags: int) -> None:
    struct.pack_into("<QIHH", memory, table + 16 * index, addr, length, flags, 0)


def _avail(memory: mmap.mmap, ring: int, heads: list[int]) -> None:
    struct.pack_into("<HH", memory, ring, 0, len(heads))
    for slot, head in enumerate(heads):
        struct.pack_into("<H", memory, ring + 4 + 2 * slot, head)


def used_entries(view, ring: int) -> tuple[int, int, list[tuple[int, int]]]:
    """(flags, idx, [(id, len)...]) of a used ring in ``view``."""
    flags, idx = struct.unpack_from("<HH", view, ring)
    return flags, idx, [struct.unpack_from("<II", view, ring + 4 + 8 * i) for i in range(idx)]


def expected_untouched(source: bytes, got: memoryview, guest: Guest) -> bytearray:
    """The source image; the back-end may only have set VRING_USED_F_NO_NOTIFY in the used rings."""
    want = bytearray(source)
    for q in range(guest.layout.queues):
        ring = guest.layout.used(q)
        flags = struct.unpack_from("<H", got, ring)[0]
        struct.pack_into("<H", want, ring, flags if flags in (0, 1) else 0)
    return want


def expected_after_forward(source: bytes, got: memoryview, guest: Guest) -> bytearray:
    """The source image with what forwarding the packet legitimately wrote.

    The used rings hold one element each (receive: the header plus frame
    length; transmit: whatever length the back-end reports, DPDK writes 0),
    their flags may carry VRING_USED_F_NO_NOTIFY; the first receive buffer
    holds the header (num_buffers set to 1 or left as it was) and the frame.  Fields the back-end
    may choose are copied from ``got`` only after their range was checked.
    """
    want = bytearray(source)
    layout = guest.layout
    packet_len = guest.header_size + len(guest.frame)
    for q, length in ((0, packet_len), (1, None)):
        ring = layout.used(q)
        flags, _, _ = used_entries(got, ring)
        tx_len = struct.unpack_from("<I", got, ring + 8)[0]
        struct.pack_into("<HHII", want, ring, flags if flags in (0, 1) else 0, 1, 0,
                         length if length is not None else (tx_len if tx_len <= packet_len else 0))
    rx = RX_BUFFER_AT
    want[rx:rx + guest.header_size] = bytes(guest.header_size)
    if guest.header_size == 12 and struct.unpack_from("<H", got, rx + 10)[0] == 1:
        struct.pack_into("<H", want, rx + 10, 1)  # num_buffers: DPDK leaves it alone without MRG_RXBUF
    else:
        want[rx + 10:rx + 12] = source[rx + 10:rx + 12]
    want[rx + guest.header_size:rx + packet_len] = guest.frame
    return want
