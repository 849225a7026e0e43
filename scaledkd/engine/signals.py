"""Stop requests (SIGTERM from ``scancel``/a time limit, SIGUSR1 from SLURM's ``--signal``): noted by a handler,
acted on at the next optimiser-step boundary, where every rank agrees, a checkpoint is written and the job leaves
with :data:`~scaledkd.errors.PREEMPTED_EXIT`."""
from __future__ import annotations

import logging
import signal
import threading
from types import FrameType

log = logging.getLogger("scaledkd")

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopRequests:
    """Context manager installing handlers for :data:`STOP_SIGNALS` that only record the request.

    The previous handlers come back on exit. Outside the main thread (where Python cannot install handlers)
    nothing is installed and no stop is ever requested.
    """

    def __init__(self) -> None:
        self.received: str | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:  # noqa: ARG002
        if self.received is None:
            self.received = signal.Signals(signum).name
            log.warning("%s received: the run stops after this optimiser step, with a checkpoint", self.received)

    def __enter__(self) -> StopRequests:
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    @property
    def requested(self) -> bool:
        return self.received is not None
