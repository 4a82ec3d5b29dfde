"""docs/protocol.md stays true: its example frames and budgets come from the code."""

from __future__ import annotations

import pathlib
import re

import pytest

from aiopostcopy import messages
from aiopostcopy.messages import LIMITS, MESSAGE_TYPES
from aiopostcopy.transport.wire import Decoder, encode, header_budget

DOC = (pathlib.Path(__file__).parents[2] / "docs" / "protocol.md").read_text()
FRAMES = re.findall(r"```frame\n(.*?)\n(.*?)```", DOC, re.S)


def hexdump(data: bytes) -> str:
    shown = data if len(data) < 64 else data[:48]
    lines = [f"{i:04x}  " + " ".join(f"{b:02x}" for b in shown[i:i + 16]) for i in range(0, len(shown), 16)]
    if len(shown) < len(data):
        lines.append(f"....  ({len(data) - len(shown)} more payload bytes)")
    return "\n".join(lines) + "\n"


def test_the_document_has_examples() -> None:
    assert len(FRAMES) >= 10


@pytest.mark.parametrize(("expr", "dump"), FRAMES, ids=[e.split("(")[0] for e, _ in FRAMES])
def test_example_frame_matches_the_encoder(expr: str, dump: str) -> None:
    msg = eval(expr, vars(messages))  # noqa: S307 - our own document
    data = encode(msg)
    assert dump == hexdump(data)
    decoder = Decoder()
    decoder.receive_data(data)
    assert decoder.next_event() == msg


def test_budgets_in_the_document() -> None:
    sentence = re.search(r"With the limits above: (.*?) bytes\.", DOC, re.S).group(1)
    stated = {}
    for names, number in re.findall(r"([A-Za-z/]+) ([\d ]*\d)", sentence.replace("\n", " ")):
        for name in names.split("/"):
            stated[name] = int(number.replace(" ", ""))
    assert stated == {cls.__name__: header_budget(cls) for cls in MESSAGE_TYPES.values()}


def test_limits_table_in_the_document() -> None:
    for field in LIMITS.__dataclass_fields__:
        assert f"`{field}`" in DOC
    assert "131 072 (2^17)" in DOC and LIMITS.max_resume_runs == 131_072
