"""The urgent path's shortcuts (a fault read alone, a one-page answer) leave the session exactly
as the general path does: same states, counters, requests, wakes and time-outs."""

from __future__ import annotations

import pytest

from aiopostcopy import messages as m
from aiopostcopy.core import NotifyPlaced, Wake
from aiopostcopy.core.coalesce import Coalescer
from aiopostcopy.core.pages import MISSING, PLACING, REQUESTED, PageStates
from aiopostcopy.errors import InternalError, LocalProtocolError, RemoteProtocolError
from aiopostcopy.transport.wire import encode, encode_client_request, encode_page_request, encode_page_requests

from tests.core.test_session import (BACKGROUND, CLIENT_BASE, OWN_BASE, PAGE, URGENT, open_session, pages,
                                     place_all, requests, run, source_hello)


def test_page_request_frame_is_the_request_encoded() -> None:
    for block, page in [(0, 0), (1, 127), (3, 128), (7, 65535), (2, 65536), (255, (1 << 32) + 5)]:
        assert encode_page_request(block, page) == encode(m.Request(runs=(run(block, page, 1),)))


def test_page_requests_frame_joins_following_pages_into_runs() -> None:
    pages_faulted = [(0, 5), (0, 6), (0, 7), (1, 8), (0, 8), (0, 3), (0, 4), (2, 1 << 40)]
    expected = (run(0, 5, 3), run(1, 8, 1), run(0, 8, 1), run(0, 3, 2), run(2, 1 << 40, 1))
    assert encode_page_requests(pages_faulted) == encode(m.Request(runs=expected))
    assert encode_page_requests([(3, 9)]) == encode_page_request(3, 9)
    assert encode_client_request(pages_faulted) == encode(m.ClientRequest(runs=expected))  # a client's, alike
    with pytest.raises(LocalProtocolError):
        encode_client_request([])


def test_faults_of_one_read_are_requested_at_once_as_one_request() -> None:
    session = open_session(request_timeout=2.0)
    asked = [session.fault_request("c", CLIENT_BASE + 3 * PAGE, 1, 1.0),
             session.fault_request("c", CLIENT_BASE + 4 * PAGE, 2, 1.0, new_request=False),
             session.fault_request("c", CLIENT_BASE + 3 * PAGE + 8, 3, 1.0, new_request=False),  # joins page 11
             session.fault_request("own", OWN_BASE + PAGE, 4, 1.0, new_request=False)]
    assert asked == [(0, 11), (0, 12), None, (0, 1)]
    assert requests(session) == []
    stats = session.statistics()
    assert (stats.faults, stats.faults_joined, stats.pages_requested, stats.requests_sent) == (4, 1, 3, 1)
    session.handle_timer(3.5)  # each page in flight: asked again once overdue
    assert sorted(requests(session), key=lambda r: r.first) == [run(0, 1, 1), run(0, 11, 1), run(0, 12, 1)]


def test_fault_alone_is_requested_at_once_and_accounted() -> None:
    session = open_session(request_timeout=2.0)
    assert session.fault_request("c", CLIENT_BASE + 3 * PAGE + 17, 42, 1.0) == (0, 11)  # "c" maps pages 8..15
    assert requests(session) == []  # the caller sends it: nothing queued behind its back
    stats = session.statistics()
    assert (stats.faults, stats.pages_requested, stats.requests_sent) == (1, 1, 1)
    # the in-flight record works as for a flushed request: re-sent once overdue
    assert session.get_timer() == 3.0
    session.handle_timer(3.5)
    assert requests(session) == [run(0, 11, 1)]


def test_fault_alone_falls_back_when_something_is_queued_or_joined() -> None:
    session = open_session()
    session.fault_received("c", CLIENT_BASE + PAGE, 1, 0.0)  # queued, not flushed
    assert session.fault_request("c", CLIENT_BASE + 2 * PAGE, 2, 0.0) is None
    session.flush(0.0)
    assert requests(session) == [run(0, 9, 2)]  # coalesced with the queued one
    assert session.fault_request("own", OWN_BASE + 9 * PAGE, 3, 0.0) is None  # REQUESTED: it joins
    assert session.statistics().faults_joined == 1


