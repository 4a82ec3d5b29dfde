"""The vhost-user codec and conversation, against a scripted back-end (pure logic, no sockets).

The fake answers as DPDK's vhost library does (lib/vhost/vhost_user.c): a
reply for GET_*, POSTCOPY_ADVISE (one fd), POSTCOPY_END; in postcopy the
SET_MEM_TABLE reply carries its own mapping addresses; a REPLY_ACK u64 for
any other request sent with NEED_REPLY.  Tests break it one way at a time.
"""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aiopostcopy.core.vhost_user import (
    FLAG_NEED_REPLY,
    FLAG_REPLY,
    HEADER,
    MAX_PAYLOAD,
    VERSION,
    Decoder,
    FrontEndConversation,
    MemoryRegion,
    Phase,
    ProtocolFeature,
    Reply,
    Request,
    VhostFeature,
    Virtqueue,
    encode,
    pack_memory,
    pack_u64,
    unpack_memory,
)
from aiopostcopy.errors import LocalProtocolError, RemoteProtocolError

UFFD = 90
BACKEND_BASE = 0x7F00_0000_0000
ALL_PROTOCOL = ProtocolFeature.REPLY_ACK | ProtocolFeature.PAGEFAULT | ProtocolFeature.MQ
ALL_FEATURES = VhostFeature.PROTOCOL_FEATURES | VhostFeature.VERSION_1 | (1 << 15)


def reply(request: int, payload: bytes = b"", fds: tuple[int, ...] = (), flags: int = VERSION | FLAG_REPLY) -> Reply:
    return Reply(int(request), flags, payload, fds)


class FakeBackEnd:
    """Answers like DPDK; records what it was sent."""

    def __init__(self, *, features: int = ALL_FEATURES, protocol: int = ALL_PROTOCOL) -> None:
        self.features, self.protocol = features, protocol
        self.seen: list[tuple[Request, int, bytes, tuple[int, ...]]] = []
        self.fail: set[Request] = set()

    def answer(self, data: bytes, fds: tuple[int, ...]) -> Reply | None:
        request, flags, size = HEADER.unpack_from(data)
        payload = data[HEADER.size:HEADER.size + size]
        request = Request(request)
        self.seen.append((request, flags, payload, fds))
        if request is Request.GET_FEATURES:
            return reply(request, pack_u64(self.features))
        if request is Request.GET_PROTOCOL_FEATURES:
            return reply(request, pack_u64(self.protocol))
        if request is Request.POSTCOPY_ADVISE:
            return reply(request, b"", (UFFD,))
        if request is Request.POSTCOPY_END:
            return reply(request, pack_u64(0))
        if request is Request.SET_MEM_TABLE and flags & FLAG_NEED_REPLY and request not in self.fail:
            regions = unpack_memory(payload)
            mapped = [MemoryRegion(r.guest_phys_addr, r.memory_size, BACKEND_BASE + r.guest_phys_addr, r.mmap_offset)
                      for r in regions]
            return reply(request, pack_memory(mapped))
        if flags & FLAG_NEED_REPLY:
            return reply(request, pack_u64(1 if request in self.fail else 0))
        return None


def regions() -> list[MemoryRegion]:
    return [MemoryRegion(0, 1 << 20, 0x5000_0000), MemoryRegion(1 << 20, 2 << 20, 0x6000_0000)]


def queues() -> list[Virtqueue]:
    return [Virtqueue(index=q, size=256, desc=0x5000_0000 + q * 0x4000, avail=0x5000_1000 + q * 0x4000,
                      used=0x5000_2000 + q * 0x4000, kick_fd=20 + q, call_fd=30 + q) for q in range(2)]


def conversation() -> FrontEndConversation:
    return FrontEndConversation(regions(), [10, 11], queues())


def run(conv: FrontEndConversation, back: FakeBackEnd) -> list:
    """Drive the set-up to its end; the answers the conversation returned."""
    answers = []
    while (step := conv.next_step()) is not None:
        answer = back.answer(step.data, step.fds)
        assert (answer is None) == (step.answer == "none"), step
        if answer is not None:
            answers.append(conv.receive(answer))
    return answers


