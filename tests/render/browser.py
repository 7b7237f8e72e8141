"""A headless Chromium driven over the DevTools protocol (``--remote-debugging-pipe``).

Only the standard library: Chromium reads commands on fd 3 and writes replies and events on
fd 4, each a JSON message ended by a NUL byte. :func:`load` opens a file in a new page and
returns what a test needs: JavaScript exceptions and console errors, every network request
the page made, values of JavaScript expressions evaluated after load, and a screenshot.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--remote-debugging-pipe",
]


def chromium() -> str | None:
    """The Chromium executable, if one is installed."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


@dataclass
class PageLoad:
    """What happened while a page loaded."""

    errors: list[str] = field(default_factory=list)
    requests: list[str] = field(default_factory=list)
    values: dict[str, Any] = field(default_factory=dict)
    screenshot: bytes = b""


class _Pipe:
    def __init__(self, proc: subprocess.Popen[bytes], write_fd: int, read_fd: int) -> None:
        self.proc, self.write_fd, self.read_fd = proc, write_fd, read_fd
        self.buffer = b""
        self.next_id = 0
        self.events: list[dict[str, Any]] = []

    def send(self, method: str, params: dict[str, Any] | None = None, session: str = "") -> Any:
        self.next_id += 1
        message: dict[str, Any] = {"id": self.next_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self.write_fd, json.dumps(message).encode() + b"\0")
        while True:
            reply = self._read()
            if reply.get("id") == self.next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def _read(self) -> dict[str, Any]:
        while b"\0" not in self.buffer:
            chunk = os.read(self.read_fd, 1 << 20)
            if not chunk:
                raise RuntimeError("chromium closed the DevTools pipe")
            self.buffer += chunk
        raw, _, self.buffer = self.buffer.partition(b"\0")
        message: dict[str, Any] = json.loads(raw)
        return message

    def drain(self, seconds: float) -> None:
        """Collect events for ``seconds`` (until a harmless command comes back after it)."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            self.send("Browser.getVersion")
            time.sleep(0.05)


def _pipe_fds(read_end: int, write_end: int) -> Any:
    """A child setup that puts ``read_end`` on fd 3 and ``write_end`` on fd 4 (the pipe's fds)."""

    def setup() -> None:
        high_r, high_w = os.dup(read_end), os.dup(write_end)  # above 4: no clash in dup2
        os.dup2(high_r, 3)
        os.dup2(high_w, 4)

    return setup


def load(
    path: Path,
    expressions: dict[str, str],
    *,
    width: int = 1280,
    height: int = 2000,
    settle: float = 0.5,
    timeout: float = 60.0,
) -> PageLoad:
    """Open ``path`` in headless Chromium; evaluate ``expressions`` once it has loaded."""
    exe = chromium()
    if exe is None:
        raise RuntimeError("chromium is not installed")
    to_chrome_r, to_chrome_w = os.pipe()
    from_chrome_r, from_chrome_w = os.pipe()
    profile = tempfile.mkdtemp(prefix="routelog-chromium-")
    proc = subprocess.Popen(
        [exe, *FLAGS, f"--user-data-dir={profile}", f"--window-size={width},{height}"],
        pass_fds=(3, 4),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        preexec_fn=_pipe_fds(to_chrome_r, from_chrome_w),
    )
    os.close(to_chrome_r)
    os.close(from_chrome_w)
    pipe = _Pipe(proc, to_chrome_w, from_chrome_r)
    result = PageLoad()
    try:
        target = pipe.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = pipe.send("Target.attachToTarget", {"targetId": target, "flatten": True})[
            "sessionId"
        ]
        for domain in ("Runtime", "Log", "Network", "Page"):
            pipe.send(f"{domain}.enable", session=session)
        pipe.send(
            "Emulation.setDeviceMetricsOverride",
            {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False},
            session=session,
        )
        pipe.send("Page.navigate", {"url": path.resolve().as_uri()}, session=session)
        deadline = time.monotonic() + timeout
        while not any(e.get("method") == "Page.loadEventFired" for e in pipe.events):
            if time.monotonic() > deadline:
                raise RuntimeError(f"{path}: the page did not load in {timeout:.0f} s")
            pipe.drain(0.1)
        pipe.drain(settle)
        for name, expression in expressions.items():
            reply = pipe.send(
                "Runtime.evaluate", {"expression": expression, "returnByValue": True}, session
            )
            if "exceptionDetails" in reply:
                result.errors.append(f"evaluating {name}: {reply['exceptionDetails']}")
            result.values[name] = reply.get("result", {}).get("value")
        shot = pipe.send("Page.captureScreenshot", {"format": "png"}, session=session)
        result.screenshot = base64.b64decode(shot["data"])
        pipe.drain(0.1)
    finally:
        os.close(to_chrome_w)
        os.close(from_chrome_r)
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        shutil.rmtree(profile, ignore_errors=True)
    page_url = path.resolve().as_uri()
    for event in pipe.events:
        method, params = event.get("method"), event.get("params", {})
        if method == "Runtime.exceptionThrown":
            details = params["exceptionDetails"]
            text = details.get("exception", {}).get("description") or details.get("text")
            result.errors.append(f"exception: {text}")
        elif method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
            args = " ".join(str(a.get("value", a.get("description"))) for a in params["args"])
            result.errors.append(f"console.{params['type']}: {args}")
        elif method == "Log.entryAdded" and params["entry"].get("level") == "error":
            result.errors.append(f"log: {params['entry'].get('text')}")
        elif method == "Network.requestWillBeSent":
            url = params["request"]["url"]
            if url != page_url:
                result.requests.append(url)
    return result
