"""Waiters and RunWaiters: taking by run, dropping by fd, wake ranges each once."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from aiopostcopy.core.ramblock import BlockTable, MappingTable, RAMBlock
from aiopostcopy.core.stats import Counters
from aiopostcopy.core.waiters import RunPiece, RunWaiters, Waiter, Waiters
from aiopostcopy.core.wakeups import Wakeups

PAGE = 4096


def waiter(key: str, page: int, *, block: int = 0, tid: int = 1, base: int = 0x10000) -> Waiter:
    return Waiter(key, block, page, base + page * PAGE, tid, 0.0)


def test_take_pulls_exactly_the_run() -> None:
    waiters = Waiters([PAGE, PAGE])
    for page in (1, 5, 5, 9):
        waiters.add(waiter("a", page))
    waiters.add(waiter("a", 5, block=1))
    assert [w.page for w in waiters.take(0, 4, 6)] == [5, 5, 9]
    assert len(waiters) == 2
    assert waiters.take(0, 4, 6) == []
    assert [w.page for w in waiters.take(0, 0, 100)] == [1]
    assert waiters.has(1, 5, 1) and not waiters.has(1, 6, 10)


def test_add_reports_joined() -> None:
    waiters = Waiters([PAGE])
    assert waiters.add(waiter("a", 3)) is False
    assert waiters.add(waiter("b", 3, tid=2)) is True
    assert waiters.pages(0, 0, 10) == [3]


def test_drop_fd_removes_only_that_fd() -> None:
    waiters = Waiters([PAGE])
    waiters.add(waiter("a", 1))
    waiters.add(waiter("b", 1))
    waiters.add(waiter("a", 2))
    assert {w.page for w in waiters.drop_fd("a")} == {1, 2}
    assert [w.key for w in waiters.take(0, 0, 10)] == ["b"]
    assert len(waiters) == 0


def test_wake_ranges_merge_per_fd_and_wake_each_page_once() -> None:
    waiters = Waiters([PAGE, 2 << 20])
    taken = [waiter("a", 1), waiter("a", 2, tid=7), waiter("a", 2, tid=8), waiter("a", 4),
             waiter("b", 2, base=0x900000), Waiter("b", 1, 0, 0x40000000, 3, 0.0)]
    ranges = waiters.wake_ranges(taken)
    assert ranges == {
        "a": [(0x10000 + PAGE, 2 * PAGE), (0x10000 + 4 * PAGE, PAGE)],
        "b": [(0x900000 + 2 * PAGE, PAGE), (0x40000000, 2 << 20)],
    }


def test_run_waiters_split_and_keep_remainders() -> None:
    runs = RunWaiters(2)
    runs.add(RunPiece("s", 0, 10, 20, 1.0))
    runs.add(RunPiece("t", 0, 15, 16, 2.0))
    taken = runs.take(0, 12, 4)
    assert sorted((p.key, p.start, p.stop) for p in taken) == [("s", 12, 16), ("t", 15, 16)]
    assert sorted((p.start, p.stop) for p in runs.all()) == [(10, 12), (16, 20)]
    assert runs.take(1, 0, 100) == []
    assert runs.drop_key("s") == 2
    assert len(runs) == 0


@settings(max_examples=200)
@given(st.lists(st.one_of(
    st.tuples(st.just("add"), st.sampled_from("abc"), st.integers(0, 40)),
    st.tuples(st.just("take"), st.integers(0, 40), st.integers(1, 10)),
    st.tuples(st.just("drop"), st.sampled_from("abc"), st.just(0)),
), max_size=80))
def test_every_waiter_comes_out_exactly_once(ops: list[tuple]) -> None:
    waiters = Waiters([PAGE])
    added, out = [], []
    for index, (op, a, b) in enumerate(ops):
        if op == "add":
            added.append(Waiter(a, 0, b, b * PAGE, index, 0.0))
            waiters.add(added[-1])
        elif op == "take":
            taken = waiters.take(0, a, b)
            assert all(a <= w.page < a + b for w in taken)
            out.extend(taken)
        else:
            out.extend(waiters.drop_fd(a))
    out.extend(waiters.take(0, 0, 100))
    assert sorted(out) == sorted(added)
    assert len(waiters) == 0


@settings(max_examples=200)
@given(st.lists(st.tuples(st.booleans(), st.integers(0, 50), st.integers(1, 12)), max_size=50))
def test_run_waiters_every_waited_page_answered_once(ops: list[tuple[bool, int, int]]) -> None:
    runs = RunWaiters(1)
    wanted: list[int] = []  # page multiset
    answered: list[int] = []
    for adding, first, count in ops:
        if adding:
            runs.add(RunPiece("s", 0, first, first + count, 0.0))
            wanted.extend(range(first, first + count))
        else:
            for piece in runs.take(0, first, count):
                assert first <= piece.start < piece.stop <= first + count
                answered.extend(range(piece.start, piece.stop))
    for piece in runs.take(0, 0, 100):
        answered.extend(range(piece.start, piece.stop))
    assert sorted(answered) == sorted(wanted)


@settings(max_examples=300)
@given(st.lists(st.one_of(
    st.tuples(st.just("add"), st.sampled_from("st"), st.integers(0, 30), st.sampled_from([1, 1, 1, 2, 5])),
    st.tuples(st.just("take"), st.just(""), st.integers(0, 30), st.sampled_from([1, 1, 3, 40])),
    st.tuples(st.just("drop"), st.sampled_from("st"), st.just(0), st.just(0)),
), max_size=60))
def test_run_waiters_one_page_waits_and_runs_agree_with_a_model(ops: list[tuple]) -> None:
    """One-page waits (kept by page) and longer ones (kept sorted) answered, dropped and listed
    as one multiset of (key, page) would be, whatever the mix."""
    runs = RunWaiters(2)
    model: list[tuple[str, int, int]] = []  # (key, block, page), one per waited page
    for op, key, first, count in ops:
        block = first % 2
        if op == "add":
            runs.add(RunPiece(key, block, first, first + count, 0.0))
            model.extend((key, block, page) for page in range(first, first + count))
        elif op == "take":
            got = [(piece.key, piece.block, page) for piece in runs.take(block, first, count)
                   for page in range(piece.start, piece.stop)]
            expected = [entry for entry in model if entry[1] == block and first <= entry[2] < first + count]
            assert sorted(got) == sorted(expected)
            for entry in expected:
                model.remove(entry)
        else:
            runs.drop_key(key)
            model = [entry for entry in model if entry[0] != key]
        listed = [(piece.key, piece.block, page) for piece in runs.all() for page in range(piece.start, piece.stop)]
        assert sorted(listed) == sorted(model)
    assert len(runs) == len(list(runs.all()))


def test_a_fault_is_recorded_as_the_waiter_the_fields_name() -> None:
    """Wakeups builds its waiters without Waiter's generated __new__ (once per fault): the same
    record all the same, every field in its place."""
    blocks = BlockTable([RAMBlock(name="ram", length=16 * 4096, page_size=4096),
                         RAMBlock(name="huge", length=4 << 21, page_size=2 << 20)])
    wakeups = Wakeups(blocks, Counters(faults_by_block=[0, 0]))
    wakeups.add_fd("k", MappingTable.identity(blocks, [0x10000, 0x4000_0000]), woken_by_copy=False)
    waiter, joined = wakeups.fault("k", 0x4000_0000 + (2 << 21) + 12345, 77, 1.25)
    assert type(waiter) is Waiter and not joined
    assert waiter == Waiter("k", 1, 2, 0x4000_0000 + (2 << 21), 77, 1.25)
    assert waiter._asdict() == {"key": "k", "block": 1, "page": 2, "address": 0x4000_0000 + (2 << 21),
                                "thread_id": 77, "since": 1.25}
