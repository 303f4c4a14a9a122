"""One exception type for mistakes a user can make, turned into a one-line message by `run_main`."""
import logging
import sys


class UserError(Exception):
    """Bad input (arguments, files, data). The message is shown as is, without a traceback."""


def run_main(main, argv=None):
    """Run `main(argv)`; a UserError becomes `error: <message>` on stderr and exit status 2."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s",
                        datefmt="%H:%M:%S")
    try:
        return main(argv)
    except UserError as err:
        if _close_progress_bars():
            print(file=sys.stderr)  # the bars may leave the cursor mid-line
        # One line, whatever the message holds (a library's multi-line error quoted in it).
        message = " ".join(line.strip() for line in str(err).splitlines() if line.strip())
        print(f"error: {message}", file=sys.stderr, flush=True)
        _leave_process_group()
        sys.exit(2)


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
