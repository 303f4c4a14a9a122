"""Greedy soup: try every ingredient in order of held-out accuracy and keep each one that raises the
soup's held-out accuracy strictly (a dropped ingredient does not stop the search).

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

import datasets
from utils.files.ingredients import index_of, load_checked
from utils.run import cli, individual, inputs, outputs
from utils.run.evaluation import accuracy, evaluate_all
from utils.runtime import distributed
from utils.runtime.errors import run_main

log = logging.getLogger("greedy_soup")
METHOD = "greedy"


def parse_args(argv=None):
    p = cli.soup_parser("Greedy soup: try every ingredient in order of held-out accuracy and keep each "
                        "that raises the soup's held-out accuracy.", METHOD)
    return p.parse_args(argv)


def add_to_soup(soup, theta, n):
    """(n * soup + theta) / (n + 1) in float64, cast back; integer tensors stay those of the soup."""
    return {k: ((n * v.to(torch.float64) + theta[k].to(torch.float64)) / (n + 1)).to(v.dtype)
            if v.is_floating_point() else v for k, v in soup.items()}


def greedy(ranking, load, heldout_of, add=add_to_soup, quiet=False):
    """The greedy recipe over `ranking` [(index, path, held-out accuracy)], best first.

    `load(path)` gives a state dict, `add(soup, theta, n)` the candidate of a soup of n and one more
    ingredient, `heldout_of(candidate)` its held-out accuracy (scripts/greedy_draws.py passes sets of
    indices for state dicts, so that each soup is evaluated once over its many selection sets).
    Returns the soup, the kept indices, and the steps [{"ingredient", "heldout", "kept"}] (the first is
    the best ingredient). `quiet`: no progress bar and no log line per step."""
    first_index, first_path, best = ranking[0]
    soup, kept = load(first_path), [first_index]
    steps = [{"ingredient": first_index, "heldout": best, "kept": True}]
    for index, path, _ in tqdm(ranking[1:], desc="greedy", disable=quiet or not distributed.is_primary()):
        candidate = add(soup, load(path), len(kept))
        acc = heldout_of(candidate)
        take = acc > best
        steps.append({"ingredient": index, "heldout": acc, "kept": take})
        if take:
            soup, best = candidate, acc
            kept.append(index)
        del candidate
        if distributed.is_primary() and not quiet:
            log.info("ingredient %d: candidate held-out %.2f -> %s (soup of %d, best %.2f)", index, acc,
                     "kept" if take else "dropped", len(kept), best)
    return soup, kept, steps


def main(argv=None):
    args = parse_args(argv)
    finished_line, setup, output = cli.begin(args, METHOD, data=datasets.build_dataset)
    if finished_line is not None:
        return finished_line

    ranking = individual.heldout_ranking(setup)
    ranking = ranking[args.exclude_top:]
    # every candidate shares the frozen prefix of its ingredients: it runs once per data set
    # (utils/run/prefix.py; checked at each evaluation)
    evaluated = inputs.evaluation(setup.model, setup.device, args.batch_size, args.workers, args.precision)

    def heldout_of(sd):
        setup.model.load_state_dict(sd)
        heldout = evaluated(setup.bundle.heldout, "held-out")
        return accuracy(heldout.forward, heldout.dataset, setup.device, args.batch_size, heldout.workers,
                        desc="held-out")

    soup, kept, steps = greedy(ranking, lambda p: load_checked(p, setup.reference), heldout_of)
    setup.model.load_state_dict(soup)
    scores = evaluate_all(evaluated, setup.bundle, setup.device, args.batch_size, shifts=not args.no_shifts,
                          keep=True)

    path_of = {index_of(p): p for _, p, _ in ranking}
    order = [i for i, _, _ in ranking]
    record = outputs.write_outputs(
        setup, output, METHOD, [path_of[i] for i in kept], scores, soup,
        recipe={"order": order, "steps": steps}, order=order,
        heldout_steps=[s["heldout"] for s in steps], steps=steps,
        excluded=sorted(set(index_of(p) for p in setup.paths) - set(path_of)))
    if distributed.is_primary():
        log.info("greedy soup of %s: held-out %.2f, test %.2f, shift mean %s", kept, scores["heldout"],
                 scores["test"], scores.get("shift_mean"))
    cli.end()
    return record


if __name__ == "__main__":
    run_main(main)
