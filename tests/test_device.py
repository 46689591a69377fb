"""The GRPO loop on an emulated GPU (tests/fake_gpu.py), in its own pytest process: registering the device is
process-wide. See tests/emulated_gpu.py for what it covers and what it does not."""
import os
import subprocess
import sys
from pathlib import Path


def test_grpo_runs_on_an_emulated_gpu():
    here = Path(__file__).parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(here.parent), str(here)])}
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(here / "emulated_gpu.py")],
                       capture_output=True, text=True, env=env, cwd=here.parent, timeout=600)
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-2000:]
    assert "5 passed" in r.stdout.splitlines()[-1], r.stdout[-2000:]