def test_set_up_in_order_listen_before_memory_table() -> None:
    conv, back = conversation(), FakeBackEnd()
    answers = run(conv, back)
    order = [request for request, *_ in back.seen]
    assert order[:9] == [Request.SET_OWNER, Request.GET_FEATURES, Request.GET_PROTOCOL_FEATURES,
                         Request.SET_PROTOCOL_FEATURES, Request.SET_FEATURES, Request.POSTCOPY_ADVISE,
                         Request.POSTCOPY_LISTEN, Request.SET_MEM_TABLE, Request.SET_MEM_TABLE]
    per_queue = [Request.SET_VRING_NUM, Request.SET_VRING_BASE, Request.SET_VRING_ADDR, Request.SET_VRING_KICK,
                 Request.SET_VRING_CALL, Request.SET_VRING_ENABLE]
    assert order[9:] == per_queue * 2
    assert conv.phase is Phase.RUNNING
    assert conv.features == VhostFeature.PROTOCOL_FEATURES | VhostFeature.VERSION_1  # not MRG_RXBUF
    assert conv.protocol_features == ProtocolFeature.REPLY_ACK | ProtocolFeature.PAGEFAULT
    assert [a.value for a in answers if a.step.answer == "fd"] == [UFFD]
    (mapped,) = [a.value for a in answers if a.step.answer == "memory"]
    assert [r.userspace_addr for r in mapped] == [BACKEND_BASE, BACKEND_BASE + (1 << 20)]


def test_fds_and_flags_ride_with_the_right_requests() -> None:
    back = FakeBackEnd()
    run(conversation(), back)
    by_request = {}
    for request, flags, payload, fds in back.seen:
        by_request.setdefault(request, []).append((flags, payload, fds))
    table, ack = by_request[Request.SET_MEM_TABLE]
    assert table[2] == (10, 11) and table[0] & FLAG_NEED_REPLY
    assert ack == (VERSION, pack_u64(0), ())  # the acknowledgement expects no reply
    assert [fds for _, _, fds in by_request[Request.SET_VRING_KICK]] == [(20,), (21,)]
    assert [fds for _, _, fds in by_request[Request.SET_VRING_CALL]] == [(30,), (31,)]
    assert all(flags & FLAG_NEED_REPLY for flags, _, _ in by_request[Request.SET_VRING_ADDR])
    index, flags, desc, used, avail, log = struct.unpack("<IIQQQQ", by_request[Request.SET_VRING_ADDR][1][1])
    assert (index, desc, used, avail) == (1, 0x5000_4000, 0x5000_6000, 0x5000_5000)


def test_end_after_running() -> None:
    conv, back = conversation(), FakeBackEnd()
    run(conv, back)
    step = conv.end()
    conv.receive(back.answer(step.data, step.fds))
    assert conv.phase is Phase.ENDED


def test_end_before_running_is_a_local_error() -> None:
    with pytest.raises(LocalProtocolError):
        conversation().end()


@pytest.mark.parametrize("missing", [ProtocolFeature.PAGEFAULT, ProtocolFeature.REPLY_ACK])
def test_back_end_without_a_required_protocol_feature_is_refused(missing: ProtocolFeature) -> None:
    conv = conversation()
    with pytest.raises(RemoteProtocolError, match=missing.name):
        run(conv, FakeBackEnd(protocol=ALL_PROTOCOL & ~missing))
    assert conv.phase is Phase.FAILED and conv.next_step() is None


def test_back_end_without_protocol_features_is_refused() -> None:
    with pytest.raises(RemoteProtocolError, match="PROTOCOL_FEATURES"):
        run(conversation(), FakeBackEnd(features=VhostFeature.VERSION_1))


def test_out_of_order_answer_is_refused() -> None:
    conv = conversation()
    conv.next_step()  # SET_OWNER
    conv.next_step()  # GET_FEATURES awaits its reply
    with pytest.raises(RemoteProtocolError, match="out of order"):
        conv.receive(reply(Request.GET_PROTOCOL_FEATURES, pack_u64(0)))


def test_uninvited_message_is_refused() -> None:
    with pytest.raises(RemoteProtocolError, match="nothing was asked"):
        conversation().receive(reply(Request.GET_FEATURES, pack_u64(0)))


