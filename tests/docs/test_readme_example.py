"""README's library example runs as written and migrates every page intact.

The example is saved as a file and run as ``python example.py``, exactly as the
README says; it checks every page of the destination against the source file
itself and prints how many were identical.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[2] / "README.md"


def _example_source() -> str:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README.md has no python example"
    return blocks[0]


@pytest.mark.skipif(not os.path.exists("/dev/userfaultfd") and os.geteuid() != 0, reason="needs userfaultfd access")
def test_readme_example_runs_as_written(tmp_path: Path) -> None:
    script = tmp_path / "example.py"
    script.write_text(_example_source())
    before = {n for n in os.listdir("/dev/shm") if n.startswith("aiopostcopy-example-")}
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    pages = (8 << 20) // 4096
    assert "complete" in done.stdout
    assert f"{pages} / {pages} pages identical to the source" in done.stdout, done.stdout
    after = {n for n in os.listdir("/dev/shm") if n.startswith("aiopostcopy-example-")}
    assert after <= before, "the example left its image behind"


def _readme_commands() -> list[list[str]]:
    """README's ``python -m aiopostcopy source|dest`` commands (continuation lines joined)."""
    text = README.read_text().replace("\\\n", " ")
    return [line.split()[3:] for line in text.splitlines()
            if line.startswith("    python -m aiopostcopy source") or line.startswith("    python -m aiopostcopy dest")]


@pytest.mark.skipif(not os.path.exists("/dev/userfaultfd") and os.geteuid() != 0, reason="needs userfaultfd access")
def test_readme_commands_migrate_every_page(tmp_path: Path) -> None:
    """The two commands as written, their placeholders (image, port, paths) made private to this run."""
    import mmap
    import socket
    import uuid

    from aiopostcopy.tools.pattern import fill, verify_block

    commands = _readme_commands()
    assert [c[0] for c in commands] == ["source", "dest"], commands
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    unique = uuid.uuid4().hex[:8]
    image, block_dir = f"/dev/shm/apc-readme-{unique}.img", f"/dev/shm/apc-readme-{unique}/vm1"
    places = {"/path/to/ram.img": image, ":4444": f":{port}", "/dev/shm/vm1": block_dir,
              "/run/vm1-postcopy.sock": str(tmp_path / "clients.sock"), "report.json": str(tmp_path / "report.json")}

    def private(argv: list[str]) -> list[str]:
        out = []
        for arg in argv:
            for placeholder, value in places.items():
                arg = arg.replace(placeholder, value)
            out.append(arg)
        return [sys.executable, "-m", "aiopostcopy", *out]

    size = 4 << 20
    with open(image, "w+b") as f:
        f.truncate(size)
        with mmap.mmap(f.fileno(), size) as memory:
            fill(memory, 0, 4096, seed=5, assume_zeroed=True)
    source = subprocess.Popen(private(commands[0]), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert "listening on" in source.stdout.readline()
        dest = subprocess.run(private(commands[1]), capture_output=True, text=True, timeout=120)
        source_out, source_err = source.communicate(timeout=60)
        assert dest.returncode == 0, dest.stderr
        assert source.returncode == 0, source_err
        with open(f"{block_dir}/ram", "rb") as f, mmap.mmap(f.fileno(), size, prot=mmap.PROT_READ) as memory:
            assert verify_block(memory, 0, 4096, seed=5) == []
    finally:
        if source.poll() is None:
            source.kill()
            source.wait()
        os.unlink(image)
        if os.path.exists(block_dir):
            for name in os.listdir(block_dir):
                os.unlink(os.path.join(block_dir, name))
            os.rmdir(block_dir)
        if os.path.exists(os.path.dirname(block_dir)):
            os.rmdir(os.path.dirname(block_dir))
