"""Each ingredient's accuracies on the held-out split, the test set and every shift, one results line
each (method "individual"): what greedy soup evaluates first (and --exclude-top and the report read), as
a step of its own, so that a launcher can run and time it apart (`scripts/paper_imagenet.sh individual`).
Takes the soup scripts' flags for the ingredients, the data and the results file; an ingredient whose
line is already in the results file is not evaluated again, so greedy soup afterwards reuses them all.

    python scripts/individual.py --model-location zoo/fashion_mnist --arch efficientnet-lite0
    torchrun --nproc_per_node=2 scripts/individual.py --model-location zoo/fashion_mnist

Memory: one ingredient at a time beside the model.
"""
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import datasets  # noqa: E402
from utils.files import results  # noqa: E402
from utils.run import cli, individual  # noqa: E402
from utils.runtime import distributed  # noqa: E402
from utils.runtime.errors import run_main  # noqa: E402

log = logging.getLogger("individual")


def parse_args(argv=None):
    p = cli.soup_parser("Each ingredient's accuracies (held-out, test, shifts), one results line each.",
                        individual.METHOD)
    p.set_defaults(save_soup="none")  # no soup: only results lines
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    cli.check_paths(args, (individual.METHOD,))  # the results file is none of the inputs
    setup = cli.prepare(args, None, data=datasets.build_dataset)
    cli.check_data_place(args, (individual.METHOD,), setup)
    results.check_appendable(args.results_db)  # not another kind of file (once no input is it)
    records = individual.evaluate_individuals(setup)
    if distributed.is_primary() and records:
        best = max(records, key=lambda r: r["heldout"])
        log.info("%d ingredients; best on held-out: #%d (held-out %.2f, test %.2f)", len(records),
                 best["index"], best["heldout"], best["test"])
    cli.end()
    return records


if __name__ == "__main__":
    run_main(main)
