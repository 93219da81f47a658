"""Gunicorn's threaded worker, taking new connections only while it holds no more than its peers.

All workers wait on one listening socket, and Linux wakes them in an order that lets one worker
win accept() again and again (Cloudflare, "Why does one NGINX worker take all the load?"). With
keep-alive clients a connection then stays where it landed: measured here, 8 clients split 8/0,
7/1 or 6/2 more often than 4/4, and one worker's single TensorFlow thread served them all while
the other core idled (~200 requests/s instead of ~300). Each worker publishes its open
connections in shared memory, and stops listening while it holds more than another live worker,
so new connections go to the least loaded one (nginx calls this least_conn).
"""

from __future__ import annotations

import errno
import fcntl
import multiprocessing
import os
import select
import socket
import struct
import termios
import threading
import time
from typing import Any

from gunicorn.http.errors import NoMoreData
from gunicorn.workers.gthread import _DEFER, ThreadWorker

FREE = -1  # a slot no serving worker holds
# A worker's main loop turns at least once a second (gthread's select timeout); a slot not
# refreshed for this long belongs to a worker that hangs, and is ignored like a free one.
STALE_S = 3.0
NOTIFY_EVERY_S = 1.0  # how often a worker tells the arbiter it is alive (it must within `timeout`)


class ConnectionTable:
    """Open connections per worker slot, in memory shared by the master and its workers."""

    def __init__(self, slots: int) -> None:
        # Inherited across fork. The master only hands out slot numbers; a slot counts once its
        # worker serves (a worker still booting must not look like an idle peer: the others
        # would stop accepting and wait for it).
        self.counts = multiprocessing.RawArray("i", [FREE] * slots)
        self.seen = multiprocessing.RawArray("d", [0.0] * slots)  # time.monotonic() of the last publish

    def claim(self, taken: set[int]) -> int | None:
        """A slot number for a worker about to be forked (None: more workers than slots)."""
        return next((slot for slot in range(len(self.counts)) if slot not in taken), None)

    def release(self, slot: int | None) -> None:
        if slot is not None:
            self.counts[slot] = FREE

    def publish(self, slot: int, count: int) -> None:
        self.seen[slot] = time.monotonic()  # CLOCK_MONOTONIC: one clock for every process
        self.counts[slot] = count

    def fewest_elsewhere(self, slot: int) -> int | None:
        """The fewest connections any other serving worker holds (None: no other worker)."""
        fresh = time.monotonic() - STALE_S
        counts = (c for i, c in enumerate(self.counts) if i != slot and c != FREE and self.seen[i] >= fresh)
        return min(counts, default=None)

    def may_accept(self, slot: int, count: int) -> bool:
        """True if no other serving worker holds fewer connections than `count`."""
        fewest = self.fewest_elsewhere(slot)
        return count == 0 or fewest is None or count <= fewest


# Created when gunicorn reads its config (service/server/gunicorn_conf.py), before any worker forks.
table: ConnectionTable | None = None


# A worker holding this many more connections than a peer closes one after its response...
SHED_EXCESS = 2
# ...at most this often, so it does not drop several before the counts catch up.
SHED_INTERVAL_S = 0.05
# How often a worker that stopped accepting asks again.
HELD_BACK_RECHECK_S = 0.02


# Slow clients: a thread serves a connection from its first byte, so a client that trickles its
# headers (or body) holds a thread. Headers must arrive within HEADER_TIMEOUT_S of the request's
# first byte. A body must keep pace: at any moment, the bytes received must be at least
# BODY_MIN_RATE a second over the time since the body began, less a grace of BODY_TIMEOUT_S (so a
# declared Content-Length buys no time: a client that trickles is cut after about the grace, one
# that sends at the rate has as long as it needs). While more than half of a worker's threads are
# reading bodies, new bodies get BODY_BUSY_TIMEOUT_S of grace instead: under a crowd of slow
# clients, threads come free within a second for /health and queries. A body cut for being slow
# gets a 408 from the app, or the connection is dropped. nginx, in front on Elastic Beanstalk,
# buffers whole requests, so there these never trigger.
HEADER_TIMEOUT_S = float(os.environ.get("GUNICORN_HEADER_TIMEOUT", "5"))
BODY_TIMEOUT_S = float(os.environ.get("GUNICORN_BODY_TIMEOUT", "5"))
BODY_BUSY_TIMEOUT_S = float(os.environ.get("GUNICORN_BODY_BUSY_TIMEOUT", "0.5"))
BODY_MIN_RATE = float(os.environ.get("GUNICORN_BODY_MIN_RATE", str(256 * 1024)))
# How long a pool thread waits for a new connection's first byte before handing it to the poller.
FIRST_BYTE_WAIT_S = 0.05
# Responses: a client that stops reading fills its socket's buffers, and the thread writing to it
# would wait for ever. A response that makes no progress for WRITE_STALL_S is cut (the connection
# closes); a client that reads, however slowly, shrinks its send queue and is never cut.
WRITE_STALL_S = float(os.environ.get("GUNICORN_WRITE_STALL_TIMEOUT", "5"))
if not WRITE_STALL_S > 0:
    raise ValueError(f"GUNICORN_WRITE_STALL_TIMEOUT must be over 0 seconds, not {WRITE_STALL_S:g}")
