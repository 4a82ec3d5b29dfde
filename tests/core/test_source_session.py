"""SourceSession driven by hand: sessions, urgent order, the sweep, the window, resume, discard."""

from __future__ import annotations

import pytest

from aiopostcopy import messages as m
from aiopostcopy.core import SourceConfig, SourceSession
from aiopostcopy.errors import LocalProtocolError, RemoteProtocolError

PAGE = 4096
URGENT, BACKGROUND = m.Channel.URGENT, m.Channel.BACKGROUND
BLOCKS = (m.BlockInfo(name="a", length=10 * PAGE, page_size=PAGE),
          m.BlockInfo(name="b", length=6 * PAGE, page_size=PAGE))


def dest_hello(channel: m.Channel, session_id: str = "s1") -> m.Hello:
    return m.Hello(version=m.PROTOCOL_VERSION, session_id=session_id, role=m.Role.DESTINATION,
                   channel=channel)


def run(block: int, first: int, count: int) -> m.PageRun:
    return m.PageRun(block=block, first=first, count=count)


def opened(**config: int) -> SourceSession:
    session = SourceSession(blocks=BLOCKS, config=SourceConfig(**config))
    session.message_received(URGENT, dest_hello(URGENT), 0.0)
    session.message_received(BACKGROUND, dest_hello(BACKGROUND), 0.0)
    hellos = session.messages_to_send()
    assert [(channel, msg.blocks, msg.role) for channel, msg in hellos] == [
        (URGENT, BLOCKS, m.Role.SOURCE), (BACKGROUND, BLOCKS, m.Role.SOURCE)]
    return session


def sweep(session: SourceSession, nbytes_per_page: int = PAGE) -> list[m.PageRun]:
    runs = []
    while (r := session.next_background()) is not None:
        session.sent(BACKGROUND, r, r.count * nbytes_per_page)
        runs.append(r)
    return runs


def test_a_second_session_is_busy_and_a_fixed_session_is_enforced() -> None:
    session = opened()
    with pytest.raises(RemoteProtocolError) as info:
        session.message_received(URGENT, dest_hello(URGENT, "s2"), 0.0)
    assert info.value.code == "busy"
    fixed = SourceSession(blocks=BLOCKS, session_id="want")
    with pytest.raises(RemoteProtocolError) as info:
        fixed.message_received(URGENT, dest_hello(URGENT, "other"), 0.0)
    assert info.value.code == "session"
    assert fixed.statistics().rejected == 1


def test_messages_before_hello_or_in_the_wrong_direction_are_refused() -> None:
    session = SourceSession(blocks=BLOCKS)
    with pytest.raises(RemoteProtocolError):
        session.message_received(URGENT, m.Request(runs=(run(0, 0, 1),)), 0.0)
    session = opened()
    for msg in (m.Pages(block=0, first=0, count=1, data=bytes(PAGE)), m.Done(pages=1),
                m.Request(runs=(run(1, 5, 2),)), m.Error(code=m.ErrorCode.IO, text="x")):
        with pytest.raises(RemoteProtocolError):
            session.message_received(URGENT, msg, 0.0)


def test_urgent_runs_come_in_arrival_order_split_to_the_run_limit() -> None:
    session = opened(max_run_pages=3)
    session.message_received(URGENT, m.Request(runs=(run(0, 2, 5), run(1, 0, 1))), 0.0)
    session.message_received(URGENT, m.Request(runs=(run(0, 9, 1),)), 0.0)
    out = []
    while (r := session.next_urgent()) is not None:
        out.append(r)
    assert out == [run(0, 2, 3), run(0, 5, 2), run(1, 0, 1), run(0, 9, 1)]
    assert session.statistics().requests == 2


