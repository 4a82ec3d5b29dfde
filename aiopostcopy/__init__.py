"""aiopostcopy: a postcopy page-fault service for Linux on asyncio.

The public names for orchestrators: run a :class:`PostcopySource` where the
memory is, a :class:`PostcopyDestination` where the workload runs, and let
client processes join the destination with :class:`aiopostcopy.client.Client`.

Names are imported lazily, so ``import aiopostcopy.core`` (pure logic) does not
load the userfaultfd binding or asyncio.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "ClientMode": "aiopostcopy.messages",
    "ClosedError": "aiopostcopy.errors",
    "DestinationConfig": "aiopostcopy.core.config",
    "DestinationOptions": "aiopostcopy.loop",
    "DestinationReport": "aiopostcopy.destination.report",
    "MigrationAborted": "aiopostcopy.errors",
    "PostcopyDestination": "aiopostcopy.loop",
    "PostcopyError": "aiopostcopy.errors",
    "PostcopySource": "aiopostcopy.source",
    "ProtocolError": "aiopostcopy.errors",
    "RemoteProtocolError": "aiopostcopy.errors",
    "SourceBlock": "aiopostcopy.source",
    "SourceConfig": "aiopostcopy.core.config",
    "SourceLostError": "aiopostcopy.errors",
    "SourceReport": "aiopostcopy.source",
    "UffdError": "aiopostcopy.errors",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'aiopostcopy' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    return __all__
