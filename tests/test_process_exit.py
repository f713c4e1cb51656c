"""trainer.process_exit: the CLIs' exit keeps what `sys.exit` guarantees."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_exit_process_runs_atexit_flushes_output_and_keeps_the_code(tmp_path):
    marker = tmp_path / "atexit.txt"
    child = (
        "import atexit, gc\n"
        "from trainer.process_exit import exit_process\n"
        f"atexit.register(lambda: open({str(marker)!r}, 'w')\n"
        "                .write(str(gc.get_freeze_count() > 0)))\n"
        "print('last line, not yet flushed', end='')\n"
        "exit_process(3)\n")
    proc = subprocess.run([sys.executable, "-c", child], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 3
    assert proc.stdout == "last line, not yet flushed"
    # The atexit hook ran (Ray's shutdown is one), after the collector was frozen.
    assert marker.read_text() == "True"


def test_the_sweep_cli_exits_through_it_with_its_error_code(tmp_path):
    bad = tmp_path / "search.yaml"
    bad.write_text("sweep:\n  name: x\n  no_such_key: 1\n")
    proc = subprocess.run([sys.executable, "-m", "tuning.sweep", str(bad)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "no_such_key" in proc.stderr and "Traceback" not in proc.stderr
