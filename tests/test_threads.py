"""OpenMP waiting (dynserve/__init__.py): importing dynserve before torch shortens libgomp's spin
(GOMP_SPINCOUNT) unless the user chose a wait policy or a spin count; a long spin stalls every
parallel region when other processes share the CPU."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

_PROBE = "import dynserve, os, torch; print(os.environ.get('GOMP_SPINCOUNT'), os.environ.get('OMP_WAIT_POLICY'))"


def _probe(**env: str) -> list[str]:
    base = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    r = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, env={**base, **env}, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout.split()


def test_short_spin_by_default():
    spin, policy = _probe()
    assert policy == "None" and 0 < int(spin) < 300000  # libgomp's own default spins 300000 times


@pytest.mark.parametrize("env", [{"GOMP_SPINCOUNT": "123"}, {"OMP_WAIT_POLICY": "ACTIVE"}])
def test_the_users_setting_wins(env):
    spin, policy = _probe(**env)
    assert spin == env.get("GOMP_SPINCOUNT", "None") and policy == env.get("OMP_WAIT_POLICY", "None")
