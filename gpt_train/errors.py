"""The one exception type for mistakes a user can fix, and the entry-point guard that prints it.

Raise `UserError` where the mistake is found, with what to do about it. Entry points wrap
their `main` in `exit_on_user_error`, which prints the message as one line and exits non-zero
instead of showing a traceback. Bugs in gpt-train itself still raise normally.
"""
import functools
import sys


class UserError(Exception):
    """A mistake in settings, files or environment that the user can fix."""


def exit_on_user_error(main):
    @functools.wraps(main)
    def guarded(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UserError as e:
            # one write: under accelerate launch every process reports, and separate writes of
            # text and newline from two processes would run their lines together
            sys.stderr.write(f"error: {e}\n")
            sys.stderr.flush()
            sys.exit(2)
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            sys.exit(130)

    return guarded