# Keep-alive: after a response, the thread that wrote it waits this long for the connection's next
# request while no other connection waits for a thread, and serves it at once. Handing the
# connection back to the main loop (which registers it with the poller, waits, then queues it for a
# thread again) costs syscalls and two thread switches per request: bench/request_path.py measures
# the linger off beside on (docs/BENCHMARKS.md). 0: off. poll() counts whole milliseconds.
KEEPALIVE_LINGER_S = float(os.environ.get("GUNICORN_KEEPALIVE_LINGER_MS", "2")) / 1000
if not KEEPALIVE_LINGER_S >= 0:
    raise ValueError(f"GUNICORN_KEEPALIVE_LINGER_MS must be 0 or more, not {KEEPALIVE_LINGER_S * 1000:g}")


def has_body(req: Any) -> bool:
    """Whether the request sends a body (a Content-Length over 0, or chunked)."""
    for name, value in getattr(req, "headers", []):
        upper = name.upper()
        if upper == "CONTENT-LENGTH":
            return str(value).strip() not in ("", "0")
        if upper == "TRANSFER-ENCODING":
            return True
    return False


class SlowHeadersError(NoMoreData):
    """The client did not send its request headers in time (gunicorn closes it quietly)."""


class _ReadDeadline:
    """A client socket whose reads fail once the request falls behind: its headers not in within
    their deadline, or its body behind the minimum rate by more than its grace."""

    def __init__(self, sock: Any) -> None:
        self._sock = sock
        self.deadline: float | None = None
        self.reading_body = False
        self.cut = False  # this request's body was cut off: the connection closes, never drains it
        self.closing = False  # being closed on the worker's main loop: reads never wait
        self._body_since = 0.0
        self._grace = 0.0
        self._received = 0

    def __getattr__(self, name: str) -> Any:  # everything else: the socket itself
        return getattr(self._sock, name)

    def headers_now(self) -> None:
        self.deadline, self.reading_body, self.closing = time.monotonic() + HEADER_TIMEOUT_S, False, False

    def body_now(self, grace: float) -> None:
        self.cut = False
        self._body_since, self._grace, self._received = time.monotonic(), grace, 0
        self.reading_body = True
        self.deadline = self._body_since + grace

    def _too_slow(self) -> Exception:
        if self.reading_body:
            self.cut = True
            return TimeoutError("the request body arrived too slowly")
        return SlowHeadersError(f"no complete request headers within {HEADER_TIMEOUT_S:g} s")

    def recv(self, size: int, *flags: int) -> bytes:
        if self.closing:  # what has arrived, never a wait (BlockingIOError ends gunicorn's drain)
            self._sock.setblocking(False)  # MSG_DONTWAIT alone: Python still polls for the timeout
            return self._sock.recv(size)
        if self.deadline is None:
            return self._sock.recv(size, *flags)
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise self._too_slow()
        data = self._recv(size, remaining, *flags)
        if self.reading_body:  # each byte in buys the time it takes at the minimum rate
            self._received += len(data)
            self.deadline = self._body_since + self._grace + self._received / BODY_MIN_RATE
        return data

    def sendall(self, data: Any) -> None:
        view = memoryview(data).cast("B")
        while view:
            try:  # the socket is blocking (no timeout): MSG_DONTWAIT makes this one call not wait
                sent = self._sock.send(view, socket.MSG_DONTWAIT)
            except BlockingIOError:
                sent = 0
            view = view[sent:]
            if view:
                self._wait_for_room()

    def send(self, data: Any, flags: int = 0) -> int:  # gunicorn's "100 Continue" goes out this way
        self.sendall(data)
        return len(memoryview(data).cast("B"))

    def sendfile(self, file: Any, offset: int = 0, count: int | None = None) -> int:
        """socket.sendfile's work (os.sendfile from `offset`, `count` bytes or to the end), with
        the stall rule between chunks."""
        total, out, source = 0, self._sock.fileno(), file.fileno()
        self._sock.setblocking(False)
        try:
            while count is None or total < count:
                size = 1 << 20 if count is None else min(count - total, 1 << 20)
                try:
                    sent = os.sendfile(out, source, offset + total, size)
                except BlockingIOError:
                    self._wait_for_room()
                    continue
                if sent == 0:  # the end of the file
                    break
                total += sent
        finally:
            self._sock.setblocking(True)
            file.seek(offset + total)
        return total

    def _wait_for_room(self) -> None:
        """Wait until the socket takes more bytes; cut the response once the client has taken
        none for WRITE_STALL_S. Progress is the send queue shrinking (the kernel reports room only
        once a third of the buffer is free, which a slow reader may take seconds to make)."""
        since, queued = time.monotonic(), _queued(self._sock)
        while not _ready(self._sock, select.POLLOUT, min(0.25, WRITE_STALL_S)):
            now = _queued(self._sock)
            if now < queued:  # the client reads
                since, queued = time.monotonic(), now
            elif time.monotonic() - since >= WRITE_STALL_S:
                raise self._stalled()

    def _stalled(self) -> OSError:
        self.cut = True  # never drained or kept alive
        # Reset rather than linger: the kernel would otherwise keep probing a client that reads
        # nothing, with megabytes queued, for minutes after the close.
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        # EPIPE: gunicorn treats the connection as gone (a debug line, no traceback) and closes it
        return BrokenPipeError(errno.EPIPE, f"the client took none of its response for {WRITE_STALL_S:g} s")

    def _recv(self, size: int, remaining: float, *flags: int) -> bytes:
        if not flags:
            # Usually the bytes are there already: one non-blocking recv, and none of the four
            # fcntl calls that switching the socket's timeout costs (measured: bench/overhead.py).
            try:
                return self._sock.recv(size, socket.MSG_DONTWAIT)
            except BlockingIOError:
                pass
        previous = self._sock.gettimeout()
        self._sock.settimeout(remaining)
        try:
            return self._sock.recv(size, *flags)
        except TimeoutError:
            raise self._too_slow() from None
        finally:
            self._sock.settimeout(previous)


