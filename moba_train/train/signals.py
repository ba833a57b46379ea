"""SIGTERM / SIGINT (preemption, Ctrl-C) -> finish the current step, save a checkpoint, exit 0.

The first signal only sets a flag that the training loop reads at each step boundary; a second one
restores the default behaviour (SIGINT raises KeyboardInterrupt, SIGTERM terminates).
Ranks agree through `StopFlag.agreed()`: one rank that got the signal stops them all at the same step.
"""

import logging
import signal
import threading

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopFlag:
    def __init__(self):
        self.signum = None
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
        if self.signum is not None:  # second signal: give the default behaviour back and apply it
            self.uninstall()
            signal.raise_signal(signum)
            return
        self.signum = signum
        log.warning("%s received: saving a checkpoint at the end of this step, then exiting",
                    signal.Signals(signum).name)

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
