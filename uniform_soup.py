"""Uniform soup (SPEC 4): the mean of all ingredients, streamed.

One ingredient is in memory at a time beside a float64 accumulator; the mean is cast back to the
ingredients' dtype. Integer tensors (BatchNorm's num_batches_tracked) come from the first ingredient;
BatchNorm running statistics are averaged like parameters (SPEC 3). The soup is evaluated on the
held-out split, the test set and every shift; one results line is appended and the soup saved with its
recipe.

    python uniform_soup.py --model-location zoo/fashion_mnist --arch efficientnet-lite0
    torchrun --nproc_per_node=2 uniform_soup.py --model-location zoo/fashion_mnist

Expect a soup whose test accuracy is near (often a little below) the best ingredient's when the
ingredients are fine-tuned from one start with varied hyper-parameters. Under torchrun every rank
builds the same soup and the evaluation is split over ranks (the counts are exact).
--exclude-top k first ranks the ingredients by held-out accuracy (cached in the results file) and
leaves out the best k.
"""
import logging

from utils import cli, distributed, individual, results
from utils.errors import run_main
from utils.evaluation import evaluate_all
from utils.ingredients import average, stream
from utils.soup_io import save_soup

log = logging.getLogger("uniform_soup")


def parse_args(argv=None):
    p = cli.soup_parser("Uniform soup: the average of all ingredients (streamed).", "uniform")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    earlier, setup = cli.begin(args)
    if earlier is not None:
        return earlier
    paths = individual.souped_paths(args, setup)

    soup = average((sd for _, _, sd in stream(paths, setup.reference, desc="averaging")), setup.reference)
    setup.model.load_state_dict(soup)
    scores = evaluate_all(setup.model, setup.bundle, setup.device, args.batch_size, args.workers,
                          shifts=not args.no_shifts)

    # The results line last: it marks the run as finished (a rerun after a kill redoes what is missing).
    save_soup(soup, setup.out_path, args.method, paths, cli.record_args(args), overwrite=setup.replace)
    record = results.append(args.results_db, cli.result_record(args, setup, paths, scores))
    if distributed.is_primary():
        log.info("uniform soup of %d: held-out %.2f, test %.2f, shift mean %s", len(paths),
                 scores["heldout"], scores["test"], scores.get("shift_mean"))
    distributed.teardown()
    return record


if __name__ == "__main__":
    run_main(main)