def test_fault_alone_waits_for_a_queued_message_and_the_urgent_channel() -> None:
    session = open_session()
    session.connection_lost(URGENT, 0.0)
    assert session.fault_request("c", CLIENT_BASE, 1, 0.0) is None  # no channel: queued for the pass
    session.message_received(URGENT, source_hello(URGENT), 0.1)  # the Resume is queued first
    session.flush(0.1)
    sent = session.messages_to_send()
    assert [type(msg) for _, msg in sent] == [m.Resume, m.Request]


def test_urgent_page_matches_the_general_answer() -> None:
    fast, slow = open_session(), open_session()
    for session in (fast, slow):
        session.fault_request("c", CLIENT_BASE + 5 * PAGE, 9, 0.0)
    assert fast.urgent_page(0, 13) is True
    plan = fast.wake_plan(0, 13, 1)
    assert plan == (("c", CLIENT_BASE + 5 * PAGE, PAGE),)
    fast.placed(0, 13, 1, 0.5, prewoken=True)
    slow.message_received(URGENT, pages(0, 13, 1), 0.5)
    others = place_all(slow, 0.5)
    assert others == [Wake("c", CLIENT_BASE + 5 * PAGE, PAGE)]
    a, b = fast.statistics(), slow.statistics()
    for name in ("pages_placed", "pages_demand", "pages_background", "pages_duplicate", "woken", "faults"):
        assert getattr(a, name) == getattr(b, name), name
    assert fast.urgent_page(0, 13) is False  # again: a duplicate
    assert fast.statistics().pages_duplicate == 1
    assert fast.urgent_page(0, 6) is True and fast.statistics().pages_background == 1  # nobody asked


def test_copy_target_is_the_one_delegated_fd_waiting() -> None:
    session = open_session()
    session.fault_request("c", CLIENT_BASE + 5 * PAGE, 9, 0.0)
    session.fault_received("c", CLIENT_BASE + 5 * PAGE + 8, 10, 0.0)  # a second thread, same fd and page
    assert session.urgent_page(0, 13) is True
    assert session.copy_target(0, 13) == ("c", CLIENT_BASE + 5 * PAGE)
    session.copied_to_client(0, 13, 0.5)
    stats = session.statistics()
    assert (stats.copies_to_client, stats.woken, stats.wakes, stats.waiting) == (1, 2, 0, 0)
    assert session.commands() == []  # the copy woke them: no Wake
    assert session.copy_target(0, 14) is None  # nobody waits


def test_urgent_page_names_the_copy_target_when_asked() -> None:
    session = open_session()
    session.fault_request("c", CLIENT_BASE + 5 * PAGE, 9, 0.0)
    session.fault_received("own", OWN_BASE + 2 * PAGE, 3, 0.0)  # queued: page 2 stays MISSING with a waiter
    session.fault_received("c", CLIENT_BASE + 6 * PAGE, 4, 0.0)  # queued behind it: MISSING, a client waits
    assert session.urgent_page(0, 13, target=True) == ("c", CLIENT_BASE + 5 * PAGE)  # REQUESTED, one client
    assert session.urgent_page(0, 14, target=True) == ("c", CLIENT_BASE + 6 * PAGE)  # MISSING, one client
    assert session.urgent_page(0, 2, target=True) is True  # the service's own fd: its own mapping
    assert session.urgent_page(0, 3, target=True) is True  # nobody waits
    assert session.urgent_page(0, 13, target=True) is False  # PLACING already
    stats = session.statistics()
    assert (stats.pages_demand, stats.pages_background, stats.pages_duplicate) == (1, 3, 1)


