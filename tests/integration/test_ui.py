"""``stx ui`` as a user meets it: MLflow's UI in headless Chromium on a fresh profile, opened on the link
``stx ui`` prints, shows the runs table sorted by objective with the quality metrics and the swept param
as columns; the same page without stx's view shows none of them (Debian's ``chromium``)."""

import os
import re
import shutil
import signal
import subprocess
import time
import urllib.request

import pytest
from conftest import FAST, STX, free_port, local_uri, run_stx


def rendered(url, profile, width=3000):
    """The page's DOM after its scripts ran, in Chromium with a fresh profile."""
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.fail("STX_INTEGRATION=1 but chromium is not installed: apt-get install -y chromium")
    command = [chromium, "--headless", "--no-sandbox", f"--user-data-dir={profile}", f"--window-size={width},1000",
               "--virtual-time-budget=15000", "--dump-dom", url]
    return subprocess.run(command, capture_output=True, text=True, timeout=180).stdout


def test_stx_ui_opens_the_runs_table_on_what_a_comparison_needs(tmp_path):
    swept = run_stx(tmp_path, "-m", *FAST, "loss.style.score_weight=1e3,1e5")
    assert swept.returncode == 0, swept.stderr
    port = free_port()
    ui = subprocess.Popen([*STX, "ui", "--tracking-uri", local_uri(tmp_path), "--port", str(port)], cwd=tmp_path,
                          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, start_new_session=True)
    try:
        link = re.search(r"(http://127\.0\.0\.1:\d+/#/experiments/\d+/runs\?viewStateShareKey=stx)", ui.stdout.readline())
        assert link, "stx ui printed no link"
        deadline = time.monotonic() + 180  # a loaded 2-core machine takes over 90 s
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).close()
                break
            except OSError:
                assert time.monotonic() < deadline and ui.poll() is None, "the MLflow UI did not start within 180 s"
                time.sleep(0.5)
        view = rendered(link.group(1), tmp_path / "profile")
        plain = rendered(link.group(1).split("?")[0], tmp_path / "fresh profile")
    finally:
        os.killpg(ui.pid, signal.SIGTERM)
        ui.wait(timeout=60)
    assert "Sort: objective" in view and "Sort: Created" in plain  # a fresh profile's default
    for column in ("eval/style_distance", "eval/content_distance", "loss.style.score_weight"):
        assert column in view and column not in plain, column
