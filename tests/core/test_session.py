"""DestinationSession driven by hand: asserts on commands and messages, not on private state."""

from __future__ import annotations

import pytest

from aiopostcopy import messages as m
from aiopostcopy.core import (Abort, DestinationConfig, DestinationSession, DiscardPages,
                              MappingTable, MigrationComplete, NotifyPlaced, Place, PlaceZero,
                              UnknownFault, Wake)
from aiopostcopy.errors import InternalError, LocalProtocolError, RemoteProtocolError

PAGE = 4096
URGENT, BACKGROUND = m.Channel.URGENT, m.Channel.BACKGROUND
BLOCKS = (m.BlockInfo(name="ram", length=16 * PAGE, page_size=PAGE),
          m.BlockInfo(name="huge", length=2 * (2 << 20), page_size=2 << 20))
OWN_BASE, CLIENT_BASE = 0x10000000, 0x7F0000000000


def source_hello(channel: m.Channel, *, blocks: tuple[m.BlockInfo, ...] = BLOCKS,
                 session_id: str = "s1", **fields: object) -> m.Hello:
    values = dict(version=m.PROTOCOL_VERSION, session_id=session_id, role=m.Role.SOURCE,
                  channel=channel, blocks=blocks)
    values.update(fields)
    return m.Hello(**values)  # type: ignore[arg-type]


def pages(block: int, first: int, count: int, page_size: int = PAGE) -> m.Pages:
    return m.Pages(block=block, first=first, count=count, data=bytes(count * page_size))


def run(block: int, first: int, count: int) -> m.PageRun:
    return m.PageRun(block=block, first=first, count=count)


def open_session(**config: object) -> DestinationSession:
    """A session with both channels open, the own fd and client fd "c" registered."""
    session = DestinationSession(session_id="s1", config=DestinationConfig(**config))  # type: ignore[arg-type]
    session.message_received(URGENT, source_hello(URGENT), 0.0)
    session.message_received(BACKGROUND, source_hello(BACKGROUND), 0.0)
    blocks = session.blocks
    assert blocks is not None
    session.add_fd("own", MappingTable.identity(blocks, [OWN_BASE, 0x40000000]), woken_by_copy=True)
    session.add_fd("c", MappingTable.build(blocks, [(CLIENT_BASE, 8 * PAGE, 0, 8 * PAGE)]))
    return session


def requests(session: DestinationSession) -> list[m.PageRun]:
    return [r for channel, msg in session.messages_to_send() if type(msg) is m.Request
            for r in msg.runs if channel is URGENT]


def place_all(session: DestinationSession, now: float) -> list[object]:
    """Carry out Place/PlaceZero commands as the loop would; return the other commands."""
    others = []
    for command in session.commands():
        if type(command) in (Place, PlaceZero):
            session.placed(command.block, command.first, command.count, now)
        else:
            others.append(command)
    return others + session.commands()


# ------------------------------------------------------------------ hello and blocks


def test_hello_defines_blocks_and_ours_is_right() -> None:
    session = DestinationSession(session_id="s1")
    hello = session.hello(URGENT)
    assert (hello.role, hello.channel, hello.session_id, hello.blocks) == (m.Role.DESTINATION, URGENT, "s1", ())
    assert session.blocks is None
    session.message_received(URGENT, source_hello(URGENT), 0.0)
    assert [b.name for b in session.blocks] == ["ram", "huge"]  # type: ignore[union-attr]
    assert session.statistics().pages_total == 18
    assert session.is_open(URGENT) and not session.is_open(BACKGROUND)


@pytest.mark.parametrize("hello, code", [
    (source_hello(URGENT, session_id="other"), "session"),
    (source_hello(URGENT, version=2), "version"),
    (source_hello(URGENT, role=m.Role.DESTINATION), "protocol"),
    (source_hello(BACKGROUND), "protocol"),  # channel field does not match the channel
    (source_hello(URGENT, blocks=()), "protocol"),
])
def test_bad_hello_is_a_remote_protocol_error(hello: m.Hello, code: str) -> None:
    session = DestinationSession(session_id="s1")
    with pytest.raises(RemoteProtocolError) as info:
        session.message_received(URGENT, hello, 0.0)
    assert info.value.code == code
    assert session.blocks is None