def test_copy_target_is_none_when_another_fd_or_the_service_waits() -> None:
    session = open_session()
    session.fault_request("c", CLIENT_BASE + 5 * PAGE, 9, 0.0)
    session.fault_received("own", OWN_BASE + 13 * PAGE, 3, 0.0)  # the service's own fd, same page
    assert session.copy_target(0, 13) is None
    session.fault_request("own", OWN_BASE + 2 * PAGE, 4, 0.0)  # only the service's own fd
    assert session.copy_target(0, 2) is None


def test_urgent_page_leaves_exceptional_cases_to_the_general_path() -> None:
    session = open_session()
    session.connection_lost(URGENT, 0.0)
    assert session.urgent_page(0, 1) is None
    session.message_received(URGENT, source_hello(URGENT), 0.0)
    session.abort("test", 0.0)
    assert session.urgent_page(0, 1) is None


def test_coalescer_take_page_only_with_nothing_ahead() -> None:
    states = PageStates(8)
    coalescer = Coalescer(max_run_pages=4, max_in_flight_pages=1)
    assert coalescer.take_page(states, 2) and states[2] == REQUESTED and coalescer.in_flight == 1
    assert not coalescer.take_page(states, 3)  # the budget is spent
    coalescer.settle(1)
    coalescer.add(0, 5)
    assert not coalescer.take_page(states, 4) and states[4] == MISSING  # a fault is queued first
    assert not Coalescer(readahead_pages=2).take_page(states, 6)
    assert states[6] == MISSING and states.count(PLACING) == 0


def test_background_channel_unaffected() -> None:
    session = open_session()
    session.message_received(BACKGROUND, pages(0, 0, 4), 0.0)
    assert session.urgent_page(0, 1) is False  # PLACING already: the sweep's copy is placed


# ------------------------------------------------------------------ the request and reply lanes

def test_lane_budget_is_what_fault_request_would_take_at_once() -> None:
    session = open_session(max_in_flight_pages=3)
    assert session.lane_budget() == 3
    session.fault_request("c", CLIENT_BASE, 1, 0.0)
    assert session.lane_budget() == 2
    session.fault_received("c", CLIENT_BASE + PAGE, 2, 0.0)  # queued: faults go through the pass now
    assert session.lane_budget() == 0
    session.flush(0.0)
    assert session.lane_budget() == 0  # its Request is queued: a frame written now would overtake it
    assert requests(session) == [run(0, 9, 1)]
    assert session.lane_budget() == 1
    session.connection_lost(URGENT, 0.0)
    assert session.lane_budget() == 0
    assert open_session(readahead_pages=4).lane_budget() == 0


def test_a_page_placed_through_a_clients_fd_leaves_the_session_as_a_copy_to_that_client() -> None:
    lane, usual = open_session(), open_session()
    for session in (lane, usual):
        session.fault_request("c", CLIENT_BASE + 5 * PAGE, 9, 0.0)
        session.fault_received("c", CLIENT_BASE + 5 * PAGE + 8, 10, 0.0)  # a second thread joins
    assert lane.lane_may_place()
    lane.placed_through(0, 13, "c", CLIENT_BASE + 5 * PAGE, 0.5)
    assert usual.urgent_page(0, 13, target=True) == ("c", CLIENT_BASE + 5 * PAGE)
    usual.copied_to_client(0, 13, 0.5)
    assert lane.commands() == usual.commands() == []  # the copy woke both threads
    a, b = lane.statistics(), usual.statistics()
    for name in ("pages_placed", "pages_demand", "copies_to_client", "woken", "wakes", "waiting", "faults"):
        assert getattr(a, name) == getattr(b, name), name
    assert lane.unplaced_runs(0, 13, 1) == []