def test_sweep_covers_every_page_once_starting_after_the_last_request() -> None:
    session = opened(background_run_pages=4)
    session.message_received(URGENT, m.Request(runs=(run(0, 3, 2),)), 0.0)
    assert session.next_urgent() == run(0, 3, 2)
    runs = sweep(session)
    assert runs[0] == run(0, 5, 4)
    pages = sorted((r.block, p) for r in runs for p in range(r.first, r.stop))
    expected = sorted({(0, p) for p in range(10)} - {(0, 3), (0, 4)} | {(1, p) for p in range(6)})
    assert pages == expected
    assert session.all_sent
    assert session.messages_to_send() == [(BACKGROUND, m.Done(pages=14))]
    assert session.next_background() is None
    assert session.messages_to_send() == []  # Done only once


def answer(session: SourceSession, *runs: m.PageRun) -> None:
    """Requests for ``runs``, answered on the urgent channel."""
    session.message_received(URGENT, m.Request(runs=runs), 0.0)
    while session.next_urgent() is not None:
        pass


@pytest.mark.parametrize("bridge, expected", [
    (4, [run(0, 0, 10)]),  # one frame: pages 3 and 6-7 go again
    (1, [run(0, 0, 6), run(0, 8, 2)]),  # the stretch 6-7 is longer than the bridge
    (0, [run(0, 0, 3), run(0, 4, 2), run(0, 8, 2)]),  # never a page twice
])
def test_the_sweep_bridges_short_stretches_of_answered_pages(bridge: int, expected: list[m.PageRun]) -> None:
    session = opened(sweep_bridge_pages=bridge)
    answer(session, run(0, 3, 1), run(0, 6, 2))
    session.message_received(URGENT, m.Request(runs=(run(1, 5, 1),)), 0.0)  # the cursor: block 1
    session.next_urgent()
    runs = sweep(session)
    assert runs[:-1] == expected and runs[-1] == run(1, 0, 5)  # block 1 after the cursor wraps
    sent = {(r.block, p) for r in runs for p in range(r.first, r.stop)}
    assert sent >= {(0, p) for p in (0, 1, 2, 4, 5, 8, 9)} | {(1, p) for p in range(5)}  # every unsent page
    assert session.messages_to_send() == [(BACKGROUND, m.Done(pages=sum(r.count for r in runs)))]


def test_the_sweep_never_bridges_pages_the_destination_holds() -> None:
    session = opened(sweep_bridge_pages=4)
    answer(session, run(0, 3, 1))
    session.connection_lost(URGENT, 1.0)
    session.connection_lost(BACKGROUND, 1.0)
    for channel in (URGENT, BACKGROUND):
        session.message_received(channel, dest_hello(channel), 2.0)
    session.message_received(URGENT, m.Resume(session_id="s1", received=((0, (3, 4, 6, 7)),)), 2.0)
    runs = sorted(sweep(session), key=lambda r: (r.block, r.first))  # from the cursor, after page 3
    assert runs == [run(0, 0, 3), run(0, 4, 2), run(0, 7, 3), run(1, 0, 6)]


def test_a_run_sends_again_at_most_an_eighth_of_its_pages_and_never_huge_pages() -> None:
    block = m.BlockInfo(name="a", length=64 * PAGE, page_size=PAGE)
    session = SourceSession(blocks=(block,), config=SourceConfig(background_run_pages=64))
    for channel in (URGENT, BACKGROUND):
        session.message_received(channel, dest_hello(channel), 0.0)
    session.messages_to_send()
    answer(session, *(run(0, page, 1) for page in range(1, 64, 2)))  # every other page
    session.message_received(URGENT, m.Request(runs=(run(0, 63, 1),)), 0.0)  # the cursor: wrap to 0
    session.next_urgent()
    first = session.next_background()
    assert first == run(0, 0, 17)  # 8 answered pages bridged: an eighth of 64
    huge = m.BlockInfo(name="h", length=8 * (2 << 20), page_size=2 << 20)
    session = SourceSession(blocks=(huge,), config=SourceConfig())
    for channel in (URGENT, BACKGROUND):
        session.message_received(channel, dest_hello(channel), 0.0)
    session.messages_to_send()
    answer(session, run(0, 1, 1))
    session.message_received(URGENT, m.Request(runs=(run(0, 7, 1),)), 0.0)
    session.next_urgent()
    assert sorted(sweep(session, 2 << 20), key=lambda r: r.first) == [run(0, 0, 1), run(0, 2, 5)]


