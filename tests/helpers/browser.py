"""A headless Chromium driven over the Chrome DevTools protocol, for the tests of keygate's
usage page: load a URL, type and click as a user, read the DOM, take a screenshot.

Only what those tests need: one page, commands answered in order, events kept. Chromium
(Debian's `chromium`) is started with a profile folder of its own and stopped by its
process id.
"""

from __future__ import annotations

import base64
import itertools
import json
import os
import re
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

from websockets.sync.client import connect

from helpers.servers import stop_process

START_TIMEOUT = 30.0


def chromium_path() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


class Browser:
    def __init__(self, profile: Path) -> None:
        exe = chromium_path()
        if exe is None:
            raise RuntimeError("no chromium on PATH (Debian: apt-get install chromium)")
        profile.mkdir(parents=True, exist_ok=True)
        args = [exe, "--headless=new", "--remote-debugging-port=0", f"--user-data-dir={profile}",
                "--no-first-run", "--no-default-browser-check", "--disable-gpu",
                "--disable-extensions", "--disable-background-networking",
                "--disable-dev-shm-usage", "--window-size=1280,2400", "about:blank"]
        if os.geteuid() == 0:
            args.insert(1, "--no-sandbox")  # Chromium refuses to run as root with it
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     text=True)
        self.port = self._port(profile)
        self.page = self._open_page()
        self._ids = itertools.count(1)
        self.events: list[dict] = []

    def _port(self, profile: Path) -> int:
        # Chromium writes the port it chose into the profile's DevToolsActivePort.
        deadline = time.monotonic() + START_TIMEOUT
        f = profile / "DevToolsActivePort"
        while time.monotonic() < deadline:
            if f.exists():
                first = f.read_text().split("\n", 1)[0].strip()
                if first.isdigit():
                    return int(first)
            if self.proc.poll() is not None:
                raise RuntimeError(f"chromium exited: {self.proc.stderr.read()[-2000:]}")
            time.sleep(0.05)
        raise RuntimeError("chromium did not open its DevTools port")

    def _open_page(self):
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}/json/new?about:blank",
                                     method="PUT")
        with urllib.request.urlopen(req, timeout=10) as resp:
            target = json.loads(resp.read())
        self._connection = connect(target["webSocketDebuggerUrl"], max_size=64 * 1024 * 1024,
                                   open_timeout=10)
        return self._connection.__enter__()

    def send(self, method: str, timeout: float = 30.0, **params) -> dict:
        n = next(self._ids)
        self.page.send(json.dumps({"id": n, "method": method, "params": params}))
        deadline = time.monotonic() + timeout
        while True:
            msg = json.loads(self.page.recv(timeout=max(0.01, deadline - time.monotonic())))
            if msg.get("id") == n:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})
            if "method" in msg:
                self.events.append(msg)

    def evaluate(self, expression: str):
        res = self.send("Runtime.evaluate", expression=expression, returnByValue=True,
                        awaitPromise=True)
        if "exceptionDetails" in res:
            raise RuntimeError(f"{expression}: {res['exceptionDetails']}")
        return res["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 15.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = self.evaluate(expression)
            if value:
                return value
            time.sleep(0.1)
        raise AssertionError(f"timed out waiting for {expression}")

    def navigate(self, url: str) -> None:
        self.send("Page.enable")
        self.send("Page.navigate", url=url)
        self.wait_for("document.readyState === 'complete'")

    def click(self, selector: str) -> None:
        """A left click in the middle of the element, as the mouse does it."""
        box = self.evaluate(
            f"(function(){{var r=document.querySelector({json.dumps(selector)})"
            ".getBoundingClientRect();return [r.x+r.width/2,r.y+r.height/2];})()")
        x, y = box
        for kind in ("mousePressed", "mouseReleased"):
            self.send("Input.dispatchMouseEvent", type=kind, x=x, y=y, button="left",
                      clickCount=1)

    def type_into(self, selector: str, text: str) -> None:
        """Click the field, then type the text, as the keyboard does it."""
        self.click(selector)
        self.send("Input.insertText", text=text)

    def screenshot(self, path: Path) -> None:
        data = self.send("Page.captureScreenshot", format="png", captureBeyondViewport=True)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(data["data"]))

    def urls(self) -> list[str]:
        """Every URL the page requested since Network.enable."""
        out = []
        for e in self.events:
            if e.get("method") == "Network.requestWillBeSent":
                out.append(e["params"]["request"]["url"])
        return out

    def request_headers(self) -> list[dict]:
        return [e["params"]["request"].get("headers", {}) for e in self.events
                if e.get("method") == "Network.requestWillBeSent"]

    def close(self) -> None:
        try:
            self.page.close()
        except Exception:
            pass
        stop_process(self.proc)


def number(text: str) -> float:
    """A number as the page prints it ("1,234")."""
    return float(re.sub(r"[^0-9.\-]", "", text))
