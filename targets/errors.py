"""One exception type for everything the user can fix: bad files, bad shapes, bad targets.

The CLI prints its message as one line and exits with code 2; anything else is an internal error (code 1).
"""

import contextlib
import os
import re
import signal
import threading


class EdgeqError(Exception):
    """A problem with the user's input, explained in one line."""

    exit_code = 2


# A TVM log line ("[08:12:55] /project/src/relax/ir/block_builder.cc:67: Warning: ...") that TVM's C++ code
# printed into the message it raised: never the reason, and never to be shown as the message.
_TVM_LOG_LINE = re.compile(r"^\s*\[\d\d:\d\d:\d\d\] \S+:\d+: ")
# TVM names the op of a failed type check by its whole repr (ir.Op(span=None, ..., name="relax.nn.conv2d", ...,
# support_level=10)): its name is what it means
_TVM_OP_REPR = re.compile(r'ir\.Op\(span=.*?name="([^"]+)".*?support_level=\d+\)')


def one_line(error: BaseException, limit: int = 400) -> str:
    """An exception's message on one line, without TVM log lines; long TVM messages keep their end, where the
    reason is."""
    lines = [line for line in str(error).splitlines() if not _TVM_LOG_LINE.match(line)]
    text = _TVM_OP_REPR.sub(r"\1", " ".join(" ".join(lines).split())) or type(error).__name__
    return text if len(text) <= limit else "…" + text[-limit:]


_interrupted = threading.Event()


@contextlib.contextmanager
def interruptible():
    """Make Ctrl-C stick during long TVM calls.

    A KeyboardInterrupt raised inside a Python callback that TVM's C++ code invoked (a pass) comes back out
    as a plain RuntimeError, or is swallowed by code that tolerates schedule errors. So the SIGINT handler
    also sets a flag; `raise_if_interrupted` turns it back into KeyboardInterrupt at safe points.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        _interrupted.set()
        raise KeyboardInterrupt

    _interrupted.clear()
    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield
    except Exception:
        raise_if_interrupted()
        raise
    finally:
        signal.signal(signal.SIGINT, previous)
        _interrupted.clear()  # handled (or never happened): later code must not see a stale interrupt


def raise_if_interrupted() -> None:
    if _interrupted.is_set():  # the flag stays set: a KeyboardInterrupt raised here may cross C++ and be wrapped
        raise KeyboardInterrupt


@contextlib.contextmanager
def stop_on_ctrl_c(terminal):
    """A graceful stop for long measuring loops (tuning): Ctrl-C sets the yielded event, which the loop polls to
    stop after the round being measured (its records are committed, the database stays whole); a second Ctrl-C
    stops at once. A KeyboardInterrupt raised inside MetaSchedule's C++ threads
    can crash the process, so the first one only sets the event the measure callback polls."""
    stop = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def handler(signum, frame):
        if stop.is_set():
            print("edgeq: interrupted", file=terminal, flush=True)
            os._exit(130)  # the database loses at most the line being written, repaired when next opened
        stop.set()
        print("\nedgeq: stopping after the current round of measurements (Ctrl-C again to stop now)",
              file=terminal, flush=True)

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield stop
    finally:
        signal.signal(signal.SIGINT, previous)
