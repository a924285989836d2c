"""What users see, in headless Chromium on a fresh profile (Debian's ``chromium``, driven by
:mod:`browser`): ``stx ui``'s link opens MLflow's runs table sorted by objective with the quality
metrics and the swept param as columns (the same page without stx's view shows none of them), and a
run's page its output image; and
``stx serve``'s page stylises a photo picked in its form, with ``/docs`` working offline."""

import os
import re
import signal
import subprocess
import time
import urllib.request
from contextlib import contextmanager

from integration.browser import Chromium
from conftest import CONTENT, FAST, STX, client_for, free_port, local_uri, run_stx

from stx.fast import export
from stx.fast.transformer import TransformerNet


@contextmanager
def started(command, port, cwd):
    """``stx <command>`` in its own process group until its /health answers (a loaded 2-core machine
    takes over 90 s to start MLflow's UI); yields its process, whose first line of output is unread."""
    process = subprocess.Popen([*STX, *command, "--port", str(port)], cwd=cwd, stdout=subprocess.PIPE,
                               stderr=subprocess.DEVNULL, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).close()
                break
            except OSError:
                assert time.monotonic() < deadline and process.poll() is None, f"stx {command[0]} did not start"
                time.sleep(0.5)
        yield process
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=60)


def shown(browser):
    return browser.evaluate("document.body.innerText")


ROWS = "document.querySelectorAll('.ag-row').length"
COLUMNS = "[...document.querySelectorAll('.ag-header-cell')].map(cell => cell.getAttribute('col-id')).join(',')"
"""The runs table's rows, and its columns' ids (``metrics.`objective```, ``params.`seed```)."""


def test_stx_ui_opens_the_runs_table_on_what_a_comparison_needs(tmp_path):
    swept = run_stx(tmp_path, "-m", *FAST, "loss.style.score_weight=1e3,1e5")
    assert swept.returncode == 0, swept.stderr
    port = free_port()
    with started(["ui", "--tracking-uri", local_uri(tmp_path)], port, tmp_path) as ui:
        link = re.search(r"(http://127\.0\.0\.1:\d+/#/experiments/(\d+)/runs\?viewStateShareKey=stx&workflowType=machine_learning)", ui.stdout.readline())
        assert link, "stx ui printed no link"
        experiment = link.group(2)
        with Chromium(tmp_path / "profile", width=3000) as browser:
            browser.open(link.group(1))
            view = browser.wait_for(f"{ROWS} >= 3 && {COLUMNS}.includes('metrics.`objective`') && {COLUMNS}")
            assert "Sort: objective" in shown(browser)
        with Chromium(tmp_path / "another profile", width=3000) as browser:
            browser.open(link.group(1).split("?")[0])
            plain = browser.wait_for(f"{ROWS} >= 3 && {COLUMNS}.includes('duration') && {COLUMNS}")
            assert "Sort: Created" in shown(browser)  # a fresh profile's default
            child = next(run for run in client_for(tmp_path).search_runs([experiment])
                         if "mlflow.parentRunId" in run.data.tags)
            browser.open(link.group(1).split("?")[0] + f"/{child.info.run_id}")  # the run's page shows its output
            assert browser.wait_for("document.querySelector('img[src*=\"get-artifact?path=output.png\"]')?.naturalWidth") > 0
            assert "style distance" in shown(browser)
    for column in ("metrics.`objective`", "metrics.`eval/style_distance`", "metrics.`eval/content_distance`",
                   "params.`loss.style.score_weight`"):
        assert column in view and column not in plain, column


IN_SIGHT = """[...document.querySelectorAll('.ag-header-cell')].filter(cell => {
  const right = document.querySelector('.ag-center-cols-viewport').getBoundingClientRect().right;
  const box = cell.getBoundingClientRect();
  return box.width > 0 && box.right <= Math.min(right, window.innerWidth);
}).map(cell => cell.getAttribute('col-id'))"""
"""The runs table's columns a user sees whole without scrolling."""
OBJECTIVES = """[...document.querySelectorAll('.ag-center-cols-container .ag-row')]
  .sort((a, b) => a.getAttribute('row-index') - b.getAttribute('row-index'))
  .map(row => parseFloat(row.querySelector('[col-id="metrics.`objective`"]').textContent))"""


def test_a_sweeps_link_opens_its_runs_best_first_with_the_objective_and_swept_values_in_sight(tmp_path):
    """The issue's screenshot test: 1600×1000, a fresh profile, the link ``stx ui <sweep>`` prints."""
    assert run_stx(tmp_path, *FAST).returncode == 0  # a run of another sweep… of none: not shown
    swept = run_stx(tmp_path, "-m", *FAST, "loss.style.score_weight=1,5,25", "color=none,luminance")
    assert swept.returncode == 0, swept.stderr
    client = client_for(tmp_path)
    (parent,) = [run for run in client.search_runs(["1"]) if run.data.tags.get("stx.sweep") == "true"]
    port = free_port()
    with started(["ui", parent.info.run_id, "--tracking-uri", local_uri(tmp_path)], port, tmp_path) as ui:
        link = re.search(r"(http://127\.0\.0\.1:\d+/#/experiments/1/runs\?\S+)", ui.stdout.readline()).group(1)
        with Chromium(tmp_path / "profile", width=1600, height=1000) as browser:
            browser.open(link)
            browser.wait_for(f"{ROWS} >= 6 && {COLUMNS}.includes('metrics.`objective`')")
            browser.screenshot(tmp_path / "sweep_view.png")
            # the sweep's runs, not its parent nor the run outside it (each row is split in pinned and centre parts)
            assert browser.evaluate("document.querySelectorAll('.ag-center-cols-container .ag-row').length") == 6
            in_sight = browser.evaluate(IN_SIGHT)
            for column in ("metrics.`objective`", "params.`loss.style.score_weight`", "params.`choice/color`"):
                assert column in in_sight, (column, in_sight)
            objectives = browser.evaluate(OBJECTIVES)
            assert objectives == sorted(objectives) and len(objectives) == 6  # best first
            assert "Model training" in shown(browser) and "Judges" not in shown(browser)  # not the GenAI mode
            browser.evaluate("document.querySelector('.ag-row[row-index=\"0\"] a[href*=\"/runs/\"]').click()")
            assert browser.wait_for("document.querySelector('img[src*=\"get-artifact?path=output.png\"]')?.naturalWidth") > 0


def test_stx_serve_page_stylises_a_photo_and_its_docs_work_offline(tmp_path):
    model = export.export_torchscript(TransformerNet(channels=4, residual_blocks=1), tmp_path / "tiny.pt")
    port = free_port()
    with started(["serve", "--model", f"tiny={model}"], port, tmp_path), Chromium(tmp_path / "profile") as browser:
        browser.open(f"http://127.0.0.1:{port}/")
        browser.choose_file("input[type=file]", CONTENT)
        browser.evaluate("document.querySelector('button').click()")
        width = browser.wait_for("!document.getElementById('download').hidden && document.getElementById('result').naturalWidth")
        assert width > 0 and browser.evaluate("document.getElementById('error').textContent") == ""
        assert browser.evaluate("document.getElementById('download').href").startswith("blob:")
        browser.open(f"http://127.0.0.1:{port}/docs")  # Swagger UI, its scripts served by the service
        docs = browser.wait_for("document.body.innerText.includes('/stylize/{name}') && document.body.innerText")
        assert "/health" in docs
