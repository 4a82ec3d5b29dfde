"""Which userfaultfds the destination's C lanes may use: an fd is forgotten when it is retired or
an event other than a page fault is read from it, and left to the Python path for good once its
mappings moved or went (its mapping table may no longer say what is at an address)."""

from __future__ import annotations

import pytest

from aiopostcopy.loop import DestinationOptions, PostcopyDestination
from aiopostcopy.transport import request_lane
from aiopostcopy.transport.request_lane import RequestLane
from aiopostcopy.uffd import ForkEvent, RemapEvent, RemoveEvent, UnmapEvent
from aiopostcopy.uffd.events import PAGEFAULT_CODE

pytestmark = pytest.mark.skipif(not request_lane.available(), reason="the C side is not built")


@pytest.mark.asyncio
@pytest.mark.parametrize("event, off", [(RemoveEvent(0x1000, 0x2000), False), (ForkEvent(7), False),
                                        (UnmapEvent(0x1000, 0x2000), True), (RemapEvent(0x1000, 0x9000, 0x1000), True)])
async def test_an_event_forgets_the_fd_and_a_moved_mapping_turns_the_lanes_off(event, off) -> None:
    dest = PostcopyDestination(DestinationOptions(source=("127.0.0.1", 9)))
    dest._lane = RequestLane([bytearray(8)], [4096], PAGEFAULT_CODE)
    dest._lane_keys[41] = "client"
    dest._take_events("client", [event], 0.0, 41)
    assert 41 not in dest._lane_keys  # its faults so far are answered the exact way
    assert ("client" in dest._lane_off) is off
    await dest.close()
