"""The client control state machine: every allowed and forbidden transition, both modes."""

from __future__ import annotations

import itertools

import pytest

from aiopostcopy.core.control import (
    CLIENT_SENDS, SERVICE_SENDS, TRANSITIONS, ClientControl, Phase, ServiceControl, Side, version_reject,
)
from aiopostcopy.errors import LocalProtocolError, RemoteProtocolError
from aiopostcopy.messages import (
    PROTOCOL_VERSION, Accept, BlockInfo, Blocks, Bye, ClientHello, ClientMode, ClientRequest, End, Error,
    ErrorCode, Hello, Channel, PageRun, Pages, Placed, Register, Reject, Request, Role,
)

RUN = PageRun(block=0, first=0, count=1)
BLOCKS = Blocks(session_id="s", blocks=(BlockInfo(name="a", length=8192, page_size=4096),
                                       BlockInfo(name="b", length=2 << 20, page_size=2 << 20)))


def sample(kind: type, mode: ClientMode) -> object:
    """A valid message of each kind, fitting the mode."""
    return {
        ClientHello: ClientHello(version=PROTOCOL_VERSION, pid=10, name="c", mode=mode),
        Blocks: BLOCKS,
        Register: Register(mappings=((1 << 30, 8192, 0, 0),) if mode is ClientMode.DELEGATED else ()),
        Accept: Accept(),
        Reject: Reject(code=ErrorCode.MAPPING, text="no"),
        ClientRequest: ClientRequest(runs=(RUN,)),
        Placed: Placed(runs=(RUN,)),
        End: End(complete=True),
        Bye: Bye(),
        Error: Error(code=ErrorCode.PROTOCOL, text="bad"),
        Hello: Hello(version=1, session_id="s", role=Role.SOURCE, channel=Channel.URGENT),
        Request: Request(runs=(RUN,)),
        Pages: Pages(block=0, first=0, count=1),
    }[kind]


HAPPY = [(Side.CLIENT, ClientHello), (Side.SERVICE, Blocks), (Side.CLIENT, Register), (Side.SERVICE, Accept),
         (Side.SERVICE, End), (Side.CLIENT, Bye)]
ORDER = [Phase.CONNECTED, Phase.HELLO, Phase.ADVISE, Phase.LISTEN, Phase.RUNNING, Phase.ENDED, Phase.CLOSED]


def exchange(service: ServiceControl, client: ClientControl, side: Side, msg: object) -> Phase:
    sender, receiver = (service, client) if side is Side.SERVICE else (client, service)
    phase = sender.send(msg)
    assert receiver.receive(msg, nfds=sender.fds_required(msg)) is phase
    return phase


def drive(mode: ClientMode, phase: Phase) -> tuple[ServiceControl, ClientControl]:
    """Both ends, walked along the happy path to ``phase``."""
    service, client = ServiceControl(), ClientControl()
    for side, kind in HAPPY[:ORDER.index(phase)]:
        exchange(service, client, side, sample(kind, mode))
    assert service.phase is client.phase is phase
    return service, client


KINDS = [ClientHello, Blocks, Register, Accept, Reject, ClientRequest, Placed, End, Bye, Error, Hello, Request, Pages]
CASES = list(itertools.product(Side, Phase, KINDS, ClientMode))


def expected(side: Side, phase: Phase, kind: type, mode: ClientMode) -> Phase | None:
    if kind in (ClientRequest, Placed) and mode is ClientMode.DELEGATED:
        return None
    return TRANSITIONS.get((side, phase, kind))


@pytest.mark.parametrize(("side", "phase", "kind", "mode"), CASES,
                         ids=[f"{s.value}-{p.value}-{k.__name__}-{m.value}" for s, p, k, m in CASES])
def test_transition(side: Side, phase: Phase, kind: type, mode: ClientMode) -> None:
    service, client = drive(mode, phase)
    sender, receiver = (service, client) if side is Side.SERVICE else (client, service)
    msg = sample(kind, mode)
    target = expected(side, phase, kind, mode)
    if target is None:
        with pytest.raises(LocalProtocolError):
            sender.send(msg)
        with pytest.raises(RemoteProtocolError):
            receiver.receive(msg)
        assert sender.phase is receiver.phase is phase  # a refused message changes nothing
    else:
        assert exchange(service, client, side, msg) is target
        assert service.phase is client.phase is target