def test_the_bridge_is_never_negative() -> None:
    with pytest.raises(ValueError):
        SourceConfig(sweep_bridge_pages=-1)


def test_background_window_pauses_until_acked() -> None:
    session = opened(background_run_pages=2, background_window_bytes=4 * PAGE)
    assert len(sweep(session)) == 2
    assert session.next_background() is None
    session.message_received(BACKGROUND, m.Ack(nbytes=2 * PAGE), 0.0)
    assert session.next_background() is not None
    assert session.statistics().unacked_bytes == 2 * PAGE


def test_zero_runs_do_not_fill_the_window() -> None:
    session = opened(background_run_pages=2, background_window_bytes=PAGE)
    assert len(sweep(session, nbytes_per_page=0)) == 8
    assert session.all_sent


def test_resume_makes_exactly_the_unreceived_pages_unsent_and_serves_pending_first() -> None:
    session = opened(background_run_pages=16)
    sweep(session)
    session.messages_to_send()
    session.message_received(URGENT, m.Request(runs=(run(0, 1, 1),)), 0.0)
    session.connection_lost(URGENT, 1.0)
    session.connection_lost(BACKGROUND, 1.0)
    assert session.next_urgent() is None and session.next_background() is None
    session.message_received(URGENT, dest_hello(URGENT), 2.0)
    session.message_received(BACKGROUND, dest_hello(BACKGROUND), 2.0)
    session.message_received(URGENT, m.Resume(session_id="s1", received=((0, (0, 1, 3, 10)), (1, (0, 6))),
                                              pending=(run(0, 2, 1),)), 2.0)
    assert session.next_urgent() == run(0, 2, 1)
    assert session.next_urgent() is None  # the old request was replaced by pending
    assert [(r.block, r.first, r.count) for r in sweep(session)] == [(0, 1, 1)]
    assert session.statistics().resumes == 1


def test_resume_is_checked() -> None:
    session = opened()
    for resume in (m.Resume(session_id="s2", received=()),
                   m.Resume(session_id="s1", received=((0, (0, 11)),)),
                   m.Resume(session_id="s1", received=((2, (0, 1)),)),
                   m.Resume(session_id="s1", received=(), pending=(run(1, 5, 2),))):
        with pytest.raises(RemoteProtocolError):
            session.message_received(URGENT, resume, 0.0)


def test_discard_goes_on_open_channels_with_a_ping_and_pages_are_swept_again() -> None:
    session = opened(background_run_pages=16)
    sweep(session)
    session.messages_to_send()
    session.discard(0, 4, 2)
    out = session.messages_to_send()
    assert [(channel, type(msg)) for channel, msg in out] == [
        (URGENT, m.Discard), (URGENT, m.Ping), (BACKGROUND, m.Discard), (BACKGROUND, m.Ping)]
    assert out[0][1] == m.Discard(block=0, first=4, count=2)
    assert session.statistics().discards_unconfirmed == 2
    for channel, msg in out:
        if type(msg) is m.Ping:
            session.message_received(channel, m.Pong(token=msg.token), 0.0)
    assert session.statistics().discards_unconfirmed == 0
    assert not session.all_sent
    assert sweep(session) == [run(0, 4, 2)]
    with pytest.raises(LocalProtocolError):
        session.discard(1, 5, 2)


def discard_then_lose_background(*, confirmed: bool) -> list[tuple[m.Channel, m.Message]]:
    """Discard pages 4-5, maybe see the background Pong, lose background, get a Resume."""
    session = opened(background_run_pages=16)
    sweep(session)
    session.messages_to_send()
    session.discard(0, 4, 2)
    for channel, msg in session.messages_to_send():
        if type(msg) is m.Ping and (channel is URGENT or confirmed):
            session.message_received(channel, m.Pong(token=msg.token), 0.0)
    session.connection_lost(BACKGROUND, 0.0)
    resume = m.Resume(session_id="s1", received=((0, (0, 5)),))  # holds page 4, not page 5
    session.message_received(URGENT, resume, 0.0)
    return [(channel, msg) for channel, msg in session.messages_to_send() if type(msg) is m.Discard]


