"""Fixtures and hooks shared by every test directory.

Event loops
-----------
pytest-asyncio (strict mode) creates the loop of every ``@pytest.mark.asyncio``
test through the ``pytest_asyncio_loop_factories`` hook implemented here (the
``event_loop_policy`` fixture is deprecated in pytest-asyncio 1.x):

* by default a test runs on one loop, chosen with ``--loop`` (``uvloop``, the
  product's default, or ``asyncio``); ``--loop=all`` runs every asyncio test
  on both;
* a test that must run on both whatever ``--loop`` says asks for them by name:
  ``@pytest.mark.asyncio(loop_factories=["asyncio", "uvloop"])`` (the ids are
  ``[asyncio]`` and ``[uvloop]``).

Loop exceptions
---------------
Every loop made here gets an exception handler that records the context (and
logs it as the default handler would).  A callback that raised, a task whose
exception was never retrieved, a task destroyed while pending: each of them
fails the test that owned the loop, at teardown, with the recorded message.
An error logged and forgotten by the loop is a bug the test would otherwise
never see.
"""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Callable, Iterator

import pytest

try:
    import uvloop
except ImportError:  # pragma: no cover - uvloop is a declared dependency
    uvloop = None  # type: ignore[assignment]

_LOOP_ERRORS: list[str] = []


def _record_loop_error(loop: asyncio.AbstractEventLoop, context: dict) -> None:
    exc = context.get("exception")
    text = str(context.get("message", "")) + (f": {type(exc).__name__}: {exc}" if exc is not None else "")
    for key in ("task", "future", "handle", "protocol", "transport"):
        if key in context:
            text += f" [{key}: {context[key]!r:.300}]"
    _LOOP_ERRORS.append(text)
    loop.default_exception_handler(context)


def _recording(factory: Callable[[], asyncio.AbstractEventLoop]) -> Callable[[], asyncio.AbstractEventLoop]:
    def make() -> asyncio.AbstractEventLoop:
        loop = factory()
        loop.set_exception_handler(_record_loop_error)
        return loop

    make.__name__ = f"recording_{getattr(factory, '__name__', 'loop')}"
    return make


def _factories() -> dict[str, Callable[[], asyncio.AbstractEventLoop]]:
    found = {"asyncio": _recording(asyncio.new_event_loop)}
    if uvloop is not None:
        found["uvloop"] = _recording(uvloop.new_event_loop)
    return found


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--loop", choices=["uvloop", "asyncio", "all"], default="uvloop",
                     help="event loop for asyncio tests that do not name theirs (default: uvloop)")


def pytest_asyncio_loop_factories(config: pytest.Config, item: pytest.Item):
    """Which loops an asyncio test may run on (see the module docstring)."""
    factories = _factories()
    marker = item.get_closest_marker("asyncio")
    if marker is not None and marker.kwargs.get("loop_factories"):
        return factories  # the marker picks among them (a missing one is skipped with a reason)
    wanted = config.getoption("--loop")
    if wanted == "all":
        return factories
    if wanted not in factories:
        wanted = "asyncio"
    return {wanted: factories[wanted]}


@pytest.fixture(autouse=True)
def _fail_on_loop_errors(request: pytest.FixtureRequest) -> Iterator[None]:
    """Fail a test whose event loop called its exception handler (checked after its loop closed)."""
    _LOOP_ERRORS.clear()
    yield
    if request.node.get_closest_marker("asyncio") is not None:
        gc.collect()  # "Task exception was never retrieved" is reported when the task is collected
    errors, _LOOP_ERRORS[:] = list(_LOOP_ERRORS), []
    if errors:
        pytest.fail("the event loop's exception handler was called:\n  " + "\n  ".join(errors), pytrace=False)
