"""SIGTERM handled like Ctrl-C: the same clean-up paths run whichever way a command is stopped."""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType


class Terminated(KeyboardInterrupt):
    """Raised in the main thread when the process receives SIGTERM inside ``sigterm_interrupts``."""

    exit_code = 128 + signal.SIGTERM  # what a shell reports for a process killed by SIGTERM


@contextmanager
def sigterm_interrupts() -> Iterator[None]:
    """Inside the block, SIGTERM raises ``Terminated`` (a KeyboardInterrupt) in the main thread.

    `timeout`, systemd, CI runners and `kill` stop a process with SIGTERM, whose default
    action ends it at once: no ``finally``, no namespaces removed, no nodes unloaded. Code
    that cleans up after Ctrl-C cleans up after this too. Outside the main thread (where
    Python cannot install handlers) the block runs unchanged.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def raise_terminated(signum: int, frame: FrameType | None) -> None:
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