def test_second_channel_must_list_the_same_blocks() -> None:
    session = DestinationSession(session_id="s1")
    session.message_received(URGENT, source_hello(URGENT), 0.0)
    with pytest.raises(RemoteProtocolError, match="differs"):
        session.message_received(BACKGROUND, source_hello(BACKGROUND, blocks=BLOCKS[:1]), 0.0)
    assert not session.is_open(BACKGROUND)


@pytest.mark.parametrize("msg", [pages(0, 0, 1), m.Zero(block=0, first=0, count=1), m.Ping(token=1)])
def test_data_before_hello_is_refused(msg: m.Message) -> None:
    session = DestinationSession(session_id="s1")
    with pytest.raises(RemoteProtocolError, match="before the source's Hello"):
        session.message_received(URGENT, msg, 0.0)


@pytest.mark.parametrize("msg", [
    pages(2, 0, 1), pages(0, 15, 2), m.Zero(block=1, first=1, count=2),
    m.Discard(block=0, first=16, count=1), m.Pages(block=0, first=0, count=2, data=bytes(PAGE)),
    m.Request(runs=(run(0, 0, 1),)), m.Complete(), m.Ack(nbytes=1),
    m.Error(code=m.ErrorCode.IO, text="disk on fire"),
])
def test_out_of_range_or_wrong_direction_is_refused_and_changes_nothing(msg: m.Message) -> None:
    session = open_session()
    with pytest.raises(RemoteProtocolError):
        session.message_received(URGENT, msg, 0.0)
    assert session.commands() == []
    assert session.statistics().pages_placed == 0


def test_add_fd_needs_blocks_and_a_fresh_key() -> None:
    session = DestinationSession(session_id="s1")
    with pytest.raises(LocalProtocolError, match="no blocks"):
        session.add_self_served("x")
    session = open_session()
    with pytest.raises(LocalProtocolError, match="already"):
        session.add_self_served("c")
    with pytest.raises(LocalProtocolError, match="unknown fd"):
        session.fault_received("nobody", OWN_BASE, 1, 0.0)


# ------------------------------------------------------------------ data


def test_pages_become_place_commands_for_needed_sub_runs_only() -> None:
    session = open_session()
    session.message_received(BACKGROUND, pages(0, 2, 2), 0.0)
    assert session.commands() == [Place(0, 2, 2, 0)]
    session.message_received(URGENT, pages(0, 0, 6), 0.0)  # 2, 3 are being placed: skipped
    assert session.commands() == [Place(0, 0, 2, 0), Place(0, 4, 2, 4)]
    session.message_received(BACKGROUND, m.Zero(block=0, first=1, count=8), 0.0)
    assert session.commands() == [PlaceZero(0, 6, 3)]
    stats = session.statistics()
    assert (stats.pages_background, stats.pages_zero, stats.pages_duplicate) == (6, 3, 7)


def test_pages_with_zero_pages_place_each_needed_sub_run_with_its_own_zero_stretches() -> None:
    session = open_session()
    session.message_received(BACKGROUND, pages(0, 5, 1), 0.0)  # page 5 is being placed already
    session.commands()
    # run 2..11; zero pages 3, 4 and 8 (relative 1..3, 6..7): payload = pages 2, 5, 6, 7, 9, 10, 11
    msg = m.Pages(block=0, first=2, count=10, zeros=(1, 3, 6, 7), data=bytes(7 * PAGE))
    session.message_received(URGENT, msg, 0.0)
    # 2..5 needed: zeros at relative 1..3, payload from page 0; 6..12 needed: page 8 is relative 2,
    # and its data starts after pages 2 and 5 of the payload (payload index 2)
    assert session.commands() == [Place(0, 2, 3, 0, (1, 3)), Place(0, 6, 6, 2, (2, 3))]
    stats = session.statistics()
    assert (stats.pages_background, stats.pages_zero, stats.pages_duplicate) == (7, 3, 1)


