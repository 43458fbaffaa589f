"""The soak with chaos, short: two replicas, Redis restarts, a SIGKILL, faults and hang-ups,
checked by its invariants (the long run: `python -m tests.perf.soak --seconds 600`)."""

from __future__ import annotations

import subprocess
import sys

import pytest


@pytest.mark.timeout(240)
def test_a_short_soak_with_chaos_keeps_every_invariant() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "tests.perf.soak", "--seconds", "12", "--rate", "10"],
        capture_output=True,
        text=True,
        timeout=230,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "violations                                          0" in done.stdout
    assert "faults: replica killed with SIGKILL" in done.stdout
