import math
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def run_cli(*argv, cwd=None, expect_ok=True):
    """Run `python <script> ...` from the repository root (or cwd) and return the CompletedProcess."""
    proc = subprocess.run([sys.executable, *argv], cwd=cwd or ROOT, capture_output=True, text=True, timeout=600)
    if expect_ok:
        assert proc.returncode == 0, f"{argv} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def cosine(a, b):
    """Cosine similarity of two plain lists, computed by hand for the loss tests."""
    return sum(x * y for x, y in zip(a, b)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))


@pytest.fixture
def cli():
    return run_cli


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: a learning check that trains for a while; -m 'not slow' skips it")