def test_a_zero_answer_placed_through_a_clients_fd_counts_as_the_general_zero_does() -> None:
    lane, usual = open_session(), open_session()
    for session in (lane, usual):
        session.fault_request("c", CLIENT_BASE + 5 * PAGE, 9, 0.0)
        session.fault_request("own", OWN_BASE + 2 * PAGE, 10, 0.0)
    lane.placed_through(0, 13, "c", CLIENT_BASE + 5 * PAGE, 0.5, zero=True)
    lane.placed_through(0, 2, "own", OWN_BASE + 2 * PAGE, 0.5, zero=True)
    usual.message_received(URGENT, m.Zero(block=0, first=13, count=1), 0.5)
    usual.message_received(URGENT, m.Zero(block=0, first=2, count=1), 0.5)
    place_all(usual, 0.5)
    a, b = lane.statistics(), usual.statistics()
    assert (a.pages_zero, a.pages_demand) == (2, 0)
    for name in ("pages_placed", "pages_zero", "pages_demand", "pages_background", "woken", "waiting", "faults"):
        assert getattr(a, name) == getattr(b, name), name
    assert lane.unplaced_runs(0, 0, 16) == usual.unplaced_runs(0, 0, 16)


def test_other_waiters_of_a_page_placed_through_one_fd_are_woken() -> None:
    session = open_session()
    session.fault_request("own", OWN_BASE + 13 * PAGE, 1, 0.0)
    session.fault_received("c", CLIENT_BASE + 5 * PAGE, 2, 0.0)  # the client's thread joins
    session.fault_received("own", OWN_BASE + 13 * PAGE + 64, 3, 0.0)  # and a second one of ours
    session.placed_through(0, 13, "own", OWN_BASE + 13 * PAGE, 0.5)  # the copy woke our two threads
    assert session.commands() == [Wake("c", CLIENT_BASE + 5 * PAGE, PAGE)]
    stats = session.statistics()
    assert (stats.woken, stats.waiting, stats.copies_to_client) == (3, 0, 0)
    session2 = open_session()
    session2.fault_request("c", CLIENT_BASE + 5 * PAGE, 1, 0.0)
    session2.fault_received("own", OWN_BASE + 13 * PAGE, 2, 0.0)
    session2.placed_through(0, 13, "c", CLIENT_BASE + 5 * PAGE, 0.5)  # through the client: ours needs a Wake
    assert session2.commands() == [Wake("own", OWN_BASE + 13 * PAGE, PAGE)]
    assert session2.statistics().copies_to_client == 1


def test_the_reply_lane_may_place_only_where_urgent_page_would_take_the_page() -> None:
    session = open_session()
    session.fault_request("c", CLIENT_BASE + 5 * PAGE, 9, 0.0)
    session.message_received(BACKGROUND, pages(0, 13, 1), 0.1)  # the sweep's copy is placing
    session.message_received(URGENT, m.Discard(block=0, first=13, count=1), 0.2)  # a Discard waits on it
    assert not session.lane_may_place()
    with pytest.raises(InternalError):
        session.placed_through(0, 13, "c", CLIENT_BASE + 5 * PAGE, 0.5)  # not REQUESTED any more
    place_all(session, 0.6)
    assert session.lane_may_place()
    session.abort("test", 0.7)
    assert not session.lane_may_place()


# ------------------------------------------------------------------ a self-served client's fault


def test_a_self_served_fault_is_requested_at_once_and_notified_when_placed() -> None:
    session = open_session(request_timeout=2.0)
    session.add_self_served("s")
    assert session.client_fault_request("s", [(0, 5, 1)], 1.0) == [(0, 5)]
    assert requests(session) == [] and session.commands() == [] and not session.pass_due
    stats = session.statistics()
    assert (stats.client_requests, stats.pages_requested, stats.requests_sent) == (1, 1, 1)
    assert session.unplaced_runs(0, 5, 1) == [(5, 6)]  # REQUESTED: not placed, not placing
    session.message_received(URGENT, pages(0, 5, 1), 1.5)
    assert place_all(session, 1.5) == [NotifyPlaced("s", (run(0, 5, 1),))]
    assert session.statistics().pages_demand == 1