def test_reply_without_reply_flag_is_refused() -> None:
    conv = conversation()
    conv.next_step(), conv.next_step()
    with pytest.raises(RemoteProtocolError, match="reply bit"):
        conv.receive(reply(Request.GET_FEATURES, pack_u64(ALL_FEATURES), flags=VERSION))


def test_failed_request_names_the_request() -> None:
    back = FakeBackEnd()
    back.fail.add(Request.POSTCOPY_LISTEN)
    with pytest.raises(RemoteProtocolError, match="failed POSTCOPY_LISTEN"):
        run(conversation(), back)


def test_memory_table_failure_instead_of_addresses() -> None:
    back = FakeBackEnd()
    back.fail.add(Request.SET_MEM_TABLE)
    with pytest.raises(RemoteProtocolError, match="instead of answering with its mapping addresses"):
        run(conversation(), back)


def test_memory_table_reply_must_match_what_was_sent() -> None:
    conv = conversation()
    while (step := conv.next_step()).request is not Request.SET_MEM_TABLE:
        answer = FakeBackEnd().answer(step.data, step.fds)
        if answer is not None:
            conv.receive(answer)
    wrong = [MemoryRegion(0, 1 << 20, BACKEND_BASE), MemoryRegion(1 << 20, 1 << 20, BACKEND_BASE + (1 << 20))]
    with pytest.raises(RemoteProtocolError, match="region 1"):
        conv.receive(reply(Request.SET_MEM_TABLE, pack_memory(wrong)))


def test_unexpected_fds_are_refused() -> None:
    conv = conversation()
    conv.next_step(), conv.next_step()
    with pytest.raises(RemoteProtocolError, match="unexpected fds"):
        conv.receive(reply(Request.GET_FEATURES, pack_u64(ALL_FEATURES), fds=(7,)))


def test_advise_without_fd_is_refused() -> None:
    conv = conversation()
    while (step := conv.next_step()).request is not Request.POSTCOPY_ADVISE:
        answer = FakeBackEnd().answer(step.data, step.fds)
        if answer is not None:
            conv.receive(answer)
    with pytest.raises(RemoteProtocolError, match="userfaultfd"):
        conv.receive(reply(Request.POSTCOPY_ADVISE))


def test_too_many_regions_is_a_local_error() -> None:
    with pytest.raises(LocalProtocolError):
        FrontEndConversation([MemoryRegion(i << 20, 1 << 20, 0) for i in range(9)], list(range(9)), [])


# ---------------------------------------------------------------- the decoder

def test_decoder_byte_by_byte_and_fds_go_with_the_message() -> None:
    data = encode(Request.GET_FEATURES, pack_u64(5)) + encode(Request.POSTCOPY_END, pack_u64(0))
    decoder = Decoder()
    got = []
    for i, byte in enumerate(data):
        decoder.feed(bytes([byte]), (4,) if i == 0 else ())
        while (message := decoder.next_reply()) is not None:
            got.append(message)
    assert [(m.request, m.payload, m.fds) for m in got] == [(1, pack_u64(5), (4,)), (30, pack_u64(0), ())]


def test_decoder_bounds_the_payload() -> None:
    decoder = Decoder()
    decoder.feed(HEADER.pack(Request.GET_FEATURES, VERSION | FLAG_REPLY, MAX_PAYLOAD + 1))
    with pytest.raises(RemoteProtocolError, match="at most"):
        decoder.next_reply()


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400), st.integers(min_value=1, max_value=64))
def test_decoder_parses_or_raises_remote_error(data: bytes, chunk: int) -> None:
    """Fuzz: arbitrary bytes, whole or in chunks, give replies or RemoteProtocolError, nothing else."""
    decoder = Decoder()
    try:
        for start in range(0, len(data), chunk):
            decoder.feed(data[start:start + chunk])
            while decoder.next_reply() is not None:
                pass
    except RemoteProtocolError:
        pass


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_memory_table_unpack_parses_or_raises(payload: bytes) -> None:
    try:
        unpack_memory(payload)
    except RemoteProtocolError:
        pass
