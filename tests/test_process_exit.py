"""trainer.process_exit: a command's exit keeps what a clean exit does, less the teardown."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent("""
    import atexit, logging, sys, threading, time
    from pathlib import Path
    from trainer.process_exit import exit_after_handlers

    out = Path(sys.argv[1])

    class Loud:
        def __del__(self):  # runs in the interpreter's teardown, if there is one
            print("torn down", flush=True)

    loud = Loud()
    log = logging.getLogger("probe")
    log.addHandler(logging.FileHandler(out / "log.txt"))
    log.warning("logged")  # flushed at once; the handler is closed by logging's hook
    atexit.register(lambda: (out / "handler.txt").write_text("ran"))

    def late():
        time.sleep(0.3)
        (out / "thread.txt").write_text("finished")

    threading.Thread(target=late).start()  # not a daemon: exit waits for it
    sys.stdout.write("buffered line")  # a pipe is block-buffered: still in the buffer
    if sys.argv[2] == "fast":
        exit_after_handlers(3)
    sys.exit(3)
""")


def _run(tmp_path: Path, how: str) -> subprocess.CompletedProcess:
    work = tmp_path / how
    work.mkdir()
    script = tmp_path / "probe.py"
    script.write_text(SCRIPT)
    return subprocess.run([sys.executable, str(script), str(work), how], cwd=ROOT,
                          capture_output=True, text=True, timeout=60,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})


def test_exit_after_handlers_keeps_a_clean_exits_work_and_skips_the_teardown(tmp_path):
    clean, fast = _run(tmp_path, "clean"), _run(tmp_path, "fast")
    for done, how in ((clean, "clean"), (fast, "fast")):
        work = tmp_path / how
        assert done.returncode == 3, done.stderr
        assert done.stdout.startswith("buffered line"), done.stdout
        assert (work / "handler.txt").read_text() == "ran"
        assert (work / "thread.txt").read_text() == "finished"
        assert (work / "log.txt").read_text() == "logged\n"
        assert done.stderr == ""
    # The control shows the teardown does run objects' finalizers on a plain exit ...
    assert "torn down" in clean.stdout
    # ... and the fast exit leaves before it.
    assert "torn down" not in fast.stdout
