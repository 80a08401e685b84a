"""A log that says what happens without flooding: at most a few lines per interval.

Failures come in bursts (an upstream down under load gives one per request); the first few of
each interval are logged in full, the rest are counted and the count is said with the next
line that gets through.
"""

from __future__ import annotations

import logging
import time


class ThrottledLog:
    def __init__(self, logger: logging.Logger, per_interval: int = 10,
                 interval: float = 10.0) -> None:
        self.logger = logger
        self.per_interval = per_interval
        self.interval = interval
        self._window_start = 0.0
        self._used = 0
        self.suppressed = 0

    def warning(self, message: str, *args: object) -> None:
        now = time.monotonic()
        if now - self._window_start >= self.interval:
            self._window_start = now
            self._used = 0
        if self._used >= self.per_interval:
            self.suppressed += 1
            return
        self._used += 1
        if self.suppressed:
            message += " (%d more like it not logged)"
            args = (*args, self.suppressed)
            self.suppressed = 0
        self.logger.warning(message, *args)