def test_a_self_served_fault_is_re_requested_once_overdue() -> None:
    session = open_session(request_timeout=2.0)
    session.add_self_served("s")
    assert session.client_fault_request("s", [(0, 5, 1)], 1.0) == [(0, 5)]
    assert session.get_timer() == 3.0
    session.handle_timer(3.5)
    assert requests(session) == [run(0, 5, 1)]


def test_a_self_served_fault_goes_the_general_way_when_it_cannot_be_asked_at_once() -> None:
    session = open_session()
    session.add_self_served("s")
    session.add_self_served("t")
    session.message_received(BACKGROUND, pages(0, 0, 2), 0.0)
    place_all(session, 0.0)
    assert session.client_fault_request("s", [(0, 1, 1)], 0.0) == []  # placed: answered at once
    assert session.commands() == [NotifyPlaced("s", (run(0, 1, 1),))] and not session.pass_due
    assert session.client_fault_request("s", [(0, 4, 3)], 0.0) == []  # a run of several pages: the pass asks
    assert session.pass_due
    session.flush(0.0)
    assert requests(session) == [run(0, 4, 3)]
    assert session.client_fault_request("t", [(0, 5, 1)], 0.0) == []  # REQUESTED: it joins, nothing queued
    assert not session.pass_due and session.commands() == []
    session.message_received(URGENT, pages(0, 4, 3), 0.1)
    assert sorted(place_all(session, 0.1), key=lambda c: c.key) == [NotifyPlaced("s", (run(0, 4, 3),)),
                                                                    NotifyPlaced("t", (run(0, 5, 1),))]
    session.fault_received("c", CLIENT_BASE, 1, 0.2)  # a fault queued ahead: the client's page waits behind it
    assert session.client_fault_request("s", [(0, 12, 1)], 0.2) == [] and session.pass_due
    session.flush(0.2)
    assert requests(session) == [run(0, 8, 1), run(0, 12, 1)]


def test_a_self_served_fault_waits_for_the_urgent_channel_and_the_budget() -> None:
    session = open_session(max_in_flight_pages=1)
    session.add_self_served("s")
    assert session.client_fault_request("s", [(0, 1, 1)], 0.0) == [(0, 1)]
    assert session.client_fault_request("s", [(0, 2, 1)], 0.0) == []  # the budget is spent: queued
    session.message_received(URGENT, pages(0, 1, 1), 0.1)
    place_all(session, 0.1)
    session.flush(0.1)
    assert requests(session) == [run(0, 2, 1)]  # the queued page, once the budget had room
    session.connection_lost(URGENT, 0.2)
    assert session.client_fault_request("s", [(0, 3, 1)], 0.2) == [] and session.pass_due  # no channel: queued


def test_a_self_served_fault_out_of_range_or_from_a_delegated_key_is_refused() -> None:
    session = open_session()
    session.add_self_served("s")
    with pytest.raises(RemoteProtocolError):
        session.client_fault_request("s", [(0, 15, 2)], 0.0)
    with pytest.raises(RemoteProtocolError):
        session.client_fault_request("s", [(7, 0, 1)], 0.0)
    with pytest.raises(RemoteProtocolError):  # a bad run after good ones: none of them is recorded
        session.client_fault_request("s", [(0, 1, 1), (0, 2, 1), (0, 16, 1)], 0.0)
    with pytest.raises(LocalProtocolError):
        session.client_fault_request("c", [(0, 1, 1)], 0.0)
    assert session.unplaced_runs(0, 0, 16) == [(0, 16)] and not session.pass_due
    stats = session.statistics()
    assert (stats.client_requests, stats.pages_requested, stats.requests_sent) == (0, 0, 0)


