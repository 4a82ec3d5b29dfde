"""README's library example runs as written and migrates every page intact."""

from __future__ import annotations

import asyncio
import mmap
import os
import re
import tempfile
from pathlib import Path

import pytest

from aiopostcopy.tools.pattern import fill, verify_block

README = Path(__file__).resolve().parents[2] / "README.md"


def _example_source() -> str:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README.md has no python example"
    return blocks[0]


@pytest.mark.skipif(not os.path.exists("/dev/userfaultfd") and os.geteuid() != 0, reason="needs userfaultfd access")
def test_readme_example_migrates_every_page(capsys: pytest.CaptureFixture[str]) -> None:
    namespace: dict[str, object] = {}
    exec(compile(_example_source(), "README.md", "exec"), namespace)
    size = 8 << 20
    with tempfile.NamedTemporaryFile(dir="/dev/shm", prefix="apc-readme-") as image:
        image.truncate(size)
        with mmap.mmap(image.fileno(), size) as memory:
            fill(memory, 0, 4096, seed=0, assume_zeroed=True)
        asyncio.run(namespace["migrate"](image.name))  # type: ignore[operator]
        out = capsys.readouterr().out
    assert "complete" in out
    assert f"{size // 4096} / {size // 4096}" in out
    assert namespace["verified_pages"] == size // 4096  # set by the example
