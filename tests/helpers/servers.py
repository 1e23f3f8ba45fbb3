"""Processes and small servers the tests start and stop themselves (loopback only)."""

from __future__ import annotations

import asyncio
import subprocess
import threading


def stop_process(proc: subprocess.Popen | None, grace: float = 10.0) -> int | None:
    """Stop a process this test started (SIGTERM, then SIGKILL after `grace` seconds);
    its exit status, or None if there was none."""
    if proc is None:
        return None
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    return proc.returncode


class ThreadedServer:
    """A TCP server on 127.0.0.1 with its own event loop in a thread; subclasses give
    `_handle(reader, writer)`. `stop()` closes it and cancels what it still runs."""

    def __init__(self) -> None:
        self.requests = 0
        self.loop = asyncio.new_event_loop()
        self.server = self.loop.run_until_complete(
            asyncio.start_server(self._handle, "127.0.0.1", 0))
        self.port = self.server.sockets[0].getsockname()[1]
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        async def close():
            self.server.close()
            for t in asyncio.all_tasks():
                if t is not asyncio.current_task():
                    t.cancel()
        asyncio.run_coroutine_threadsafe(close(), self.loop).result(5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
