"""The usage log on disk (docs/usage-log.md): `UsageWriter` appends to it, `read_log` reads it back.

Format: one compact JSON object per line, UTF-8, appended to `usage.jsonl`; size-based
rotation renames `usage.jsonl.(k)` -> `.(k+1)` and `usage.jsonl` -> `usage.jsonl.1`, so a
`tail -F` follower loses nothing and a rotated file never changes again (the ledger's
sidecar relies on that). Every rotated file ends with a whole line.

Rotation deletes the oldest file once `keep` are kept, but it changes no quota: each
rotation is carried out through a `rotate` callback (the ledger's: it counts the files
dropped to their end in its sidecar, deletes them, lets the renames happen and carries the
dropped files' counts forward, all under its lock), so a client that makes the log rotate
fast cannot make keygate forget what a key used.

Failure policy: a log that cannot be written must not take the gateway down, and must not
lose records silently. The writer keeps what it could not write in a bounded in-memory
backlog, says so loudly, retries about every second, and writes the backlog in order once
it can. A line is written whole or not at all: a short write is cut back to the line
boundary before it is retried.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import queue
import re
import stat
import threading
import time
from collections import deque
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any, BinaryIO, Callable

import orjson

from keygate.model.prices import json_with_money, money_text

log = logging.getLogger("keygate")

BACKLOG_LIMIT = 100_000
RETRY_INTERVAL = 1.0
CHECKPOINT_INTERVAL = 10.0
BATCH_BYTES = 1 << 20  # one write() of at most this much (more would only delay a follower)
# After a line arrives, the writer waits this long for more before it writes: under load
# that is one write per batch, and a line still reaches `tail -f` within ~20 ms.
GATHER = 0.02
READ_CHUNK = 4 << 20


# --------------------------------------------------------------------------- file names


def rotated_name(path: Path, k: int) -> Path:
    """`usage.jsonl` -> `usage.jsonl.k`."""
    return path.with_name(f"{path.name}.{k}")


def log_files(path: Path, keep: int | None = None) -> list[Path]:
    """The existing files of the log at `path`, oldest first: `.keep` ... `.1`, then the live file.

    `keep=None` takes every `path.N` present (for readers that do not know the setting).
    """
    path = Path(path)
    if keep is None:
        numbers = []
        try:
            for p in path.parent.iterdir():
                suffix = p.name[len(path.name) + 1:]
                if p.name.startswith(path.name + ".") and suffix.isdigit():
                    numbers.append(int(suffix))
        except OSError:
            numbers = []
        candidates = [rotated_name(path, k) for k in sorted(numbers, reverse=True)]
    else:
        candidates = [rotated_name(path, k) for k in range(keep, 0, -1)]
    return [p for p in candidates + [path] if p.is_file()]


def log_family(path: Path) -> list[Path]:
    """The live logs of `path`'s folder that belong together: `usage.jsonl` and the
    per-worker `usage-<instance>.jsonl` of `keygate serve --workers` beside it
    (docs/shared-state.md), each with its own rotated files (`log_files`). `path` itself
    comes first, present or not."""
    path = Path(path)
    out = [path]
    prefix, suffix = path.stem + "-", path.suffix
    try:
        names = sorted(p.name for p in path.parent.iterdir())
    except OSError:
        return out
    for name in names:
        if name.startswith(prefix) and name.endswith(suffix) and len(name) > len(
                prefix) + len(suffix) and (path.parent / name).is_file():
            out.append(path.with_name(name))
    return out


# --------------------------------------------------------------------------- serialising
#
# orjson writes and reads these lines faster than the json module: a record in ~1 us
# instead of ~12 on a 2-core machine, a big log read back in ~55 % of the time. It writes
# the bytes json.dumps(separators=(",", ":"), ensure_ascii=False) does, but for floats with
# an exponent (1e-7, not 1e-07: the same number) and NaN (null, where json writes invalid
# JSON). Where the two read a line differently the json module decides, so a line means
# what it always meant: orjson refuses what it cannot do (a lone surrogate, an integer
# beyond 64 bits, NaN and Infinity) and the json module then takes that line.


# Characters JSON may leave raw that are not safe raw in a file people `tail -f` in a
# terminal or split into lines: DEL, the C1 controls (U+009B is a CSI to some terminals),
# the Unicode line and paragraph separators, and the bidi controls. Clients choose some of
# a line's strings (the model name): these are written as \uXXXX escapes instead.
_UNSAFE = re.compile("[\x7f-\x9f\u2028\u2029\u200e\u200f\u061c\u202a-\u202e\u2066-\u2069]")


def _escape(m: re.Match) -> str:
    return f"\\u{ord(m.group()):04x}"


def _default(value: Any) -> Any:
    """What orjson writes for a value it does not know: a Decimal (a cost) as the number
    with its exact digits (docs/usage-log.md#cost), anything else as text."""
    if type(value) is Decimal and value.is_finite():
        return orjson.Fragment(money_text(value))
    return str(value)


def encode(record: dict) -> bytes:
    """One log line. Never fails on an odd value: a Decimal is written as a number with
    its exact digits, anything else orjson does not know as text (a Path, an object);
    lone surrogates become JSON `\\udcXX` escapes, and the characters of _UNSAFE
    `\\uXXXX` escapes (a line of ASCII, nearly all of them, is not looked at)."""
    try:
        line = orjson.dumps(record, default=_default, option=orjson.OPT_APPEND_NEWLINE)
    except TypeError:  # (orjson.JSONEncodeError is one)
        text = json_with_money(record, separators=(",", ":"), ensure_ascii=False,
                               default=str)
        line = text.encode("utf-8", "backslashreplace") + b"\n"
    if line.isascii() and b"\x7f" not in line:  # (DEL is ASCII, and unsafe)
        return line
    text = line.decode("utf-8", "surrogateescape")
    if _UNSAFE.search(text) is None:
        return line
    return _UNSAFE.sub(_escape, text).encode("utf-8", "surrogateescape")


# --------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class ReadResult:
    end: int  # offset just after the last complete line ("\n") read
    bad: int  # complete lines that are not a JSON object (blank lines are not counted)
    trailing: bytes  # bytes after `end`: an unterminated (possibly torn) last line


def parse_line(line: bytes) -> dict | None:
    """The record on one line, or None. The definition every reader follows: a line counts
    iff it is valid UTF-8 and `json.loads` makes a dict of it (nested too deep for it is
    garbage too). A numeric `cost` comes back as the Decimal the line spells (exact_cost)."""
    try:
        obj = json.loads(line.decode("utf-8"))
    except (ValueError, RecursionError):  # (UnicodeDecodeError is a ValueError)
        return None
    if type(obj) is not dict:
        return None
    if type(obj.get("cost")) is float:
        obj["cost"] = exact_cost(line, obj["cost"])
    return obj


# A cost is money: a reader takes its digits from the line, not the nearest float, so that
# a sum of a million lines is the sum of what they say (docs/usage-log.md#cost).
_COST_DIGITS = re.compile(rb"[ \t]*(-?[0-9]+(?:\.[0-9]+)?(?:[eE][-+]?[0-9]+)?)")


def exact_cost(line: bytes, value: float) -> Decimal:
    """The `cost` of a record as the digits its line holds, where a JSON parser read a
    float `value`: those after the line's last `"cost":` (a string cannot hold that
    sequence unescaped), where they end the line or else match `value`; failing that, the
    float's own shortest digits."""
    at = line.rfind(b'"cost":')
    if at >= 0:
        if line[-1] == 0x7D:
            # keygate writes cost last. In a valid JSON line that ends with `"cost":` and
            # a number, then "}", that member is the outer object's own: its digits.
            try:
                return Decimal(line[at + 7:-1].decode())
            except (ArithmeticError, ValueError):
                pass
        m = _COST_DIGITS.match(line, at + 7)
        if m is not None and float(m[1]) == value:  # (both correctly rounded: one number)
            return Decimal(m[1].decode())
    return Decimal(repr(value))


# orjson reads an integer beyond 64 bits as a float; the json module keeps it an int. Such
# a number has at least 19 digits: lines with a run that long are left to the json module.
# (Found with a byte search over the digits folded to "0": faster than a regex.)
_FOLD_DIGITS = bytes.maketrans(b"123456789", b"000000000")
_LONG_NUMBER = b"0" * 19


def scan_lines(data: bytes, sink: Callable[..., Any], base: int | None = None) -> int:
    """Feed every line of `data` (complete lines, "\\n"-separated) that holds a JSON
    object to `sink`, in order; return how many non-blank lines did not. Same result as
    `parse_line` on each line, faster. With `base` (where `data` starts in its file), each
    record goes with the byte range of its line in the file: sink(record, start, end)."""
    lines = data.split(b"\n")
    if not lines[-1]:
        lines.pop()  # (after the last "\n")
    folded = data.translate(_FOLD_DIGITS)
    long_at = _next_long(folded, 0)
    loads = orjson.loads
    bad = start = 0
    for line in lines:
        end = start + len(line)
        obj = None
        if long_at >= end:
            try:
                obj = loads(line)
            except orjson.JSONDecodeError:
                pass
        else:
            long_at = _next_long(folded, end)
        at = start
        start = end + 1
        if type(obj) is not dict:
            # Refused, not an object, or a long number: the json module decides.
            obj = parse_line(line)
            if obj is None:
                if line.strip():
                    bad += 1
                continue
        elif type(obj.get("cost")) is float:
            obj["cost"] = exact_cost(line, obj["cost"])
        if base is None:
            sink(obj)
        else:
            sink(obj, base + at, base + start)
    return bad


def _next_long(folded: bytes, start: int) -> int:
    at = folded.find(_LONG_NUMBER, start)
    return at if at >= 0 else len(folded) + 1


def read_log(f: BinaryIO, start: int, sink: Callable[[dict], Any]) -> ReadResult:
    """Read an open log file from byte `start` to its end, feeding each record on a
    complete line to `sink` in order. The unterminated rest is returned, not parsed."""
    f.seek(start)
    pos, bad, rest = start, 0, b""
    while True:
        chunk = f.read(READ_CHUNK)
        if not chunk:
            break
        buf = rest + chunk if rest else chunk
        cut = buf.rfind(b"\n") + 1
        if cut:
            bad += scan_lines(buf[:cut], sink)
            pos += cut
        rest = buf[cut:]
    return ReadResult(end=pos, bad=bad, trailing=rest)


def read_records(path: Path, sink: Callable[[dict], Any]) -> int:
    """Feed every record of one log file to `sink`, a torn last line included if it parses.
    Returns the number of garbage lines skipped. A missing file is empty."""
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        return 0
    with f:
        res = read_log(f, 0, sink)
    if res.trailing.strip():
        obj = parse_line(res.trailing)
        if obj is None:
            return res.bad + 1
        sink(obj)
    return res.bad


# --------------------------------------------------------------------------- writing


@dataclass(frozen=True)
class Target:
    """Where and how to write: the settings `reconfigure` swaps between lines."""

    path: Path
    max_bytes: int
    keep: int


class LogFile:
    """Appends whole lines to the log, rotating by size. Synchronous; used by one thread.

    `append` either writes lines (and pops them from the deque) or raises OSError with the
    file cut back to a line boundary; whatever it did not write stays in the deque.
    """

    def __init__(self, target: Target,
                 rotate: Callable[[list[Path], Callable[[], None]], None] | None = None) -> None:
        self.target = target
        self.rotations = 0
        # Carries out a rotation: deletes the files dropped, then calls the renames (see
        # _rotate). UsageWriter's has the ledger count the dropped files before they go.
        self._rotation = rotate or _plain_rotation
        self._fd: int | None = None
        self._at_boundary = False  # our last write succeeded, so the file ends with "\n"

    def retarget(self, target: Target) -> None:
        if target.path != self.target.path:
            self.close()
        self.target = target

    def close(self) -> None:
        if self._fd is not None:
            try:
                os.close(self._fd)
            except OSError:
                pass
            self._fd = None

    def append(self, lines: deque[bytes], batch_bytes: int = BATCH_BYTES) -> int:
        """Write lines from the left of `lines` until it is empty; return how many."""
        written = 0
        while lines:
            fd, size = self._open()
            if not self._at_boundary and size > 0 and self._torn(fd, size):
                # Ended before our first line, and before a rotation: a rotated file ends
                # with a whole line, so the ledger's count of it covers it to its end.
                self._write(fd, b"\n", size)
                size += 1
            room = self.target.max_bytes - size
            if size > 0 and len(lines[0]) > room:
                self._rotate()
                continue
            # Batch what fits; a single line bigger than max_bytes still goes, alone.
            limit = max(min(batch_bytes, room), len(lines[0]))
            parts, total = [], 0
            for line in lines:
                if total + len(line) > limit:
                    break
                parts.append(line)
                total += len(line)
            self._write(fd, b"".join(parts), size)
            for _ in range(len(parts)):
                lines.popleft()
            written += len(parts)
        return written

    def _open(self) -> tuple[int, int]:
        """The open file at target.path (reopened if the path now names another file)
        and its size."""
        path = self.target.path
        if self._fd is not None:
            try:
                st = os.stat(path)
                fst = os.fstat(self._fd)
                if (st.st_dev, st.st_ino) == (fst.st_dev, fst.st_ino):
                    return self._fd, fst.st_size
            except OSError:
                pass
            self.close()  # moved away, deleted or replaced behind our back
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fst = os.fstat(fd)
            if not stat.S_ISREG(fst.st_mode):
                raise OSError(errno.EINVAL, f"{path} is not a regular file")
        except OSError:
            os.close(fd)
            raise
        self._fd = fd
        self._at_boundary = False
        return fd, fst.st_size

    @staticmethod
    def _torn(fd: int, size: int) -> bool:
        # A file that does not end with "\n" ends with a torn line (a crash, another
        # writer): it gets terminated so our first line is not glued onto it.
        return os.pread(fd, 1, size - 1) != b"\n"

    def _write(self, fd: int, data: bytes, size: int) -> None:
        self._at_boundary = False
        try:
            n = os.write(fd, data)
            if n != len(data):
                raise OSError(errno.ENOSPC, f"short write: {n} of {len(data)} bytes")
        except OSError:
            self._cut_back(fd, size)
            raise
        self._at_boundary = True

    def _cut_back(self, fd: int, size: int) -> None:
        """Undo a partial write so no torn line stays in the file."""
        try:
            if os.fstat(fd).st_size > size:
                os.ftruncate(fd, size)
        except OSError as e:
            # Left torn; `_separator` terminates it before the next line.
            log.error("keygate: usage log: cannot cut back a partial write: %s", e)

    def _rotate(self) -> None:
        """usage.jsonl.(k) -> .(k+1) (dropping beyond keep), usage.jsonl -> .1.

        Renames only: a follower holding the old file reads it to its end, and every
        rotated file keeps its first line, which is how the ledger sidecar knows it. The
        files dropped (the one the renames would replace, and any left from a larger keep)
        are deleted first; `rotate` does both steps, so nothing is dropped uncounted.
        """
        self.close()
        path, keep = self.target.path, self.target.keep
        dropped = []
        k = keep + 1
        while k <= keep + 1000 and rotated_name(path, k).exists():  # left from a larger keep
            dropped.append(rotated_name(path, k))
            k += 1
        if keep == 0:
            dropped.append(path)
        elif rotated_name(path, keep).exists() and (
                keep == 1 or rotated_name(path, keep - 1).exists()):
            dropped.append(rotated_name(path, keep))  # the renames below would replace it

        def renames() -> None:
            if keep > 0:
                for k in range(keep - 1, 0, -1):
                    src = rotated_name(path, k)
                    if src.exists():
                        os.replace(src, rotated_name(path, k + 1))
                os.replace(path, rotated_name(path, 1))

        self._rotation(dropped, renames)
        self.rotations += 1


def _plain_rotation(dropped: list[Path], renames: Callable[[], None]) -> None:
    for p in dropped:
        p.unlink(missing_ok=True)
    renames()


@dataclass(frozen=True)
class _Stop:
    deadline: float


class UsageWriter:
    """Appends usage records to the log from one background thread.

    `write` only enqueues (safe from the event loop and from any thread); the thread
    serialises, batches what is queued into one write, rotates, retries, and calls
    `checkpoint(path, keep)` (the ledger's sidecar hook) after a rotation, every
    `checkpoint_interval` seconds while writing, and on close. Each rotation goes through
    `rotate(path, keep, dropped, renames)`, which must delete `dropped` and call `renames`
    (the ledger's `Ledger.rotate` counts the dropped files to their end first and carries
    their counts forward); without it, the dropped files are deleted after a checkpoint has
    counted them. Nothing here raises into the caller. A record must not be changed after
    it is passed to `write`.
    """

    def __init__(
        self,
        path: Path,
        max_bytes: int,
        keep: int,
        *,
        checkpoint: Callable[[Path, int], None] | None = None,
        rotate: Callable[[Path, int, list[Path], Callable[[], None]], None] | None = None,
        checkpoint_interval: float = CHECKPOINT_INTERVAL,
        retry_interval: float = RETRY_INTERVAL,
        backlog_limit: int = BACKLOG_LIMIT,
        gather: float = GATHER,
    ) -> None:
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._file = LogFile(Target(Path(path), max_bytes, keep), rotate=self._rotation)
        self._checkpoint = checkpoint
        self._rotate = rotate
        self._checkpoint_interval = checkpoint_interval
        self._retry_interval = retry_interval
        self._backlog_limit = backlog_limit
        self._gather = gather
        self._closed = False
        self._warned_closed = False
        # Writer-thread state below.
        self._pending: deque[bytes] = deque()
        self._failing = False
        self._next_try = 0.0
        self._dropped = 0
        self._dirty = False
        self._last_checkpoint = time.monotonic()
        # Read by keygate's metrics and readiness (stages/metrics.py, stages/pages.py).
        self.write_errors = 0  # failed writes so far
        self.dropped_total = 0  # records lost to a full backlog so far
        self._thread = threading.Thread(target=self._run, name="keygate-usagelog", daemon=True)
        self._thread.start()

    # ---- caller side

    @property
    def backlog(self) -> int:
        """Records queued or held, not yet written (approximate: read from another thread)."""
        return len(self._pending) + self._queue.qsize()

    @property
    def failing(self) -> bool:
        """The last write failed (the disk is full, say): lines are held in memory."""
        return self._failing

    def write(self, record: dict) -> None:
        if self._closed:
            if not self._warned_closed:
                self._warned_closed = True
                log.warning("keygate: usage log already closed; record %s not written",
                            record.get("id") if isinstance(record, dict) else None)
            return
        self._queue.put(record)

    def reconfigure(self, path: Path, max_bytes: int, keep: int) -> None:
        self._queue.put(Target(Path(path), max_bytes, keep))

    def close(self, timeout: float = 10.0) -> None:
        """Write everything queued (retrying up to `timeout` s if the disk fails), stop the
        thread and join it."""
        if self._closed:
            return
        self._closed = True
        self._queue.put(_Stop(time.monotonic() + timeout))
        self._thread.join(timeout + 1.0)
        if self._thread.is_alive():
            log.error("keygate: usage log writer did not finish within %.0f s", timeout)

    # ---- writer thread

    def _run(self) -> None:
        while True:
            try:
                stop = self._take(self._queue.get(timeout=self._timeout()))
            except queue.Empty:
                stop = None
            if stop is None and self._gather and self._pending and not self._failing:
                # Let the lines of the next few milliseconds join this one: one wake-up and
                # one write for many, instead of one per request.
                time.sleep(self._gather)
                stop = self._take_queued()
            if stop is not None:
                self._finish(stop)
                return
            try:
                self._flush()
                self._maybe_checkpoint()
            except Exception:  # a bug must not kill the thread and lose every later line
                log.exception("keygate: usage log writer error")

    def _timeout(self) -> float | None:
        now = time.monotonic()
        waits = []
        if self._pending:
            waits.append(self._next_try - now)
        if self._dirty and self._checkpoint is not None:
            waits.append(self._last_checkpoint + self._checkpoint_interval - now)
        return max(0.0, min(waits)) if waits else None

    def _take(self, item: Any) -> _Stop | None:
        """Handle `item` and everything else already queued; return a stop request."""
        stop = None
        while True:
            if isinstance(item, dict):
                self._hold(item)
            elif isinstance(item, Target):
                self._flush(force=True)  # lines queued before the change go where they were
                self._file.retarget(item)
            elif isinstance(item, _Stop):
                stop = item
            else:
                log.error("keygate: usage log: ignoring %r, not a record", type(item).__name__)
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return stop

    def _take_queued(self) -> _Stop | None:
        try:
            return self._take(self._queue.get_nowait())
        except queue.Empty:
            return None

    def _hold(self, record: dict) -> None:
        try:
            line = encode(record)
        except Exception as e:  # e.g. a circular structure: only this record is lost
            log.error("keygate: usage record %r cannot be serialised (%s); dropped",
                      record.get("id"), e)
            return
        self._pending.append(line)
        if len(self._pending) > self._backlog_limit:
            self._pending.popleft()
            if self._dropped == 0:
                log.error("keygate: usage log backlog full (%d records): dropping the oldest "
                          "until %s can be written", self._backlog_limit, self._file.target.path)
            self._dropped += 1
            self.dropped_total += 1

    def _flush(self, force: bool = False) -> bool:
        """Try to write the backlog (not before the retry time unless forced); True if done."""
        if not self._pending:
            return True
        if self._failing and not force and time.monotonic() < self._next_try:
            return False
        rotations = self._file.rotations
        try:
            held = len(self._pending)
            self._file.append(self._pending)
        except OSError as e:
            self._failed(e)
            return False
        finally:
            if self._file.rotations != rotations:
                self._run_checkpoint()
        self._dirty = True
        if self._failing:
            self._failing = False
            log.warning("keygate: usage log %s is writable again: wrote %d held records%s",
                        self._file.target.path, held,
                        f"; {self._dropped} older records were dropped" if self._dropped else "")
            self._dropped = 0
        return True

    def _failed(self, e: OSError) -> None:
        self.write_errors += 1
        self._next_try = time.monotonic() + self._retry_interval
        if not self._failing:
            self._failing = True
            log.error("keygate: cannot write usage log %s: %s. Keeping records in memory (up "
                      "to %d) and retrying every %g s", self._file.target.path, e,
                      self._backlog_limit, self._retry_interval)

    def _maybe_checkpoint(self) -> None:
        if (self._dirty and self._checkpoint is not None
                and time.monotonic() >= self._last_checkpoint + self._checkpoint_interval):
            self._run_checkpoint()

    def _run_checkpoint(self) -> None:
        self._dirty = False
        self._last_checkpoint = time.monotonic()
        if self._checkpoint is None:
            return
        try:
            self._checkpoint(self._file.target.path, self._file.target.keep)
        except Exception as e:
            log.warning("keygate: usage ledger checkpoint failed: %s", e)

    def _rotation(self, dropped: list[Path], renames: Callable[[], None]) -> None:
        """One rotation (writer thread, inside append), through the ledger's hook. Whatever
        that hook does, the rotation happens, once: the log must not grow past its size. A
        file system error goes up to append (the batch is retried)."""
        target = self._file.target
        done = False

        def renames_once() -> None:
            nonlocal done
            if not done:
                done = True
                renames()

        if self._rotate is not None:
            try:
                self._rotate(target.path, target.keep, dropped, renames_once)
            except OSError:
                raise
            except Exception as e:
                log.error("keygate: usage ledger failed in a rotation (%s)%s", e,
                          f"; the counts of {', '.join(p.name for p in dropped)} may not be "
                          "carried forward" if dropped else "")
        elif dropped and self._checkpoint is not None:
            self._run_checkpoint()  # counted to their end before they go
        if not done:  # (after the renames, those paths name other files)
            _plain_rotation(dropped, renames_once)

    def _finish(self, stop: _Stop) -> None:
        try:
            while not self._flush(force=True) and time.monotonic() < stop.deadline:
                time.sleep(min(self._retry_interval, max(0.0, stop.deadline - time.monotonic())))
                self._take_queued()
            if self._pending:
                log.error("keygate: usage log %s: %d records could not be written and are lost",
                          self._file.target.path, len(self._pending))
            self._run_checkpoint()
        except Exception:
            log.exception("keygate: usage log writer error while closing")
        finally:
            self._file.close()
