"""Uniform soup: the mean of all ingredients, streamed.

One ingredient is in memory at a time beside a float64 accumulator; the mean is cast back to the
ingredients' dtype. Integer tensors (BatchNorm's num_batches_tracked) come from the first ingredient;
BatchNorm running statistics are averaged like parameters (README, "Rules that decide what a soup is").
The soup is evaluated on the held-out split, the test set and every shift; the soup is saved with its
recipe and one results line is appended (`utils.run.outputs.write_outputs`).

    python uniform_soup.py --model-location zoo/fashion_mnist --arch efficientnet-lite0
    torchrun --nproc_per_node=2 uniform_soup.py --model-location zoo/fashion_mnist

Expect a soup whose test accuracy is near (often a little below) the best ingredient's when the
ingredients are fine-tuned from one start with varied hyper-parameters. Under torchrun every rank
builds the same soup and the evaluation is split over ranks (the counts are exact).
--exclude-top k first ranks the ingredients by held-out accuracy (cached in the results file) and
leaves out the best k.
"""
import logging

import datasets
from utils.files.ingredients import average, stream
from utils.run import cli, individual, inputs, outputs
from utils.run.evaluation import evaluate_all
from utils.runtime import distributed
from utils.runtime.errors import run_main

log = logging.getLogger("uniform_soup")
METHOD = "uniform"


def parse_args(argv=None):
    p = cli.soup_parser("Uniform soup: the average of all ingredients (streamed).", METHOD)
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    finished_line, setup, output = cli.begin(args, METHOD, data=datasets.build_dataset)
    if finished_line is not None:
        return finished_line
    paths = individual.souped_paths(setup, args.exclude_top)

    soup = average((sd for _, _, sd in stream(paths, setup.reference, desc="averaging")), setup.reference)
    setup.model.load_state_dict(soup)
    # a frozen prefix shared by the ingredients runs once per data set (utils/run/prefix.py)
    evaluated = inputs.evaluation(setup.model, setup.device, args.batch_size, args.workers, args.precision)
    scores = evaluate_all(evaluated, setup.bundle, setup.device, args.batch_size, shifts=not args.no_shifts,
                          keep=True)

    record = outputs.write_outputs(setup, output, METHOD, paths, scores, soup)
    if distributed.is_primary():
        log.info("uniform soup of %d: held-out %.2f, test %.2f, shift mean %s", len(paths),
                 scores["heldout"], scores["test"], scores.get("shift_mean"))
    cli.end()
    return record


if __name__ == "__main__":
    run_main(main)
