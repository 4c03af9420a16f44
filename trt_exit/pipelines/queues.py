"""A bounded queue between a capture thread and the main loop.

Live input must never queue up behind a slow consumer: a camera at 30 FPS feeding a model that
runs at 20 FPS would otherwise fall further behind every second. :class:`FrameQueue` in
drop-oldest mode keeps only the newest ``capacity`` items and counts what it dropped. Offline
input (a video file, the synthetic scene) uses blocking mode instead, so every frame is
processed and the producer waits for the consumer.
"""

from __future__ import annotations

import collections
import threading
import time
from typing import Generic, TypeVar

T = TypeVar("T")


class QueueClosed(Exception):
    """Raised by :meth:`FrameQueue.get` once the queue is closed and empty."""


class FrameQueue(Generic[T]):
    """A bounded, closable, thread-safe FIFO.

    Args:
        capacity: Items held at most.
        drop_oldest: When full, ``put`` discards the oldest item (live input) instead of
            waiting for room (offline input).
    """

    def __init__(self, capacity: int = 2, drop_oldest: bool = True):
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self.capacity = capacity
        self.drop_oldest = drop_oldest
        self._items: collections.deque[T] = collections.deque()
        self._lock = threading.Lock()
        self._not_empty = threading.Condition(self._lock)
        self._not_full = threading.Condition(self._lock)
        self._closed = False
        #: Items discarded because the consumer was behind.
        self.dropped = 0
        #: Items accepted by :meth:`put`.
        self.put_count = 0

    def put(self, item: T, timeout_s: float | None = None) -> bool:
        """Adds ``item``; returns False if the queue is closed (or, when blocking, the wait
        for room timed out)."""
        with self._lock:
            if self._closed:
                return False
            if len(self._items) >= self.capacity:
                if self.drop_oldest:
                    self._items.popleft()
                    self.dropped += 1
                else:
                    deadline = None if timeout_s is None else time.monotonic() + timeout_s
                    while len(self._items) >= self.capacity and not self._closed:
                        remaining = None if deadline is None else deadline - time.monotonic()
                        if remaining is not None and remaining <= 0:
                            return False
                        self._not_full.wait(remaining)
                    if self._closed:
                        return False
            self._items.append(item)
            self.put_count += 1
            self._not_empty.notify()
            return True

    def get(self, timeout_s: float | None = None) -> T | None:
        """The oldest item; None if none arrived within ``timeout_s``.

        Raises:
            QueueClosed: The queue is closed and every item has been taken.
        """
        with self._lock:
            deadline = None if timeout_s is None else time.monotonic() + timeout_s
            while not self._items:
                if self._closed:
                    raise QueueClosed
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return None
                self._not_empty.wait(remaining)
            item = self._items.popleft()
            self._not_full.notify()
            return item

    def close(self) -> None:
        """No more puts; waiting producers and consumers wake up. Items already queued can
        still be taken."""
        with self._lock:
            self._closed = True
            self._not_empty.notify_all()
            self._not_full.notify_all()

    @property
    def closed(self) -> bool:
        return self._closed

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)
