"""Stopping a run cleanly when the machine is being taken away: a scheduler's SIGTERM (or a
warning signal such as SIGUSR1, sent some time ahead) makes every rank finish its current
optimiser step; rank 0 then writes ``last.pt`` and every rank stops with
:class:`TrainingPreempted` (``cait train`` exits with status 75). The run continues with
``--resume auto`` (docs/DISTRIBUTED.md).

Ctrl-C (SIGINT) stops a run at once instead: it ends in :class:`TrainingInterrupted`, which
says what the output folder holds then.
"""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType

import torch

from cait.runtime import all_reduce_max, dist_info

__all__ = [
    "PREEMPT_SIGNALS",
    "PreemptionWatch",
    "TrainingInterrupted",
    "TrainingPreempted",
    "check_signal_names",
]

logger = logging.getLogger(__name__)

# Signals a run may be asked to stop on. SIGINT stays Ctrl-C (an immediate stop, from the
# last checkpoint); SIGKILL and SIGSTOP cannot be caught.
PREEMPT_SIGNALS = ("SIGTERM", "SIGUSR1", "SIGUSR2", "SIGHUP", "SIGQUIT")


class TrainingPreempted(Exception):
    """A signal asked the run to stop; its ``last.pt`` is written."""


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C stopped the run; the message says what its output folder holds now and how
    to go on (:meth:`cait.training.run_folder.FolderAtStart.after_interrupt`)."""


def check_signal_names(names: tuple[str, ...]) -> None:
    """Raise ``ValueError`` unless every name is one of :data:`PREEMPT_SIGNALS`."""
    unknown = [n for n in names if n not in PREEMPT_SIGNALS]
    if unknown:
        raise ValueError(
            f"preempt_signals: {unknown} cannot stop a run; choose among {list(PREEMPT_SIGNALS)}"
        )


class PreemptionWatch:
    """Notes the configured signals while a run trains (their handlers are replaced for the
    block and restored after). Only the main thread can set handlers; elsewhere nothing is
    watched. A second signal changes nothing: the run is already stopping.

    Until :meth:`arm` (the first epoch starting) a signal has its usual effect at once:
    during the set-up there is nothing to save, and a process that a launcher restarting
    its group stops must not linger in the set-up's collectives.
    """

    def __init__(self, names: tuple[str, ...]) -> None:
        check_signal_names(names)
        self.signals = [signal.Signals[n] for n in names]
        self.received: str | None = None
        self.armed = False
        self._previous: dict[signal.Signals, object] = {}

    def __enter__(self) -> PreemptionWatch:
        if threading.current_thread() is threading.main_thread():
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._note)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def arm(self) -> None:
        """From now on a signal stops the run at the end of a step, with a checkpoint."""
        self.armed = True

    def _note(self, signum: int, frame: FrameType | None) -> None:
        if not self.armed:  # as if the handler had not been replaced
            previous = self._previous.get(signal.Signals(signum), signal.SIG_DFL)
            if previous is signal.SIG_IGN:  # e.g. SIGHUP under nohup
                return
            if callable(previous):
                previous(signum, frame)
                return
            signal.signal(signum, signal.SIG_DFL)
            signal.raise_signal(signum)
            return
        if self.received is None:
            self.received = signal.Signals(signum).name
            logger.warning(
                "%s received: finishing this step, then writing last.pt and stopping",
                self.received,
            )

    def agreed(self, device: torch.device) -> bool:
        """Whether any rank received a signal (a collective under ``torchrun``: every rank
        calls it at the same step, so all stop at that step; none when no signal is
        watched)."""
        if not self.signals:
            return False
        if dist_info().world_size == 1:
            return self.received is not None
        flag = torch.tensor([float(self.received is not None)], device=device)
        return bool(all_reduce_max(flag).item() > 0)
