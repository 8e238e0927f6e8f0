"""PreemptionWatch: a signal during training is recorded; after training it is logged and ignored."""

from __future__ import annotations

import logging
import os
import signal

from clipkit.preemption import PreemptionWatch


def test_a_signal_after_training_is_ignored_not_fatal(caplog):
    previous = signal.getsignal(signal.SIGUSR1)
    watch = PreemptionWatch([signal.SIGUSR1])
    try:
        os.kill(os.getpid(), signal.SIGUSR1)
        assert watch.received == signal.SIGUSR1 and watch.flag == 1.0
        watch.close()
        with caplog.at_level(logging.WARNING, logger="clipkit.preemption"):
            os.kill(os.getpid(), signal.SIGUSR1)   # SIGUSR1's default action would end this process
        assert "received SIGUSR1 after training stopped: ignored while the run finishes" in caplog.text
    finally:
        watch.restore()
    assert signal.getsignal(signal.SIGUSR1) == previous
