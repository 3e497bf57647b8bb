"""How far the loop has got: the receive counter behind ``Subscriber.sync``.

Every live message gets a receive index; the loop moves ``settled`` up to the highest index
below which everything has been handed to the core or dropped (batches held behind a replay
are not settled). ``wait_for`` lets other threads block until a given index is settled.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

__all__ = ["Progress"]


class Progress:
    def __init__(self) -> None:
        self.received = 0
        """Receive index of the last message read (loop thread only writes it)."""
        self.settled = 0
        """Every message with receive index <= this has been handed to the core or dropped."""
        self._cond = threading.Condition()
        self._waiters = 0

    def settle(self, oldest_held: int | None) -> None:
        """Loop thread: everything received is settled but what is still held (if any)."""
        settled = self.received if oldest_held is None else min(self.received, oldest_held - 1)
        if settled != self.settled:
            self.settled = settled
            if self._waiters:
                self.wake_all()

    def wake_all(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def wait_for(self, target: int, deadline: float, alive: Callable[[], bool]) -> bool:
        """Block until ``target`` is settled; False at ``deadline`` (monotonic) or once
        ``alive()`` turns false."""
        with self._cond:
            self._waiters += 1
            try:
                while self.settled < target:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0 or not alive():
                        return False
                    self._cond.wait(min(remaining, 0.5))
            finally:
                self._waiters -= 1
        return True
