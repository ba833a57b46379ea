"""SIGTERM / SIGINT (preemption, Ctrl-C) -> finish the current step, save a checkpoint, exit 0.

The first signal only sets a flag that the training loop reads at each step boundary. Under torchrun a worker
usually gets the same request twice within milliseconds (SLURM or the terminal signals every process, then the
agent forwards its own), so signals within `REPEAT_S` of the first are taken as that request; one after that
restores the default behaviour (SIGINT raises KeyboardInterrupt, SIGTERM terminates).
Ranks agree through `StopFlag.agreed()`: one rank that got the signal stops them all at the same step.
"""

import logging
import signal
import threading
import time

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

SIGNALS = (signal.SIGTERM, signal.SIGINT)
REPEAT_S = 5.0  # a later signal means "stop now, without saving"


class StopFlag:
    def __init__(self):
        self.signum = None
        self._first_at = 0.0
        self._previous = {}

    def install(self) -> "StopFlag":
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.signum is None:
            self.signum, self._first_at = signum, time.monotonic()
            log.warning("%s received: saving a checkpoint at the end of this step, then exiting (another signal "
                        "after %.0f s stops at once, without saving)", name, REPEAT_S)
        elif time.monotonic() - self._first_at < REPEAT_S:
            log.warning("%s received again: still saving", name)
        else:  # a later signal: give the default behaviour back and apply it
            self.uninstall()
            signal.raise_signal(signum)

    def agreed(self, group=None) -> bool:
        """True on every rank when any rank was signalled (a collective: call it on all ranks)."""
        stop = self.signum is not None
        if dist.is_initialized() and dist.get_world_size(group) > 1:
            flag = torch.tensor([1.0 if stop else 0.0])
            if dist.get_backend(group) == "nccl":
                flag = flag.cuda()
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
            stop = bool(flag.item() > 0)
        return stop
