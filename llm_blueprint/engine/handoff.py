"""The one place where native threads meet greenlets.

CTranslate2 must run on real OS threads. Under gevent's monkey patching,
``threading.Thread`` (and even ``monkey.get_original("threading", "Thread")``)
starts a greenlet, and a blocking call there freezes the whole hub. So:

- engine threads are started with the *original* ``_thread.start_new_thread``
  and only ever block on C-level primitives (``_queue.SimpleQueue``, raw locks);
- results go back to the consumer through :class:`Channel`: under gevent the
  producer thread schedules ``queue.put_nowait`` on the consumer's hub with
  ``loop.run_callback_threadsafe``; without gevent it is a plain thread-safe queue.

The same code therefore serves greenlets (gunicorn ``-k gevent``), threads
(``gthread``/``sync`` workers) and the Flask dev server.
"""

from __future__ import annotations

import _queue
import sys
import time
from collections.abc import Callable
from typing import Any


class Empty(Exception):
    """Nothing arrived within the timeout."""


def gevent_patched() -> bool:
    monkey = sys.modules.get("gevent.monkey")
    return bool(monkey and monkey.is_module_patched("threading"))


def _original(module: str, name: str):
    if gevent_patched():
        from gevent import monkey

        return monkey.get_original(module, name)
    return getattr(sys.modules[module] if module in sys.modules else __import__(module), name)


def native_sleep(seconds: float) -> None:
    """Sleep the OS thread (``time.sleep`` would be gevent's under monkey patching)."""
    _original("time", "sleep")(seconds)


def allocate_native_lock():
    """A lock that blocks the OS thread, never a greenlet lock."""
    return _original("_thread", "allocate_lock")()


_running: set[NativeThread] = set()  # started and not ended (see native_threads_running)


class NativeThread:
    """A real OS thread, whatever monkey patching is in force. ``join`` blocks the OS thread. ``native`` False: a
    thread that never enters a native library (a timer), left out of :func:`native_threads_running`."""

    def __init__(self, target: Callable[[], Any], name: str, native: bool = True):
        self.name = name
        self.native = native
        self._target = target
        self._done = allocate_native_lock()
        self._done.acquire()
        self.alive = False

    def start(self) -> None:
        self.alive = True
        if self.native:
            _running.add(self)
        _original("_thread", "start_new_thread")(self._run, ())

    def _run(self) -> None:
        try:
            self._target()
        finally:
            self.alive = False
            _running.discard(self)
            self._done.release()

    def join(self, timeout: float = -1) -> bool:
        if self._done.acquire(True, timeout):
            self._done.release()
            return True
        return False


def native_threads_running(timeout: float = 0.0) -> list[str]:
    """The names of the native threads still running after waiting up to ``timeout`` seconds for them to end: an
    engine call, a model load or conversion (CTranslate2 calls cannot be interrupted). The process must not run its
    exit handlers under them (Runtime.end_process_if_busy)."""
    deadline = time.monotonic() + timeout
    for thread in list(_running):
        thread.join(max(0.0, deadline - time.monotonic()))
    return sorted(thread.name for thread in list(_running))


def run_on_native_thread(work: Callable[[], Any], name: str) -> Any:
    """``work()`` on a new OS thread; the caller (a greenlet, or a thread) waits for its result
    without blocking the event loop. Its exception, if any, is raised here."""
    channel = Channel()

    def run() -> None:
        try:
            channel.put((True, work()))
        except BaseException as exc:  # handed to the waiting caller
            channel.put((False, exc))

    NativeThread(run, name).start()
    ok, result = channel.get()
    if not ok:
        raise result
    return result


class WorkQueue:
    """Jobs for native threads: a C-level queue whose ``get`` blocks only the calling OS thread."""

    def __init__(self) -> None:
        self._queue = _queue.SimpleQueue()

    def put(self, item: Any) -> None:
        self._queue.put(item)

    def get(self) -> Any:
        return self._queue.get()


class Channel:
    """Single-consumer channel: ``put`` from any thread, ``get`` from the consumer.

    Create it in the consumer (greenlet or thread) that will read it.
    """

    def __init__(self) -> None:
        if gevent_patched():
            import gevent
            from gevent.queue import Empty as _GeventEmpty
            from gevent.queue import Queue

            hub = gevent.get_hub()
            self._queue = Queue()
            self._empty = _GeventEmpty
            loop, put_nowait = hub.loop, self._queue.put_nowait
            self.put = lambda item: loop.run_callback_threadsafe(put_nowait, item)
        else:
            self._queue = _queue.SimpleQueue()
            self._empty = _queue.Empty
            self.put = self._queue.put

    def get(self, timeout: float | None = None) -> Any:
        if timeout is None:
            # Wait in bounded slices: a pending timer keeps gevent's loop alive
            # (a cross-thread callback alone does not, and the hub would
            # declare "this operation would block forever" at boot).
            while True:
                try:
                    return self._queue.get(timeout=1.0)
                except self._empty:
                    continue
        try:
            return self._queue.get(timeout=timeout)
        except self._empty:
            raise Empty from None
