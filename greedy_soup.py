"""Greedy soup (SPEC 5): add ingredients in order of held-out accuracy, keep one only if the soup's
held-out accuracy rises strictly.

1. Held-out accuracy of every ingredient (lines already in the results file are reused).
2. Sort descending, ties: lower index first. soup = best ingredient.
3. For each next ingredient c: candidate = (n * soup + theta_c) / (n + 1) (computed in float64);
   keep it if its held-out accuracy > best, else drop it.
4. Report the kept ingredients, the held-out accuracy after each step, and the soup's held-out, test
   and shift accuracies.

At most the soup, one candidate and the ingredient being tried are in memory.

    python greedy_soup.py --model-location zoo/fashion_mnist --arch efficientnet-lite0
    torchrun --nproc_per_node=2 greedy_soup.py --model-location zoo/fashion_mnist

Expect a soup of a few ingredients whose held-out accuracy is at least the best ingredient's (by
construction) and whose test accuracy is usually above it. The first run also writes one "individual"
results line per ingredient; later runs on the same results file reuse them.
"""
import logging

import torch
from tqdm import tqdm

from utils import cli, distributed, individual, results
from utils.errors import run_main
from utils.evaluation import accuracy, evaluate_all
from utils.ingredients import index_of, load_checked
from utils.soup_io import save_soup

log = logging.getLogger("greedy_soup")


def parse_args(argv=None):
    p = cli.soup_parser("Greedy soup: add ingredients by held-out accuracy while it rises.", "greedy")
    return p.parse_args(argv)


def add_to_soup(soup, theta, n):
    """(n * soup + theta) / (n + 1) in float64, cast back; integer tensors stay those of the soup."""
    return {k: ((n * v.to(torch.float64) + theta[k].to(torch.float64)) / (n + 1)).to(v.dtype)
            if v.is_floating_point() else v for k, v in soup.items()}


def greedy(ranking, load, heldout_of):
    """The greedy recipe over `ranking` [(index, path, held-out accuracy)], best first.

    `load(path)` gives a state dict, `heldout_of(sd)` its held-out accuracy. Returns the soup, the
    kept indices, and the steps [{"ingredient", "heldout", "kept"}] (the first is the best ingredient)."""
    first_index, first_path, best = ranking[0]
    soup, kept = load(first_path), [first_index]
    steps = [{"ingredient": first_index, "heldout": best, "kept": True}]
    for index, path, _ in tqdm(ranking[1:], desc="greedy", disable=not distributed.is_primary()):
        candidate = add_to_soup(soup, load(path), len(kept))
        acc = heldout_of(candidate)
        take = acc > best
        steps.append({"ingredient": index, "heldout": acc, "kept": take})
        if take:
            soup, best = candidate, acc
            kept.append(index)
        del candidate
        if distributed.is_primary():
            log.info("ingredient %d: candidate held-out %.2f -> %s (soup of %d, best %.2f)", index, acc,
                     "kept" if take else "dropped", len(kept), best)
    return soup, kept, steps


def main(argv=None):
    args = parse_args(argv)
    earlier, setup = cli.begin(args)
    if earlier is not None:
        return earlier

    ranking = individual.heldout_ranking(args, setup)
    ranking = ranking[args.exclude_top:]

    def heldout_of(sd):
        setup.model.load_state_dict(sd)
        return accuracy(setup.model, setup.bundle.heldout, setup.device, args.batch_size, args.workers,
                        desc="held-out")

    soup, kept, steps = greedy(ranking, lambda p: load_checked(p, setup.reference), heldout_of)
    setup.model.load_state_dict(soup)
    scores = evaluate_all(setup.model, setup.bundle, setup.device, args.batch_size, args.workers,
                          shifts=not args.no_shifts)

    paths = {index_of(p): p for _, p, _ in ranking}
    kept_paths = [paths[i] for i in kept]
    # The results line last: it marks the run as finished (a rerun after a kill redoes what is missing).
    save_soup(soup, setup.out_path, args.method, kept_paths, cli.record_args(args),
              extra={"order": [i for i, _, _ in ranking], "steps": steps}, overwrite=setup.replace)
    record = results.append(args.results_db, cli.result_record(
        args, setup, kept_paths, scores, order=[i for i, _, _ in ranking],
        heldout_steps=[s["heldout"] for s in steps], steps=steps,
        excluded=sorted(set(index_of(p) for p in setup.paths) - set(paths))))
    if distributed.is_primary():
        log.info("greedy soup of %s: held-out %.2f, test %.2f, shift mean %s", kept, scores["heldout"],
                 scores["test"], scores.get("shift_mean"))
    distributed.teardown()
    return record


if __name__ == "__main__":
    run_main(main)