def test_the_table_is_what_the_header_says() -> None:
    allowed = {(s, p, k) for s, p, k, m in CASES if expected(s, p, k, m) is not None}
    assert allowed == set(TRANSITIONS)
    assert CLIENT_SENDS == {ClientHello, Register, ClientRequest, Bye, Error}
    assert SERVICE_SENDS == {Blocks, Reject, Accept, Placed, End, Error}
    assert all(TRANSITIONS[(s, p, Error)] is Phase.CLOSED for s in Side for p in Phase if p is not Phase.CLOSED)


@pytest.mark.parametrize("mode", ClientMode)
def test_mode_is_fixed_by_the_hello(mode: ClientMode) -> None:
    service, client = drive(mode, Phase.HELLO)
    assert service.mode is client.mode is mode
    assert ServiceControl().mode is None


def test_self_served_conversation() -> None:
    service, client = drive(ClientMode.SELF_SERVED, Phase.RUNNING)
    for _ in range(3):
        exchange(service, client, Side.CLIENT, ClientRequest(runs=(RUN,)))
        exchange(service, client, Side.SERVICE, Placed(runs=(RUN,)))
    assert exchange(service, client, Side.SERVICE, End(complete=False)) is Phase.ENDED


@pytest.mark.parametrize(("mode", "mappings"), [
    (ClientMode.DELEGATED, ()), (ClientMode.SELF_SERVED, ((4096, 4096, 0, 0),))])
def test_register_must_fit_the_mode(mode: ClientMode, mappings: tuple) -> None:
    service, client = drive(mode, Phase.ADVISE)
    with pytest.raises(LocalProtocolError) as local:
        client.send(Register(mappings=mappings))
    with pytest.raises(RemoteProtocolError) as remote:
        service.receive(Register(mappings=mappings))
    assert local.value.code == remote.value.code == "mapping"


def test_fd_counts() -> None:
    delegated, _ = drive(ClientMode.DELEGATED, Phase.ADVISE)
    self_served, _ = drive(ClientMode.SELF_SERVED, Phase.ADVISE)
    assert delegated.fds_required(BLOCKS) == 2
    assert delegated.fds_required(sample(Register, ClientMode.DELEGATED)) == 1
    assert self_served.fds_required(sample(Register, ClientMode.SELF_SERVED)) == 0
    assert delegated.fds_required(Accept()) == 0
    with pytest.raises(RemoteProtocolError):
        delegated.receive(sample(Register, ClientMode.DELEGATED), nfds=0)
    assert delegated.phase is Phase.ADVISE
    _, client = drive(ClientMode.DELEGATED, Phase.HELLO)
    with pytest.raises(RemoteProtocolError):
        client.receive(BLOCKS, nfds=1)


def test_version_mismatch_must_be_rejected() -> None:
    old = ClientHello(version=PROTOCOL_VERSION + 1, pid=5, name="old", mode=ClientMode.DELEGATED)
    assert version_reject(sample(ClientHello, ClientMode.DELEGATED)) is None
    answer = version_reject(old)
    assert answer is not None and answer.code is ErrorCode.VERSION
    service, client = ServiceControl(), ClientControl()
    exchange(service, client, Side.CLIENT, old)
    with pytest.raises(LocalProtocolError):
        service.send(BLOCKS)
    with pytest.raises(RemoteProtocolError):
        client.receive(BLOCKS)
    with pytest.raises(LocalProtocolError):
        service.send(Reject(code=ErrorCode.BUSY, text="busy"))
    assert exchange(service, client, Side.SERVICE, answer) is Phase.CLOSED


def test_error_after_a_refused_message_closes() -> None:
    service, client = drive(ClientMode.DELEGATED, Phase.LISTEN)
    with pytest.raises(RemoteProtocolError):
        service.receive(ClientRequest(runs=(RUN,)))
    assert exchange(service, client, Side.SERVICE, Error(code=ErrorCode.PROTOCOL, text="x")) is Phase.CLOSED
    with pytest.raises(LocalProtocolError):
        service.send(Error(code=ErrorCode.PROTOCOL, text="again"))
    assert "closed" in repr(service)
