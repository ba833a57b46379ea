"""Stop signals: the same request delivered twice (scheduler + torchrun) saves once; a later one stops at once."""

import os
import signal

import pytest

from moba_train.train import signals
from moba_train.train.signals import StopFlag


def test_repeated_signal_is_the_same_request():
    flag = StopFlag().install()
    try:
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGTERM)  # torchrun's forwarded copy, milliseconds later
        assert flag.signum == signal.SIGINT and flag.agreed()
    finally:
        flag.uninstall()


def test_signal_after_the_window_stops_at_once(monkeypatch):
    monkeypatch.setattr(signals, "REPEAT_S", 0.0)
    flag = StopFlag().install()
    try:
        os.kill(os.getpid(), signal.SIGINT)
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers given back
    finally:
        flag.uninstall()
