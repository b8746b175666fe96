"""Pre-emption and Ctrl-C: SIGTERM or SIGINT asks the loop to checkpoint at the next step boundary.

The handler only records the signal; the loop acts on it between two optimizer steps, where
model, optimizer and RNGs are consistent, so the checkpoint resumes exactly. A second Ctrl-C
interrupts at once. Every process must stop at the same step: under DDP they agree through
Accelerate's trigger (an all-reduce), checked only at log steps, where the loop synchronises anyway.

Not here: the saving itself (gpt_train.checkpoint).
"""
import os
import signal
import sys
import threading

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopSignals:
    """A context manager that turns SIGTERM/SIGINT into a request to stop."""

    def __init__(self, accelerator):
        self.accelerator = accelerator
        self.received = None  # the first signal number, once one arrives
        self.announce = accelerator.is_main_process  # say at once that the signal was seen, once
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # Python only allows handlers there
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame):
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: the user does not want to wait
        self.received = signum
        if self.announce:  # an evaluation can take minutes: say now that the signal was seen
            # os.write, not print: the handler may run in the middle of a print to the same stream
            try:
                os.write(sys.stderr.fileno(), f"{signal.Signals(signum).name} received: saving a checkpoint at the "
                         "next step boundary, then stopping (Ctrl-C again to stop at once)\n".encode())
            except OSError:  # nobody reads stderr any more (`| tee` ended by the same Ctrl-C): save anyway
                pass

    def agreed(self, at_sync_point):
        """Whether all processes stop now; False between sync points when several processes run
        (Accelerate's trigger is an all-reduce, so it is checked only where the loop syncs anyway)."""
        acc = self.accelerator
        if self.received is not None:
            acc.set_trigger()
        if acc.num_processes > 1 and not at_sync_point:
            return False
        if not acc.check_trigger():
            return False
        self.received = self.received or signal.SIGTERM  # a process the signal missed stops as well
        return True

    @property
    def name(self):
        return signal.Signals(self.received).name if self.received else None

    @property
    def exit_code(self):
        return 128 + self.received  # the shell's convention for "ended by a signal"