def test_pages_needed_whole_are_placed_with_the_frames_own_zero_stretches() -> None:
    session = open_session()
    msg = m.Pages(block=0, first=4, count=10, zeros=(0, 2, 5, 6, 9, 10), data=bytes(6 * PAGE))
    session.message_received(BACKGROUND, msg, 0.0)
    assert session.commands() == [Place(0, 4, 10, 0, (0, 2, 5, 6, 9, 10))]
    stats = session.statistics()
    assert (stats.pages_background, stats.pages_zero, stats.pages_duplicate) == (6, 4, 0)


@pytest.mark.parametrize(("header", "nbytes"), [
    (m.Pages(block=0, first=0, count=2), 3 * PAGE),  # more than the run
    (m.Pages(block=0, first=0, count=2, zeros=(0, 1)), 2 * PAGE),  # a zero page sent as data
    (m.Pages(block=0, first=0, count=4), 2 * PAGE - 1),  # not whole pages
])
def test_a_payload_that_does_not_match_the_runs_data_pages_is_refused(header: m.Pages, nbytes: int) -> None:
    session = open_session()
    with pytest.raises(RemoteProtocolError) as info:
        session.check_payload(header, nbytes)
    assert info.value.code == "block"
    session.check_payload(m.Pages(block=0, first=0, count=3, zeros=(1, 2)), 2 * PAGE)  # the right size passes
    with pytest.raises(RemoteProtocolError):
        session.message_received(URGENT, m.Pages(block=0, first=0, count=2, zeros=(0, 1), data=bytes(2 * PAGE)), 0.0)
    assert session.commands() == []


def test_a_fault_is_requested_placed_and_woken() -> None:
    session = open_session()
    session.fault_received("c", CLIENT_BASE + 2 * PAGE + 100, 77, 1.0)  # block 0 page 10
    session.fault_received("c", CLIENT_BASE + 3 * PAGE, 78, 1.0)
    assert session.commands() == []
    session.flush(1.0)
    assert requests(session) == [run(0, 10, 2)]
    session.message_received(URGENT, pages(0, 10, 2), 1.5)
    assert session.commands() == [Place(0, 10, 2, 0)]
    session.placed(0, 10, 2, 1.5)
    assert session.commands() == [Wake("c", CLIENT_BASE + 2 * PAGE, 2 * PAGE)]
    stats = session.statistics()
    assert (stats.faults, stats.woken, stats.wakes, stats.pages_demand) == (2, 2, 1, 2)
    assert stats.latency.count == 2 and stats.latency.max == pytest.approx(0.5)
    assert stats.blocked_by_thread[("c", 77)] == pytest.approx(0.5)
    assert stats.faults_by_block == (2, 0)


def test_wake_plan_names_the_clients_to_wake_and_prewoken_placement_emits_no_wake() -> None:
    session = open_session()
    session.fault_received("c", CLIENT_BASE + 2 * PAGE + 100, 77, 1.0)  # block 0 page 10
    session.fault_received("c", CLIENT_BASE + 3 * PAGE, 78, 1.0)
    session.fault_received("own", OWN_BASE + 11 * PAGE, 79, 1.0)  # woken by the copy itself
    session.flush(1.0)
    session.message_received(URGENT, pages(0, 10, 2), 1.5)
    assert session.commands() == [Place(0, 10, 2, 0)]
    assert session.wake_plan(0, 10, 2) == (("c", CLIENT_BASE + 2 * PAGE, 2 * PAGE),)
    assert session.wake_plan(0, 12, 1) == ()  # nobody waits there
    session.placed(0, 10, 2, 1.5, prewoken=True)
    assert session.commands() == []
    stats = session.statistics()
    assert (stats.woken, stats.wakes, stats.waiting) == (3, 0, 0)
    assert stats.latency.count == 3


