"""SourceSession with holes (a sparse file's, swept as whole Zero runs) and from-copy (Digests held
for the server, the sweep held until the first Resume); the digest helpers."""

from __future__ import annotations

import pytest

from aiopostcopy import messages as m
from aiopostcopy.core import SourceConfig, SourceSession
from aiopostcopy.core.digests import FROM_COPY_FEATURE, changed_bounds, page_digest, zero_digest
from aiopostcopy.errors import RemoteProtocolError

PAGE = 4096
URGENT, BACKGROUND = m.Channel.URGENT, m.Channel.BACKGROUND
BLOCKS = (m.BlockInfo(name="a", length=100 * PAGE, page_size=PAGE),)


def hello(channel: m.Channel, *features: str) -> m.Hello:
    return m.Hello(version=m.PROTOCOL_VERSION, session_id="s", role=m.Role.DESTINATION, channel=channel,
                   features=features)


def opened(*features: str, holes=None, **config: int) -> SourceSession:
    session = SourceSession(blocks=BLOCKS, config=SourceConfig(**config), holes=holes)
    session.message_received(URGENT, hello(URGENT, *features), 0.0)
    session.message_received(BACKGROUND, hello(BACKGROUND, *features), 0.0)
    answers = session.messages_to_send()
    assert all(FROM_COPY_FEATURE in msg.features for _, msg in answers)  # the source can compare
    return session


def sweep(session: SourceSession) -> list[tuple[int, int]]:
    runs = []
    while (run := session.next_background()) is not None:
        session.sent(BACKGROUND, run, 0)
        runs.append((run.first, run.count))
    return runs


def test_holes_go_whole_and_data_runs_stop_where_a_hole_begins() -> None:
    session = opened(holes=[[(0, 30), (34, 90)]], background_run_pages=3)
    assert sweep(session) == [(0, 30), (30, 3), (33, 1), (34, 56), (90, 3), (93, 3), (96, 3), (99, 1)]


def test_a_discard_makes_a_hole_data_again() -> None:
    session = opened(holes=[[(0, 100)]])
    assert sweep(session) == [(0, 100)]
    session.discard(0, 10, 5)
    session.messages_to_send()
    assert sweep(session) == [(10, 5)]  # not a hole any more: read as data (the run length allows 5)


def test_from_copy_holds_the_sweep_until_the_resume_and_queues_digests() -> None:
    session = opened(FROM_COPY_FEATURE)
    assert session.next_background() is None
    digests = m.Digests(block=0, first=5, digests=(1, 2, 3))
    session.message_received(URGENT, digests, 0.0)
    assert session.next_comparison() == digests and session.next_comparison() is None
    session.message_received(URGENT, m.Resume(session_id="s", received=((0, (0, 40)),), pending=()), 0.0)
    assert sweep(session)[0] == (40, 60)
    with pytest.raises(RemoteProtocolError, match="Digests outside"):
        session.message_received(URGENT, digests, 0.0)


def test_digests_without_the_feature_or_out_of_range_are_refused() -> None:
    session = opened()
    with pytest.raises(RemoteProtocolError, match="Digests outside"):
        session.message_received(URGENT, m.Digests(block=0, first=0, digests=(1,)), 0.0)
    session = opened(FROM_COPY_FEATURE)
    with pytest.raises(RemoteProtocolError) as info:
        session.message_received(URGENT, m.Digests(block=0, first=99, digests=(1, 2)), 0.0)
    assert info.value.code == "block"
    with pytest.raises(RemoteProtocolError):
        session.message_received(BACKGROUND, m.Digests(block=0, first=0, digests=(1,)), 0.0)


def test_unanswered_digests_are_forgotten_with_the_urgent_connection() -> None:
    session = opened(FROM_COPY_FEATURE)
    session.message_received(URGENT, m.Digests(block=0, first=0, digests=(1,)), 0.0)
    session.connection_lost(URGENT, 0.0)
    session.message_received(URGENT, hello(URGENT, FROM_COPY_FEATURE), 0.0)
    assert session.next_comparison() is None


def test_digest_helpers() -> None:
    assert zero_digest(PAGE) == page_digest(bytes(PAGE)) == 0xE218CB050E9903AC  # docs/protocol.md 4.10
    assert changed_bounds([1, 2, 3, 4, 5], [1, 0, 0, 4, 0]) == (1, 3, 4, 5)
    assert changed_bounds([1, 2], [1, 2]) == ()
    assert changed_bounds([1, 2], [3, 4]) == (0, 2)
