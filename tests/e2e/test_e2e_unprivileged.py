"""Scenario 13: the demo run by an unprivileged user works with UFFD_USER_MODE_ONLY and says so.

``nobody`` may not open /dev/userfaultfd (root-only) and, with
``vm.unprivileged_userfaultfd=0``, gets a userfaultfd from the system call
only with UFFD_USER_MODE_ONLY.  The demo's faults all come from user space
(``ctypes.memmove`` in the client threads), so it must work and say which
way it opened its userfaultfd.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from e2e_support import HERE

ROOT = os.path.dirname(os.path.dirname(HERE))


def _as_nobody(argv: list[str], timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run([shutil.which("runuser") or "runuser", "-u", "nobody", "--", *argv], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env={"PATH": "/usr/bin:/bin", "HOME": "/tmp", "LANG": "C.UTF-8"})


@pytest.mark.root
@pytest.mark.slow
def test_demo_as_nobody_uses_user_mode_only() -> None:
    if os.geteuid() != 0:
        pytest.skip("switching to user nobody needs root")
    if shutil.which("runuser") is None:
        pytest.skip("runuser (util-linux) is not installed")
    probe = _as_nobody([sys.executable, "-c", "import aiopostcopy.uffd, aiopostcopy.demo"], 30)
    if probe.returncode != 0:
        pytest.skip(f"user nobody cannot run this interpreter/venv ({sys.executable}): "
                    f"{(probe.stderr or probe.stdout).strip().splitlines()[-1:]}; make the venv and its base "
                    f"interpreter world-readable to run this test")
    done = _as_nobody([sys.executable, "-m", "aiopostcopy", "demo", "--size", "16M", "--clients", "2",
                       "--quiet"], 120)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    assert "user-mode-only" in output.lower() or "user_mode_only" in output.lower(), output
    assert "4096/4096 verified" in output, output