def test_no_wake_plan_while_a_discard_of_placing_pages_is_pending() -> None:
    session = open_session()
    session.fault_received("c", CLIENT_BASE + 2 * PAGE, 77, 1.0)  # block 0 page 10
    session.message_received(URGENT, pages(0, 10, 1), 1.0)
    session.commands()
    session.message_received(URGENT, m.Discard(block=0, first=10, count=1), 1.0)
    assert session.wake_plan(0, 10, 1) == ()


def test_joined_fault_is_not_requested_again() -> None:
    session = open_session()
    session.fault_received("own", OWN_BASE + 3 * PAGE, 1, 0.0)
    session.flush(0.0)
    assert requests(session) == [run(0, 3, 1)]
    session.fault_received("own", OWN_BASE + 3 * PAGE + 8, 2, 0.1)
    session.flush(0.1)
    assert requests(session) == []
    assert session.statistics().faults_joined == 1


def test_own_fd_is_woken_by_the_copy_unless_the_page_existed() -> None:
    session = open_session()
    session.fault_received("own", OWN_BASE + 9 * PAGE, 1, 0.0)
    session.fault_received("c", CLIENT_BASE + PAGE, 2, 0.0)  # the same page, block 0 page 9
    session.message_received(URGENT, pages(0, 9, 1), 0.0)
    session.commands()
    session.placed(0, 9, 1, 0.1)
    assert session.commands() == [Wake("c", CLIENT_BASE + PAGE, PAGE)]
    session.fault_received("own", OWN_BASE + 5 * PAGE, 3, 0.0)
    session.message_received(URGENT, pages(0, 5, 1), 0.0)
    session.commands()
    session.placed(0, 5, 1, 0.1, existed_pages=1)
    assert session.commands() == [Wake("own", OWN_BASE + 5 * PAGE, PAGE)]
    assert session.statistics().woken == 3


def test_fault_on_a_placed_page_is_woken_at_once() -> None:
    session = open_session()
    session.message_received(BACKGROUND, pages(0, 0, 1), 0.0)
    place_all(session, 0.0)
    session.fault_received("own", OWN_BASE + 10, 1, 0.2)
    assert session.commands() == [Wake("own", OWN_BASE, PAGE)]
    assert session.statistics().faults_already_placed == 1


def test_unknown_address_is_reported_and_counted() -> None:
    session = open_session()
    session.fault_received("c", 0x1234000, 9, 0.0)
    assert session.commands() == [UnknownFault("c", 0x1234000, 9)]
    assert session.statistics().bad_faults == 1


def test_retired_fd_waiters_are_never_woken() -> None:
    session = open_session()
    session.fault_received("c", CLIENT_BASE, 1, 0.0)
    session.retire("c", 2.0)
    session.retire("c", 2.0)  # idempotent
    session.message_received(URGENT, pages(0, 8, 1), 2.0)
    assert place_all(session, 2.0) == []
    stats = session.statistics()
    assert stats.waiting == 0 and stats.woken == 0 and stats.waiters_dropped == 1
    assert stats.blocked_by_fd["c"] == pytest.approx(2.0)


def test_huge_pages_wake_whole_huge_pages() -> None:
    session = open_session()
    session.fault_received("own", 0x40000000 + (2 << 20) + 12345, 1, 0.0)
    session.flush(0.0)
    assert requests(session) == [run(1, 1, 1)]
    session.message_received(URGENT, pages(1, 1, 1, 2 << 20), 0.0)
    assert place_all(session, 0.0) == []  # woken by the copy


# ------------------------------------------------------------------ self-served clients


def test_self_served_client_is_notified_as_runs_land() -> None:
    session = open_session()
    session.add_self_served("s")
    session.message_received(BACKGROUND, pages(0, 0, 2), 0.0)
    place_all(session, 0.0)
    session.client_request("s", [run(0, 1, 4)], 0.0)
    assert session.commands() == [NotifyPlaced("s", (run(0, 1, 1),))]
    session.flush(0.0)
    assert requests(session) == [run(0, 2, 3)]
    session.message_received(URGENT, pages(0, 2, 3), 0.1)
    assert place_all(session, 0.1) == [NotifyPlaced("s", (run(0, 2, 3),))]
    with pytest.raises(LocalProtocolError):
        session.client_request("c", [run(0, 1, 1)], 0.0)
    with pytest.raises(RemoteProtocolError):
        session.client_request("s", [run(0, 15, 2)], 0.0)


