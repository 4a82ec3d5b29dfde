"""Both sessions through an in-memory pump: wire bytes split, delayed, dropped; channels cut.

Every run ends with the checks of :meth:`core_pump.World.check_final`: every
page placed with the source's current bytes, each page placed once (plus once
per discard), MigrationComplete once, no thread left blocked, no self-served
page left unanswered.  Along the way the world asserts that no page is placed
twice, no page is requested twice while in flight, no NotifyPlaced or Wake
comes before its page is in memory, and no Wake goes to a retired fd.
"""

from __future__ import annotations

import pytest
from core_pump import BLOCKS, PAGE, URGENT, World
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aiopostcopy import messages as m
from aiopostcopy.core import DestinationConfig, SourceConfig

TIGHT_DEST = DestinationConfig(request_timeout=None, max_in_flight_pages=5, max_run_pages=2,
                               readahead_pages=1, ack_bytes=8 * PAGE)
TIMEOUTS = DestinationConfig(request_timeout=0.003, max_in_flight_pages=8, max_run_pages=3,
                             readahead_pages=2, ack_bytes=PAGE)
TIGHT_SOURCE = SourceConfig(max_run_pages=2, background_run_pages=3, background_window_bytes=8 * PAGE)


def live(world: World, steps: int, *, cuts: bool = False, discards: bool = False,
         retire: bool = False) -> World:
    for _ in range(steps):
        world.step(cuts=cuts, discards=discards, retire=retire)
    world.drain()
    world.check_final()
    return world


@pytest.mark.parametrize("seed", range(10))
def test_clean_migration_with_faults_from_every_fd(seed: int) -> None:
    world = live(World(seed), 500)
    stats = world.dest.session.statistics()
    assert stats.faults > 0 and stats.resumes == 0 and stats.pages_discarded == 0


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("loop_sends_resume", [True, False])
def test_cuts_discards_retirement_and_late_placements(seed: int, loop_sends_resume: bool) -> None:
    world = live(World(seed, defer=0.3, loop_sends_resume=loop_sends_resume), 700,
                 cuts=True, discards=True, retire=True)
    # Channels were cut and came back before the end: each return after a loss
    # sent exactly one Resume (the world checks "one per loss" as it goes).
    assert world.resumes_sent > 0
    assert world.dest.session.statistics().resumes == world.resumes_sent


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("dest_config", [TIGHT_DEST, TIMEOUTS], ids=["tight", "timeouts"])
def test_small_windows_budgets_and_re_requests(seed: int, dest_config: DestinationConfig) -> None:
    live(World(seed, defer=0.4, dest_config=dest_config, source_config=TIGHT_SOURCE,
               loop_sends_resume=bool(seed % 2)), 800, cuts=True, discards=True, retire=True)


def test_byte_by_byte_delivery() -> None:
    blocks = (m.BlockInfo(name="small", length=12 * PAGE, page_size=PAGE),
              m.BlockInfo(name="ram1", length=4 * PAGE, page_size=PAGE))
    world = World(7, piece=1, blocks=blocks)
    for _ in range(60):
        world.step(cuts=True, discards=False, retire=False)
    world.drain()
    world.check_final()


def test_threads_stay_blocked_across_a_cut_and_are_answered_after_it() -> None:
    world = World(3, source_config=SourceConfig(background_window_bytes=PAGE, background_run_pages=1))
    blocked_before = 0
    for page in range(0, 90, 7):
        world.dest.touch("own", 0x1000_0000 + page * PAGE)
    world.dest_pass()
    world.deliver_to_source(URGENT, whole=True)  # the requests reach the source ...
    world.cut(URGENT)  # ... and the answers are lost
    world.dest_pass()
    blocked_before = len(world.dest.blocked)
    assert blocked_before > 0
    assert not world.dest.early_wakes
    world.reconnect(URGENT)
    world.drain()
    world.check_final()
    assert world.dest.session.statistics().resumes == 1


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32 - 1), defer=st.sampled_from([0.0, 0.5]),
       resume=st.booleans(), config=st.sampled_from([None, TIGHT_DEST, TIMEOUTS]))
def test_random_interleavings(seed: int, defer: float, resume: bool,
                              config: DestinationConfig | None) -> None:
    live(World(seed, defer=defer, loop_sends_resume=resume, dest_config=config,
               source_config=TIGHT_SOURCE if config else None), 500,
         cuts=True, discards=True, retire=True)


def test_blocks_used_by_the_pump_are_the_documented_ones() -> None:
    assert sum(block.length for block in BLOCKS) // PAGE == 136
