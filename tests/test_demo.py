"""`make demo` end to end: the whole loop runs, narrates real results, and leaves no process
behind, whether it ends by itself or by Ctrl-C."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        bool(os.environ.get("STREAMREC_REDIS_URL") or os.environ.get("STREAMREC_KAFKA_BOOTSTRAP")),
        reason="the demo is checked on its own embedded stack",
    ),
]


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("STREAMREC_")}


def _demo(out: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "streamrec.cli", "--log-level", "WARNING", "demo",
            "--out", str(out), "--port", "0", "--no-linger", *args]


def _ours(tag: Path) -> set[int]:
    """Live processes whose command line, environment or stdout names ``tag`` (the demo's --out):
    its servers, its services and their children."""
    pids = set()
    me, needle = os.getpid(), str(tag).encode()
    for p in os.listdir("/proc"):
        if not p.isdigit() or int(p) == me:
            continue
        try:
            state = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()[0]
            found = any(needle in Path(f"/proc/{p}/{f}").read_bytes()
                        for f in ("cmdline", "environ")) or os.readlink(
                            f"/proc/{p}/fd/1").startswith(str(tag))  # logs under --out
        except OSError:
            continue
        if found and state != "Z":
            pids.add(int(p))
    return pids


def test_demo_runs_the_whole_loop_and_ends_cleanly(tmp_path: Path) -> None:
    out = subprocess.run(
        _demo(tmp_path / "demo", "--history-hours", "0.75", "--live-seconds", "45",
              "--drift-after", "20"),
        env=_env(), capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    text = out.stdout
    # history ingested once, the malformed messages dead-lettered, all of it archived
    m = re.findall(r"consumed ([\d,]+), applied ([\d,]+), duplicates (\d+), dead-lettered (\d+); "
                   r"archiver wrote ([\d,]+)", text)
    assert m, text
    consumed, applied, dups, dead, archived = (int(x.replace(",", "")) for x in m[0])
    assert (dead, dups) == (4, 0) and applied == consumed - 4 == archived > 1000
    # a first model bootstrapped from the archive, then served to the live sessions
    boot = re.search(r"promoted \(bootstrap\)[^\n]*new champion ([^;\s]+)", text)
    assert boot, text
    assert re.search(rf"=> last shown (i\d+, ){{4}}i\d+ \(by {re.escape(boot.group(1))}\)", text)
    assert "the world drifts now" in text
    # the monitor scored the answers: HR@10 before the drift far above chance (10 / 200 items)
    before_hr = float(re.search(r"online HR@10 before the drift: ([\d.]+)", text).group(1))
    assert before_hr > 0.25
    assert re.search(r"online HR@10 at its lowest after the drift \(20s windows\): [\d.]+", text)
    assert "versions promoted: " in text and "stopped cleanly" in text
    png = tmp_path / "demo" / "online_hr.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert not _ours(tmp_path)  # no server or service left running


def test_ctrl_c_stops_everything_without_orphans(tmp_path: Path) -> None:
    proc = subprocess.Popen(_demo(tmp_path / "demo"), env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines = []
    try:
        assert proc.stdout is not None
        for line in proc.stdout:  # Ctrl-C once the services are up and the history flows
            lines.append(line)
            if line.startswith("3. history"):
                break
        time.sleep(1)
        children = _ours(tmp_path) - {proc.pid}
        assert len(children) >= 6, "".join(lines)  # 2 servers + 4 services
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    text = "".join(lines) + rest
    assert proc.returncode == 0, text[-3000:]
    assert "Ctrl-C: stopping" in text and text.rstrip().endswith("stopped cleanly")
    assert not _ours(tmp_path)
