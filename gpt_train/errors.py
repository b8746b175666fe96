"""The one exception type for mistakes a user can fix, and the entry-point guard that prints it.

Raise `UserError` where the mistake is found, with what to do about it. Entry points wrap
their `main` in `exit_on_user_error`, which prints the message as one line and exits non-zero
instead of showing a traceback. Bugs in gpt-train itself still raise normally.
"""
import functools
import os
import sys

from gpt_train.launch import launched_processes


class UserError(Exception):
    """A mistake in settings, files or environment that the user can fix."""


def exit_on_user_error(main):
    @functools.wraps(main)
    def guarded(*args, **kwargs):
        try:
            result = main(*args, **kwargs)
        except UserError as e:
            # one write: under accelerate launch every process reports, and separate writes of
            # text and newline from two processes would run their lines together
            sys.stderr.write(f"error: {e}\n")
            _exit(2)
        except KeyboardInterrupt:
            sys.stderr.write("interrupted\n")
            _exit(130)
        except SystemExit as e:
            _exit(e.code)
        except BrokenPipeError:  # the reader of our output went away (`| head`): stop as quietly
            stdout_to_devnull()
            _exit(128 + 13)  # the shell's code for a writer ended by SIGPIPE
        if launched_processes() > 1:
            _exit(0)  # `result` (a run) is still alive here: see _exit
        # Nothing is returned: a console script passes main's value to sys.exit, which would print
        # it and exit 1.

    return guarded


def first_line(error, limit=200):
    """'TypeName: the first line of its message', cut at `limit`: enough to act on, in one line."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0][:limit]}" if lines else type(error).__name__


class ClosedPipeTolerant:
    """stdout or stderr that, once its reader has gone (`train.py ... | head`, or `| tee` ended by
    the same Ctrl-C), sends the rest to /dev/null instead of raising: a training run's files are
    what matter, so it trains on, or saves its checkpoint, quietly."""

    def __init__(self, stream):
        self._stream = stream

    def write(self, text):
        try:
            return self._stream.write(text)
        except BrokenPipeError:
            to_devnull(self._stream)
            return len(text)

    def flush(self):
        try:
            self._stream.flush()
        except BrokenPipeError:
            to_devnull(self._stream)

    def __getattr__(self, name):
        return getattr(self._stream, name)


def stdout_to_devnull():
    to_devnull(sys.stdout)


def to_devnull(stream):
    """Send the rest of `stream` to /dev/null once its reader has gone, so no later write or the
    flush at exit fails again."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, stream.fileno())
    os.close(devnull)


def _exit(code):
    """sys.exit, but in one of several launched processes os._exit once the output is flushed.

    Freeing a gloo process group can deadlock: its destructor holds the GIL while it waits for
    a worker thread that needs the GIL to free the last collective's tensors (pytorch/pytorch
    #56297; a quarter of 2-process CPU runs hung here at exit). So the process ends before the
    DDP model holding the group is freed: entry points keep their run alive (they return it, or
    it is in the exception being handled). Files are written and closed and trackers finished
    by then, so nothing is lost.
    """
    if launched_processes() > 1:
        if isinstance(code, str):
            sys.stderr.write(code + "\n")
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code if isinstance(code, int) else 0 if code is None else 1)
    sys.exit(code)