def _queued(sock: Any) -> int:
    """Bytes sent to `sock` that its peer has not taken yet (Linux: SIOCOUTQ)."""
    return int(struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0"))[0])


def _ready(sock: Any, event: int, timeout: float) -> bool:
    """Whether `sock` is ready for `event` (select.POLLIN: bytes or its end to read; POLLOUT: room
    for more bytes) within `timeout` seconds (poll: any descriptor number)."""
    poller = select.poll()
    poller.register(sock.fileno(), event)
    return bool(poller.poll(timeout * 1000))


class BalancedThreadWorker(ThreadWorker):
    """gthread, with accepting switched off while this worker holds more connections than a peer,
    and connections handed back while it holds two more than a peer."""

    balance_slot: int | None = None  # set by the master's pre_fork hook
    _last_shed = 0.0
    _notified = 0.0

    def notify(self) -> None:
        # gthread touches its heartbeat file on every loop turn, i.e. a syscall per request; the
        # arbiter only needs one per GUNICORN_TIMEOUT (60 s). Once a second is plenty.
        now = time.monotonic()
        if now - self._notified >= NOTIFY_EVERY_S:
            self._notified = now
            super().notify()

    def _publish(self) -> None:
        """Put this worker's connection count in the table (or take it out while stopping)."""
        if table is None or self.balance_slot is None:
            return
        if self.alive:
            table.publish(self.balance_slot, self.nr_conns)
        else:  # stopping: it takes no one, so it must not hold the others back
            table.release(self.balance_slot)

    def _fair(self) -> bool:
        """Publish, then decide: may this worker take a new connection?"""
        if table is None or self.balance_slot is None:
            return True
        self._publish()
        return self.alive and table.may_accept(self.balance_slot, self.nr_conns)

    def wait_for_and_dispatch_events(self, timeout: float) -> None:
        # Held back, a worker re-checks often: the peer it deferred to may have filled up in the
        # meantime, and with idle clients the next event could be a second away.
        if self.alive and not self._accepting:
            timeout = min(timeout, HELD_BACK_RECHECK_S)
        super().wait_for_and_dispatch_events(timeout)

    def set_accept_enabled(self, enabled: bool) -> None:
        # Gunicorn's loop calls this whenever "can accept" differs from the current state, so a
        # worker held back here asks again on every loop turn (each event, or every 20 ms).
        super().set_accept_enabled(enabled and self._fair())

    def accept(self, listener: Any) -> None:
        super().accept(listener)
        if not self._fair():
            super().set_accept_enabled(False)

    def enqueue_req(self, conn: Any) -> None:
        if not isinstance(conn.sock, _ReadDeadline):
            conn.sock = _ReadDeadline(conn.sock)
        super().enqueue_req(conn)

    def handle(self, conn: Any) -> Any:
        # gunicorn waits up to 5 s in a pool thread for a new connection's first byte: a few idle
        # connections every few seconds kept every thread waiting. One with nothing to read yet goes
        # back to the poller at once, where waiting costs no thread (and closes after `keepalive`).
        if not conn.initialized and not conn.data_ready and not conn.wait_for_data(FIRST_BYTE_WAIT_S):
            return _DEFER
        while True:
            if isinstance(conn.sock, _ReadDeadline):  # headers from now on
                conn.sock.headers_now()
            keepalive = super().handle(conn)
            if keepalive is not True or not self._next_request_here(conn):
                return keepalive

    def _next_request_here(self, conn: Any) -> bool:
        """Whether this thread serves the connection's next request itself: it has arrived (or
        arrives within KEEPALIVE_LINGER_S) while no other connection waits for a thread. Never
        while one waits: a client that pipelines (its next request already read) would otherwise
        keep the thread for as long as it sends, where gunicorn queues it behind the others."""
        if not self.alive or KEEPALIVE_LINGER_S <= 0 or not self._no_one_waits():
            return False  # stopping: the main loop answers the next request with "Connection: close"
        if conn.parser.unreader.buf.getvalue():
            return True  # read ahead with the last request
        return _ready(conn.sock, select.POLLIN, KEEPALIVE_LINGER_S) and self._no_one_waits()

    def _no_one_waits(self) -> bool:
        """Whether no connection waits for one of this worker's threads (gthread's pool queue)."""
        queue = getattr(self.tpool, "_work_queue", None)  # ThreadPoolExecutor's, since Python 3.2
        return queue is not None and queue.empty()

    _bodies = 0  # requests of this worker reading their bodies now
    _bodies_lock = threading.Lock()

    def handle_request(self, req: Any, conn: Any) -> Any:
        sock = conn.sock if isinstance(conn.sock, _ReadDeadline) else None
        counted = sock is not None and has_body(req)
        if sock is not None:  # the headers are in: the body's turn
            with self._bodies_lock:
                busy = self._bodies >= max(1, self.cfg.threads // 2)
                self._bodies += counted
            sock.body_now(BODY_BUSY_TIMEOUT_S if busy else BODY_TIMEOUT_S)
        try:
            keepalive = super().handle_request(req, conn)
        finally:
            if sock is not None:
                sock.deadline = None
                with self._bodies_lock:
                    self._bodies -= counted
        # A body cut off is never drained for a next request on the connection (that would hold the
        # thread while the slow client sends the rest): the connection closes.
        return keepalive and not (sock is not None and sock.cut)

    # Where connections landed unevenly anyway (a peer closing many at once looked busy a moment,
    # a client reconnected in a burst), keep-alive would keep them there for good. gthread answers
    # "Connection: close" when it holds at least `max_keepalived` idle connections; reporting 0
    # once in a while makes it hand one connection back, and the client reconnects to the peer.
    @property
    def max_keepalived(self) -> int:
        if table is not None and self.balance_slot is not None:
            fewest = table.fewest_elsewhere(self.balance_slot)
            if fewest is not None and self.nr_conns - fewest >= SHED_EXCESS:
                now = time.monotonic()
                if now - self._last_shed > SHED_INTERVAL_S:
                    self._last_shed = now
                    return 0
        return self._max_keepalived

    @max_keepalived.setter
    def max_keepalived(self, value: int) -> None:
        self._max_keepalived = value

    # Publish the count as soon as a connection closes: a peer deciding where the next client
    # goes must not see a count from before the last benchmark run, or it takes them all.
    #
    # gunicorn 27 closes a connection "gracefully" on this loop: it half-closes, then reads until the
    # client closes too, for up to 2 s. A client that keeps sending (a trickled body cut off above,
    # or any request with "Connection: close" followed by a byte now and then) held the loop, and
    # with it every accept and every finished response of the worker, for 2 s per connection: 20
    # such clients stopped both workers. Here the drain takes what has arrived and never waits.
    def finish_request(self, conn: Any, fs: Any) -> None:
        if isinstance(conn.sock, _ReadDeadline):
            conn.sock.closing = True  # a connection kept alive is reset by its next handle()
        super().finish_request(conn, fs)
        self._publish()

    def murder_keepalived(self, force: bool = False) -> None:
        super().murder_keepalived(force)
        self._publish()

    def murder_pending(self) -> None:
        super().murder_pending()
        self._publish()
