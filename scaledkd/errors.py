"""Failures that end a run with a message rather than a traceback (the CLI prints them and exits 2).

Configuration, data and run-folder errors are ``ValueError`` subclasses next to what they check
(:class:`~scaledkd.config.ConfigError`, :class:`~scaledkd.data.DataError`, :class:`~scaledkd.build.RunDirError`);
what goes wrong while training lives here, where the CLI can name it without importing the engine.
"""
from __future__ import annotations


class NonFiniteLoss(RuntimeError):
    """A loss term became NaN/inf; the message names the step and the term."""


PREEMPTED_EXIT = 75  # EX_TEMPFAIL: the job stopped on request with a checkpoint; run it again to continue


class Preempted(Exception):
    """SIGTERM/SIGUSR1 stopped the run after a checkpoint; ``train.resume=auto`` (or ``latest``) continues it.
    The CLI exits with :data:`PREEMPTED_EXIT`."""