# ------------------------------------------------------------------ discards, failures


def test_discard_drops_placed_pages_and_requests_them_again() -> None:
    session = open_session()
    session.message_received(BACKGROUND, pages(0, 0, 4), 0.0)
    place_all(session, 0.0)
    session.message_received(BACKGROUND, m.Discard(block=0, first=1, count=5), 0.0)
    assert session.commands() == [DiscardPages(0, 1, 3)]
    assert session.statistics().pages_placed == 1
    session.flush(0.0)
    assert requests(session) == [run(0, 1, 3)]


def test_discard_of_a_page_being_placed_waits_for_the_placement() -> None:
    session = open_session()
    session.fault_received("c", CLIENT_BASE, 1, 0.0)  # page 8
    session.message_received(URGENT, pages(0, 8, 2), 0.0)
    assert session.commands() == [Place(0, 8, 2, 0)]
    session.message_received(URGENT, m.Discard(block=0, first=8, count=1), 0.0)
    assert session.commands() == []
    session.placed(0, 8, 2, 0.1)
    assert session.commands() == [DiscardPages(0, 8, 1)]  # and no Wake for page 8
    session.flush(0.1)
    assert requests(session) == [run(0, 8, 1)]
    session.message_received(URGENT, pages(0, 8, 1), 0.2)
    assert place_all(session, 0.2) == [Wake("c", CLIENT_BASE, PAGE)]


def test_placement_failed_requests_again() -> None:
    session = open_session()
    session.message_received(BACKGROUND, pages(0, 3, 2), 0.0)
    session.commands()
    session.placement_failed(0, 3, 2, 0.0)
    session.flush(0.0)
    assert requests(session) == [run(0, 3, 2)]
    with pytest.raises(InternalError):
        session.placed(0, 3, 1, 0.0)  # not being placed
    with pytest.raises(InternalError):
        session.placement_failed(0, 3, 1, 0.0)


# ------------------------------------------------------------------ completion and control


def test_completion_is_emitted_once_and_told_to_the_source() -> None:
    session = open_session()
    session.message_received(BACKGROUND, m.Zero(block=0, first=0, count=16), 0.0)
    session.message_received(BACKGROUND, m.Done(pages=16), 0.0)
    place_all(session, 0.0)
    assert not session.complete
    session.message_received(URGENT, pages(1, 0, 2, 2 << 20), 0.0)
    assert place_all(session, 0.0) == [MigrationComplete()]
    assert (URGENT, m.Complete()) in session.messages_to_send()
    assert session.complete and session.statistics().complete
    session.message_received(BACKGROUND, pages(0, 0, 1), 0.0)
    assert session.commands() == []
    with pytest.raises(RemoteProtocolError, match="after the migration completed"):
        session.message_received(BACKGROUND, m.Discard(block=0, first=0, count=1), 0.0)


def test_ping_is_answered_on_its_channel_and_acks_follow_background_bytes() -> None:
    session = open_session(ack_bytes=2 * PAGE)
    session.message_received(BACKGROUND, m.Ping(token=5), 0.0)
    session.message_received(BACKGROUND, pages(0, 0, 1), 0.0)
    session.message_received(URGENT, pages(0, 1, 4), 0.0)  # urgent bytes are not windowed
    session.flush(0.0)
    assert session.messages_to_send() == [(BACKGROUND, m.Pong(token=5))]
    session.message_received(BACKGROUND, pages(0, 5, 2), 0.0)
    session.flush(0.0)
    assert session.messages_to_send() == [(BACKGROUND, m.Ack(nbytes=3 * PAGE))]


