"""Headless Chromium (Debian's ``chromium``) on a fresh profile, driven over the DevTools protocol
on a pipe (``--remote-debugging-pipe``: JSON messages ended by NUL on file descriptors 3 and 4), so a
test can open a page, fill a form, click and read what the page shows, as a user would."""

from __future__ import annotations

import base64
import json
import os
import select
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest


class Chromium:
    """One browser with one page; use as a context manager."""

    def __init__(self, profile: Path, width: int = 1600, height: int = 1000) -> None:
        program = shutil.which("chromium")
        if program is None:
            pytest.fail("STX_INTEGRATION=1 but chromium is not installed: apt-get install -y chromium")
        commands, self._to_browser = os.pipe()
        self._from_browser, replies = os.pipe()

        def wire() -> None:  # the browser reads commands on fd 3 and writes replies on fd 4
            reading, writing = os.dup2(commands, 100), os.dup2(replies, 101)
            os.dup2(reading, 3)
            os.dup2(writing, 4)

        self.process = subprocess.Popen(
            [program, "--headless", "--no-sandbox", "--remote-debugging-pipe", f"--user-data-dir={profile}",
             f"--window-size={width},{height}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=wire, close_fds=False)
        os.close(commands)
        os.close(replies)
        self._next, self._buffer = 0, b""
        page = next(t for t in self._call("Target.getTargets")["targetInfos"] if t["type"] == "page")
        self._session = self._call("Target.attachToTarget", targetId=page["targetId"], flatten=True)["sessionId"]

    def __enter__(self) -> Chromium:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.process.kill()
        self.process.wait(30)
        os.close(self._to_browser)
        os.close(self._from_browser)

    def _call(self, method: str, session: str | None = None, timeout: float = 60, **params: Any) -> dict:
        self._next += 1
        message = {"id": self._next, "method": method, "params": params, **({"sessionId": session} if session else {})}
        os.write(self._to_browser, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            while b"\0" not in self._buffer:
                if not select.select([self._from_browser], [], [], max(0.0, deadline - time.monotonic()))[0]:
                    raise TimeoutError(f"chromium did not answer {method} within {timeout} s")
                chunk = os.read(self._from_browser, 1 << 20)
                if not chunk:
                    raise EOFError("chromium closed its pipe")
                self._buffer += chunk
            *messages, self._buffer = self._buffer.split(b"\0")
            for reply in map(json.loads, messages):  # events between are not needed
                if reply.get("id") == self._next:
                    if "error" in reply:
                        raise RuntimeError(f"{method}: {reply['error']}")
                    return reply["result"]

    def page(self, method: str, **params: Any) -> dict:
        """A DevTools command to the page (e.g. ``Page.navigate``)."""
        return self._call(method, self._session, **params)

    def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page (promises awaited)."""
        return self.page("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 120) -> Any:
        """Poll until ``expression`` is truthy in the page; return its value."""
        deadline = time.monotonic() + timeout
        while not (value := self.evaluate(expression)):
            if time.monotonic() > deadline:
                raise TimeoutError(f"the page never showed {expression} within {timeout} s")
            time.sleep(0.5)
        return value

    def open(self, url: str) -> None:
        self.page("Page.navigate", url=url)
        self.wait_for("document.readyState === 'complete'")

    def choose_file(self, selector: str, path: Path) -> None:
        """Put ``path`` in the file input ``selector``, as a user picking it would."""
        root = self.page("DOM.getDocument")["root"]["nodeId"]
        node = self.page("DOM.querySelector", nodeId=root, selector=selector)["nodeId"]
        self.page("DOM.setFileInputFiles", nodeId=node, files=[str(path)])

    def screenshot(self, path: Path) -> Path:
        path.write_bytes(base64.b64decode(self.page("Page.captureScreenshot", format="png")["data"]))
        return path