def test_a_discard_unconfirmed_on_a_lost_channel_is_repeated_after_resume() -> None:
    assert discard_then_lose_background(confirmed=False) == [
        (URGENT, m.Discard(block=0, first=4, count=1))]


def test_a_discard_confirmed_before_the_loss_is_not_repeated() -> None:
    assert discard_then_lose_background(confirmed=True) == []


def test_a_discard_with_no_channel_open_waits_for_the_resume() -> None:
    session = opened(background_run_pages=16)
    sweep(session)
    session.connection_lost(URGENT, 0.0)
    session.connection_lost(BACKGROUND, 0.0)
    session.discard(0, 0, 3)
    assert session.messages_to_send() == []
    session.message_received(URGENT, dest_hello(URGENT), 0.0)
    session.message_received(URGENT, m.Resume(session_id="s1", received=((0, (1, 10)),)), 0.0)
    discards = [msg for _, msg in session.messages_to_send() if type(msg) is m.Discard]
    assert discards == [m.Discard(block=0, first=1, count=2)]


def test_complete_ping_and_abort() -> None:
    session = opened()
    session.message_received(BACKGROUND, m.Ping(token=9), 0.0)
    assert session.messages_to_send() == [(BACKGROUND, m.Pong(token=9))]
    session.message_received(URGENT, m.Complete(), 0.0)
    assert session.complete and session.next_background() is None
    session.message_received(URGENT, dest_hello(URGENT), 0.0)  # its Complete crossed a reconnect
    assert [type(msg) for _, msg in session.messages_to_send()] == [m.Hello]
    with pytest.raises(RemoteProtocolError) as info:
        session.message_received(URGENT, dest_hello(URGENT, "s2"), 0.0)
    assert info.value.code == "session"
    aborted = opened()
    aborted.message_received(URGENT, m.Error(code=m.ErrorCode.ABORTED, text="deadline"), 0.0)
    assert aborted.statistics().aborted and aborted.next_urgent() is None
    with pytest.raises(RemoteProtocolError) as info:
        aborted.message_received(URGENT, dest_hello(URGENT), 0.0)
    assert info.value.code == "aborted"


def test_huge_pages_are_split_to_the_payload_limit() -> None:
    huge = m.BlockInfo(name="h", length=64 * (2 << 20), page_size=2 << 20)
    session = SourceSession(blocks=(huge,), config=SourceConfig(background_run_pages=64))
    session.message_received(BACKGROUND, dest_hello(BACKGROUND), 0.0)
    first = session.next_background()
    assert first is not None and first.count * (2 << 20) <= m.LIMITS.max_payload


@pytest.mark.parametrize("msg", [m.Request(runs=(run(0, 1, 1),)), m.Complete(),
                                 m.Resume(session_id="s1", received=())],
                         ids=["request", "complete", "resume"])
def test_urgent_only_messages_on_the_background_channel_are_refused(msg: m.Message) -> None:
    """docs/protocol.md 4.1: Request, Resume and Complete belong on the urgent channel only."""
    session = opened()
    with pytest.raises(RemoteProtocolError) as info:
        session.message_received(BACKGROUND, msg, 0.0)
    assert info.value.code == "protocol"
    assert not session.complete and session.next_urgent() is None


def test_ack_on_the_urgent_channel_is_refused() -> None:
    session = opened()
    with pytest.raises(RemoteProtocolError):
        session.message_received(URGENT, m.Ack(nbytes=PAGE), 0.0)


@pytest.mark.parametrize("received", [((2, (0, 1)),), ((0, (0, 11)),)], ids=["unknown-block", "past-the-end"])
def test_a_resume_for_another_block_list_is_a_session_error(received: tuple) -> None:
    """A destination whose received set does not fit this source's blocks migrated another block
    list: Error(session), which ends its migration, not Error(block), which it would retry."""
    session = opened()
    with pytest.raises(RemoteProtocolError) as info:
        session.message_received(URGENT, m.Resume(session_id="s1", received=received), 0.0)
    assert info.value.code == "session"


