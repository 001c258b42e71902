"""exclusive_chart() under `flock .cache/localcluster/chart.lock pytest ...`: the lock a parent holds is
recognised (taking it again through a new open file would wait on ourselves until the timeout)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.cluster import ROOT

pytestmark = pytest.mark.integration
PROBE = f"import sys; sys.path.insert(0, {str(ROOT)!r}); from pathlib import Path; " \
        "from tests.support.cluster import _held_by_an_ancestor as h; print(h(Path(sys.argv[1])))"


def test_a_lock_held_by_a_parent_is_seen_and_one_held_by_nobody_is_not(tmp_path: Path) -> None:
    lock = tmp_path / "chart.lock"
    lock.write_text("")
    under = subprocess.run(["flock", str(lock), sys.executable, "-c", PROBE, str(lock)], capture_output=True, text=True)
    alone = subprocess.run([sys.executable, "-c", PROBE, str(lock)], capture_output=True, text=True)
    assert (under.stdout.strip(), alone.stdout.strip()) == ("True", "False"), (under, alone)
