"""One exception type for mistakes a user can make, turned into a one-line message by `run_main`."""
import logging
import os
import sys
import threading


class UserError(Exception):
    """Bad input (arguments, files, data). The message is shown as is, without a traceback."""


def run_main(main, argv=None):
    """Run `main(argv)`; a UserError becomes `error: <message>` on stderr and exit status 2. So does a
    PermissionError, wherever it comes from (a file this user may not read or write: an ingredient, a
    cache entry, a results file): it is never the program's bug, always the user's setup."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s",
                        datefmt="%H:%M:%S")
    try:
        return main(argv)
    except PermissionError as err:
        _fail(UserError(permission_message(err)))
    except UserError as err:
        _fail(err)


def permission_message(err):
    """The one line for a PermissionError: the file and what the system said."""
    where = " -> ".join(os.fsdecode(f) for f in (err.filename, err.filename2) if f is not None)
    return (f"{where or 'a file'}: this user may not open it ({err.strerror or err}): give this user access "
            "to it, or choose another path")


def _fail(err):
    """Say `err` (a UserError) in one line on stderr and exit with status 2."""
    if _close_progress_bars():
        print(file=sys.stderr)  # the bars may leave the cursor mid-line
    # One line, whatever the message holds (a library's multi-line error quoted in it).
    message = " ".join(line.strip() for line in str(err).splitlines() if line.strip())
    print(f"error: {message}", file=sys.stderr, flush=True)
    _leave_process_group()
    _exit_past_a_stuck_rendezvous(2)
    sys.exit(2)


# A thread left inside torch's C++ code (utils.runtime.distributed.join gives up on a rendezvous that never
# ends) aborts the interpreter's normal exit (SIGABRT, when the thread is stopped during finalisation).
STUCK_THREADS = ("rendezvous",)


def _exit_past_a_stuck_rendezvous(code):
    """End the process at once with `code` when such a thread is still running (nothing is left to write:
    the outputs are written before the results line, and the error was said)."""
    if any(t.name in STUCK_THREADS and t.is_alive() for t in threading.enumerate()):
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _leave_process_group():
    """Leave torchrun's process group, so that the other ranks learn at once that this one stopped
    (the output locks are the process's: the kernel releases them when it exits)."""
    import torch.distributed as dist  # here, not at the top: importing this module needs no torch
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _close_progress_bars():
    """Close the progress bars an error left open; True when there were any."""
    try:
        from tqdm import tqdm
        bars = list(getattr(tqdm, "_instances", ()))
        for bar in bars:
            bar.close()
        return bool(bars)
    except Exception:  # noqa: BLE001 - cosmetic: never hide the error itself
        return False