def test_the_faults_of_one_client_read_are_asked_in_one_request_the_rest_the_general_way() -> None:
    """A ClientRequest of several runs (the faults of one read of the client's userfaultfd): each
    one-page MISSING run is asked at once, all in one Request; the others go as client_request
    takes them, and every run is answered with its NotifyPlaced."""
    session = open_session(request_timeout=2.0)
    session.add_self_served("s")
    session.message_received(BACKGROUND, pages(0, 0, 2), 0.0)
    place_all(session, 0.0)
    asked = session.client_fault_request("s", [(0, 5, 1), (0, 9, 1), (0, 1, 1), (0, 5, 1), (0, 12, 2)], 1.0)
    assert asked == [(0, 5), (0, 9)]  # page 1 is placed; page 5 again joins; a run of two is queued
    assert session.commands() == [NotifyPlaced("s", (run(0, 1, 1),))]
    stats = session.statistics()
    assert (stats.client_requests, stats.pages_requested, stats.requests_sent) == (5, 2, 1)
    assert session.pass_due
    session.flush(1.0)
    assert requests(session) == [run(0, 12, 2)]
    for first, count in [(5, 1), (9, 1), (12, 2)]:
        session.message_received(URGENT, pages(0, first, count), 1.5)
    notified = place_all(session, 1.5)
    told = sorted((r.block, r.first, r.count) for command in notified if command.key == "s" for r in command.runs)
    assert told == [(0, 5, 1), (0, 9, 1), (0, 12, 2)]  # page 5 asked for twice, told once
    assert session.unplaced_runs(0, 0, 16) == [(2, 5), (6, 9), (10, 12), (14, 16)]


def test_the_pages_of_one_client_placed_together_are_told_in_one_placed() -> None:
    """The reply lane places a batch of answers before the commands are carried out: each
    self-served client gets one NotifyPlaced for its pages of the batch (its runs merged), in
    the place of its first; the Wake of the waiter the copy did not wake follows them."""
    session = open_session(request_timeout=2.0)
    session.add_self_served("s")
    session.add_self_served("t")
    assert session.client_fault_request("s", [(0, 5, 1)], 1.0) == [(0, 5)]
    assert session.client_fault_request("t", [(0, 7, 1)], 1.0) == [(0, 7)]
    assert session.client_fault_request("s", [(0, 6, 1)], 1.0) == [(0, 6)]
    assert session.client_fault_request("s", [(0, 9, 1)], 1.0) == [(0, 9)]
    assert session.fault_request("c", CLIENT_BASE + 3 * PAGE, 11, 1.0) == (0, 11)  # a delegated fd's fault
    session.fault_received("own", OWN_BASE + 11 * PAGE, 12, 1.0)  # joins it: the copy through "c" leaves it a Wake
    for page in (5, 7, 11, 6, 9):
        fd, base = ("c", CLIENT_BASE - 8 * PAGE) if page == 11 else ("own", OWN_BASE)
        session.placed_through(0, page, fd, base + page * PAGE, 1.5)
    commands = session.commands()
    assert commands == [NotifyPlaced("s", (run(0, 5, 2), run(0, 9, 1))),  # pages 5, 6 and 9, at the first's place
                        NotifyPlaced("t", (run(0, 7, 1),)),
                        Wake("own", OWN_BASE + 11 * PAGE, PAGE)]
    stats = session.statistics()
    assert (stats.pages_demand, stats.woken) == (5, 2)


def test_one_notification_per_client_is_handed_out_as_it_was() -> None:
    session = open_session(request_timeout=2.0)
    session.add_self_served("s")
    session.add_self_served("t")
    for key, page in (("s", 5), ("t", 7)):
        assert session.client_fault_request(key, [(0, page, 1)], 1.0) == [(0, page)]
    for page in (5, 7):
        session.placed_through(0, page, "own", OWN_BASE + page * PAGE, 1.5)
    assert session.commands() == [NotifyPlaced("s", (run(0, 5, 1),)), NotifyPlaced("t", (run(0, 7, 1),))]
