"""The tools the bench runs beside its own code, installed with apt-get when missing: wrk
for the load (else bench/load.py), and valgrind for bench/instructions.py."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable

from .common import say


def apt_install(package: str, present: Callable[[], object]) -> bool:
    """Install Debian's `package` with apt-get (as root; an index update if the first try
    fails) until `present()` says it is there. False where that cannot be done here."""
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return False
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for step in (
        ["apt-get", "install", "-y", "-q", package],
        ["apt-get", "update", "-q"],
        ["apt-get", "install", "-y", "-q", package],
    ):
        say(f"installing {package}: {' '.join(step)}")
        try:
            subprocess.run(
                step,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                timeout=300,
                env=env,
                stdin=subprocess.DEVNULL,
            )
        except (subprocess.TimeoutExpired, OSError) as e:
            say(f"  failed: {e}")
            continue
        if step[1] == "install" and present():
            return True
    return False


def ensure_wrk(allow_install: bool) -> str | None:
    """wrk's path; installs Debian's package when missing and we may (root, apt-get)."""
    found = shutil.which("wrk")
    if found or not allow_install:
        return found
    if apt_install("wrk", lambda: shutil.which("wrk")):
        return shutil.which("wrk")
    say("could not install wrk; using the Python client (bench/load.py)")
    return None
