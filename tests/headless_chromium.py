"""A page rendered in real headless Chromium, driven through the DevTools protocol.

Only the standard library: Chromium is started with ``--remote-debugging-pipe``,
which speaks the protocol as NUL-terminated JSON messages on file descriptors
3 (commands in) and 4 (replies and events out), so no WebSocket client is
needed. :func:`render` opens a local file, waits for its load event and
returns what a test checks: console messages and exceptions, the network
requests the page made, facts evaluated in the page, a full-page screenshot
and one screenshot per ``<img>``.
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import select
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

#: Names of the Chromium executable, in the order they are looked for.
EXECUTABLES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def find_chromium() -> str | None:
    """The path of a Chromium executable on ``PATH``, or None."""
    for name in EXECUTABLES:
        path = shutil.which(name)
        if path:
            return path
    return None


@dataclass
class Rendering:
    """What the page did and looked like."""

    console: list = field(default_factory=list)      # (level, text)
    exceptions: list = field(default_factory=list)   # text
    log_entries: list = field(default_factory=list)  # (level, source, text, url)
    requests: list = field(default_factory=list)     # URLs the page asked for
    facts: dict = field(default_factory=dict)        # the page's own answers
    screenshot: bytes = b""                          # full page, PNG
    images: list = field(default_factory=list)       # (id, PNG of the element on screen)


class _Pipe:
    """The DevTools protocol over Chromium's debugging pipe."""

    def __init__(self, executable: str, profile: str, width: int, height: int) -> None:
        commands_r, self._commands_w = os.pipe()
        self._replies_r, replies_w = os.pipe()

        def child() -> None:  # fds 3 and 4 in the browser, inherited across exec
            high_r = fcntl.fcntl(commands_r, fcntl.F_DUPFD, 100)
            high_w = fcntl.fcntl(replies_w, fcntl.F_DUPFD, 100)
            os.dup2(high_r, 3)
            os.dup2(high_w, 4)

        self.process = subprocess.Popen(
            [executable, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
             "--no-first-run", "--no-default-browser-check", "--disable-extensions",
             "--remote-debugging-pipe", f"--user-data-dir={profile}",
             f"--window-size={width},{height}", "about:blank"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            preexec_fn=child, close_fds=False)
        os.close(commands_r)
        os.close(replies_w)
        self._buffer = b""
        self._next_id = 0
        self.events: list = []

    def _read_message(self, deadline: float) -> dict:
        while b"\0" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._replies_r], [], [], left)[0]:
                raise TimeoutError("Chromium did not answer in time")
            chunk = os.read(self._replies_r, 1 << 20)
            if not chunk:
                raise RuntimeError("Chromium closed the debugging pipe")
            self._buffer += chunk
        message, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(message)

    def send(self, method: str, params: dict | None = None, session: str | None = None,
             timeout: float = 60.0) -> dict:
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self._commands_w, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            reply = self._read_message(deadline)
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def wait_for(self, method: str, timeout: float = 60.0) -> dict:
        for event in self.events:
            if event.get("method") == method:
                return event
        deadline = time.monotonic() + timeout
        while True:
            event = self._read_message(deadline)
            self.events.append(event)
            if event.get("method") == method:
                return event

    def close(self) -> None:
        try:
            self.send("Browser.close", timeout=10)
        except Exception:
            pass
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        os.close(self._commands_w)
        os.close(self._replies_r)


#: Evaluated in the page once it has loaded: every image's state and place.
_FACTS = """JSON.stringify({
  title: document.title,
  images: Array.from(document.images).map(img => {
    const r = img.getBoundingClientRect();
    return {id: img.closest('figure') ? img.closest('figure').id : '', complete: img.complete,
            naturalWidth: img.naturalWidth, naturalHeight: img.naturalHeight,
            x: r.left + window.scrollX, y: r.top + window.scrollY,
            width: r.width, height: r.height, dataUri: img.src.startsWith('data:image/png')};
  }),
  scripts: document.scripts.length,
  links: document.querySelectorAll('link[href]').length,
  height: document.documentElement.scrollHeight,
  width: document.documentElement.scrollWidth
})"""


def render(path: str | os.PathLike, executable: str, *, width: int = 1280,
           height: int = 900, timeout: float = 60.0) -> Rendering:
    """Open ``path`` in headless Chromium and record what a test needs to check."""
    url = Path(path).resolve().as_uri()
    with tempfile.TemporaryDirectory() as profile:
        pipe = _Pipe(executable, profile, width, height)
        try:
            targets = pipe.send("Target.getTargets", timeout=timeout)["targetInfos"]
            page = next(t for t in targets if t["type"] == "page")
            session = pipe.send("Target.attachToTarget",
                                {"targetId": page["targetId"], "flatten": True})["sessionId"]
            for domain in ("Page", "Runtime", "Log", "Network"):
                pipe.send(f"{domain}.enable", session=session)
            pipe.send("Emulation.setDeviceMetricsOverride",
                      {"width": width, "height": height, "deviceScaleFactor": 1,
                       "mobile": False}, session=session)
            pipe.events.clear()
            pipe.send("Page.navigate", {"url": url}, session=session)
            pipe.wait_for("Page.loadEventFired", timeout=timeout)
            facts = json.loads(pipe.send("Runtime.evaluate", {"expression": _FACTS,
                                                              "returnByValue": True},
                                         session=session)["result"]["value"])
            rendering = Rendering(facts=facts)
            full = {"x": 0, "y": 0, "width": facts["width"], "height": facts["height"],
                    "scale": 1}
            rendering.screenshot = base64.b64decode(pipe.send(
                "Page.captureScreenshot", {"format": "png", "clip": full,
                                           "captureBeyondViewport": True},
                session=session, timeout=timeout)["data"])
            for image in facts["images"]:
                clip = {k: image[k] for k in ("x", "y", "width", "height")} | {"scale": 1}
                png = base64.b64decode(pipe.send(
                    "Page.captureScreenshot", {"format": "png", "clip": clip,
                                               "captureBeyondViewport": True},
                    session=session, timeout=timeout)["data"])
                rendering.images.append((image["id"], png))
        finally:
            pipe.close()
    for event in pipe.events:
        method, params = event.get("method"), event.get("params", {})
        if method == "Runtime.consoleAPICalled":
            text = " ".join(str(a.get("value", a.get("description", "")))
                            for a in params.get("args", []))
            rendering.console.append((params.get("type"), text))
        elif method == "Runtime.exceptionThrown":
            details = params.get("exceptionDetails", {})
            rendering.exceptions.append(details.get("text", "") + " "
                                        + str(details.get("exception", {}).get("description")))
        elif method == "Log.entryAdded":
            entry = params.get("entry", {})
            rendering.log_entries.append((entry.get("level"), entry.get("source"),
                                          entry.get("text"), entry.get("url")))
        elif method == "Network.requestWillBeSent":
            rendering.requests.append(params.get("request", {}).get("url", ""))
    return rendering