def test_request_timeout_re_requests_what_is_still_missing() -> None:
    session = open_session(request_timeout=1.0)
    assert session.get_timer() is None
    session.fault_received("own", OWN_BASE, 1, 0.0)
    session.fault_received("own", OWN_BASE + PAGE, 2, 0.0)
    session.flush(0.0)
    assert requests(session) == [run(0, 0, 2)]
    assert session.get_timer() == 1.0
    session.message_received(URGENT, pages(0, 0, 1), 0.5)
    session.handle_timer(0.9)
    assert requests(session) == []
    session.handle_timer(1.0)
    assert requests(session) == [run(0, 1, 1)]
    assert session.get_timer() == 2.0
    assert session.statistics().pages_re_requested == 1


def test_deadline_aborts_with_a_reason_and_tells_the_source() -> None:
    session = open_session(deadline=10.0, request_timeout=None)
    assert session.get_timer() == 10.0
    session.handle_timer(10.0)
    (abort,) = session.commands()
    assert type(abort) is Abort and "18 pages missing" in abort.reason
    assert {channel for channel, msg in session.messages_to_send()
            if type(msg) is m.Error and msg.code is m.ErrorCode.ABORTED} == {URGENT, BACKGROUND}
    assert session.aborted and session.get_timer() is None
    session.abort("again", 11.0)
    assert session.commands() == []


def test_source_abort_ends_the_session() -> None:
    session = open_session()
    session.message_received(URGENT, m.Error(code=m.ErrorCode.ABORTED, text="operator"), 0.0)
    assert session.commands() == [Abort("the source aborted: operator")]


# ------------------------------------------------------------------ losing a channel


def test_reconnect_sends_one_resume_with_received_and_pending() -> None:
    session = open_session()
    session.message_received(BACKGROUND, pages(0, 0, 3), 0.0)
    place_all(session, 0.0)
    session.message_received(BACKGROUND, pages(0, 5, 1), 0.0)
    session.commands()  # page 5 is being placed: it counts as received
    session.fault_received("own", OWN_BASE + 9 * PAGE, 1, 0.0)
    session.flush(0.0)
    session.messages_to_send()
    session.connection_lost(URGENT, 1.0)
    session.fault_received("own", OWN_BASE + 12 * PAGE, 2, 1.0)
    session.flush(1.0)
    assert session.messages_to_send() == []  # nowhere to send a request
    # like loop.py: reconnect, send our Hello and the Resume, then the source answers
    resume = m.Resume(session_id="s1", received=((0, (0, 3, 5, 6)),), pending=(run(0, 9, 1),))
    assert session.resume_message(2.0) == resume
    session.message_received(URGENT, source_hello(URGENT), 2.0)
    assert session.messages_to_send() == []  # the loop sent it: no second Resume
    session.flush(2.0)
    assert requests(session) == [run(0, 12, 1)]
    assert session.statistics().resumes == 1


def test_session_queues_the_resume_if_the_loop_does_not() -> None:
    session = open_session()
    session.fault_received("own", OWN_BASE, 1, 0.0)
    session.flush(0.0)
    session.messages_to_send()
    session.connection_lost(BACKGROUND, 0.5)
    session.message_received(BACKGROUND, source_hello(BACKGROUND), 1.0)
    assert session.messages_to_send() == [
        (URGENT, m.Resume(session_id="s1", received=(), pending=(run(0, 0, 1),)))]


def test_hello_on_an_open_channel_counts_as_a_reconnection() -> None:
    session = open_session()
    session.message_received(URGENT, source_hello(URGENT), 1.0)
    assert [type(msg) for _, msg in session.messages_to_send()] == [m.Resume]


def test_live_statistics_include_threads_still_blocked() -> None:
    session = open_session()
    session.fault_received("c", CLIENT_BASE, 42, 1.0)
    assert session.statistics().blocked_by_thread == {}
    live = session.statistics(4.0)
    assert live.waiting == 1 and live.blocked_by_thread[("c", 42)] == pytest.approx(3.0)