def test_abort_stops_serving_and_refuses_the_session_again() -> None:
    session = opened()
    session.message_received(URGENT, m.Request(runs=(run(0, 1, 1),)), 0.0)
    session.abort()
    assert session.next_urgent() is None and session.next_background() is None
    with pytest.raises(RemoteProtocolError) as info:
        session.message_received(URGENT, dest_hello(URGENT), 0.0)
    assert info.value.code == "aborted"


# ------------------------------------------------------------ the one-page urgent path


def test_urgent_page_is_accounted_like_a_request() -> None:
    fast, slow = opened(), opened()
    assert fast.urgent_page(1, 4) is True
    slow.message_received(URGENT, m.Request(runs=(run(1, 4, 1),)), 0.0)
    assert slow.next_urgent() == run(1, 4, 1) and slow.next_urgent() is None
    a, b = fast.statistics(), slow.statistics()
    assert (a.requests, a.request_runs, a.pages_sent_urgent) == (b.requests, b.request_runs, b.pages_sent_urgent)
    assert sweep(fast) == sweep(slow)  # the sweep skips the page sent and starts after it alike


def test_urgent_page_defers_to_what_is_queued_and_checks_the_range() -> None:
    session = opened()
    session.message_received(URGENT, m.Request(runs=(run(0, 1, 2),)), 0.0)
    assert session.urgent_page(0, 5) is False  # a request is queued before it
    assert session.next_urgent() == run(0, 1, 2)
    session.message_received(URGENT, m.Ping(token=3), 0.0)
    assert session.urgent_page(0, 5) is False  # a Pong must go first
    session.messages_to_send()
    with pytest.raises(RemoteProtocolError):
        session.urgent_page(1, 6)
    assert session.urgent_page(1, 5) is True


def test_an_answer_from_outside_is_accounted_as_the_request_and_next_urgent_would() -> None:
    """The C page server's answers: counted as a Request of their runs, the pages sent (the sweep
    skips them), the sweep's cursor after the last."""
    session = opened(sweep_bridge_pages=0)
    record = session.sent_record
    session.answered(0, 2, 3, 2, record, 2 * PAGE)  # a Request of two runs: this one, then ...
    session.answered(1, 4, 1, 0, record, PAGE)
    stats = session.statistics()
    assert (stats.requests, stats.request_runs, stats.pages_sent_urgent, stats.bytes_urgent) == (1, 2, 4, 3 * PAGE)
    assert sweep(session) == [run(1, 5, 1), run(0, 0, 2), run(0, 5, 5), run(1, 0, 4)]


def test_an_answer_read_before_a_resume_is_not_recorded_as_sent() -> None:
    """A copy read before the record changed may be stale: the sweep sends those pages again."""
    session = opened(sweep_bridge_pages=0)
    record = session.sent_record
    session.message_received(URGENT, m.Resume(session_id="s1", received=()), 1.0)
    assert session.sent_record != record
    session.answered(0, 2, 3, 1, record, 3 * PAGE)
    assert session.statistics().pages_sent_urgent == 3
    swept = sweep(session)
    assert sum(r.count for r in swept) == 16 and any(r.block == 0 and r.first <= 2 < r.stop for r in swept)


def test_answers_may_go_on_only_on_a_live_session_with_nothing_queued() -> None:
    session = opened()
    assert session.may_answer_urgent()
    session.message_received(URGENT, m.Ping(token=1), 0.0)  # its Pong is queued
    assert not session.may_answer_urgent()
    session.messages_to_send()
    assert session.may_answer_urgent()
    session.message_received(URGENT, m.Complete(), 0.0)
    assert not session.may_answer_urgent()


def test_the_urgent_run_limit_is_the_configured_one_or_what_fits_a_frame() -> None:
    assert opened(max_run_pages=16).urgent_run_limit(0) == 16
    assert opened().urgent_run_limit(1) == 64
