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
        print(f"error: {err}", file=sys.stderr, flush=True)
        from utils import distributed  # late import: keep this module free of torch at import time
        distributed.teardown()
        sys.exit(2)
