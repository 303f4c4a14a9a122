"""report.py on a hand-written results file: values, ordering, missing shifts, figures."""
import json
import math

from report import main
from tests.models import TINY_CNN


def line(method, ingredients, test, heldout, shifts, exclude=0, **extra):
    present = [v for v in shifts.values() if v is not None]
    return {"method": method, "dataset": "FashionMNIST", "arch": TINY_CNN, "ingredients": ingredients,
            "heldout": heldout, "test": test, "shifts": shifts,
            "shift_mean": sum(present) / len(present) if present else None,
            "missing_shifts": [k for k, v in shifts.items() if v is None],
            "seconds": 12.0, "peak_memory_bytes": 2_000_000_000, "args": {"exclude_top": exclude}, **extra}


def test_report_table_ordering_values_and_missing(tmp_path):
    db = tmp_path / "r.jsonl"
    rows = [
        {**line("individual", [0], 70.0, 71.0, {"noise": 50.0, "blur": None}), "index": 0},
        line("individual", [1], 80.0, 82.0, {"noise": 60.0, "blur": None}),
        line("individual", [2], 81.0, 79.0, {"noise": 58.0, "blur": None}),
        line("MEHL-Soup+", [0, 1, 2], 84.5, 85.0, {"noise": 66.0, "blur": None},
             alpha=[[0.5, 0.7, -0.2], [0.2, 0.3, 0.5]]),
        line("uniform", [0, 1, 2], 78.0, 77.0, {"noise": 61.0, "blur": None}),
        # greedy's "ingredients" are the kept ones: rows are told apart by the range they were given
        line("greedy", [1, 2], 83.0, 84.0, {"noise": 62.0, "blur": None}, range_fingerprints=["a", "b", "c"]),
        line("greedy", [0, 1], 82.0, 83.5, {"noise": 62.0, "blur": None}, range_fingerprints=["a", "b"]),
        line("greedy", [0, 1, 2], 79.5, 80.0, {"noise": 55.0, "blur": None}, exclude=1),
    ]
    db.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "rep"
    table = main(["--results-db", str(db), "--out", str(out)])
    body = table.splitlines()
    assert body[0].split("|")[1:-1] == [" method ", " held-out ", " test ", " shift mean ", " noise ",
                                         " blur ", " time (s) ", " peak mem (GB) "]
    names = [row.split("|")[1].strip() for row in body[2:]]
    # best individual is chosen by held-out (82.0: ingredient 1), not by test
    assert names == ["best individual (#1)", "uniform soup", "greedy soup", "MEHL-Soup+"]
    greedy = body[4].split("|")
    assert greedy[2].strip() == "84.00" and greedy[3].strip() == "83.00" and greedy[5].strip() == "62.00"
    assert greedy[6].strip() == "missing" and greedy[7].strip() == "12" and greedy[8].strip() == "2.00"
    report = (out / "report.md").read_text()
    assert "missing on disk" in report and "blur" in report
    assert "| greedy soup | 83.00 | 79.50 |" in report  # elimination: none, top-1
    # held-out: individuals 71 / 82 / 79, uniform 77, greedy (over the 3) 84 keeping #1 and #2
    assert ("3 ingredients, held-out min / median / max 71.00 / 79.00 / 82.00. Uniform soup 77.00, 5.00 below "
            "the best ingredient. Greedy soup keeps 2 (#1, #2): 84.00, +2.00 over the best ingredient.") in report
    for png in ("ingredients.png", "scatter.png", "coefficients.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"


def test_report_mean_and_spread_over_seeds(tmp_path):
    db = tmp_path / "r.jsonl"
    rows = [line("individual", [0], 80.0, 80.0, {"noise": 60.0})]
    for seed, test in ((1, 84.0), (2, 85.0), (3, 86.0)):
        rows.append(line("MEHL-Soup+", [0, 1], test, 90.0, {"noise": 60.0 + seed},
                         args={"exclude_top": 0, "randomseed": seed}))
    # an earlier run of seed 2 is replaced by the later one, not counted as a fourth seed
    rows.insert(1, line("MEHL-Soup+", [0, 1], 10.0, 10.0, {"noise": 0.0}, args={"exclude_top": 0, "randomseed": 2}))
    db.write_text("".join(json.dumps(r) + "\n" for r in rows))
    table = main(["--results-db", str(db), "--out", str(tmp_path / "rep")])
    row = [r for r in table.splitlines() if "MEHL-Soup+" in r][0].split("|")
    assert row[1].strip() == "MEHL-Soup+ (mean ± sd of 3 seeds)"
    assert row[2].strip() == "90.00 ± 0.00" and row[3].strip() == "85.00 ± 1.00"
    assert row[5].strip() == "62.00 ± 1.00"


def test_elimination_compares_one_seed(tmp_path):
    db = tmp_path / "r.jsonl"
    rows = [line("individual", [i], 80.0 + i, 80.0 + i, {}) for i in range(3)]
    for seed, test in ((1, 84.0), (2, 85.0), (3, 86.0)):
        rows.append(line("MEHL-Soup+", [0, 1, 2], test, 90.0, {}, args={"exclude_top": 0, "randomseed": seed}))
    rows.append(line("MEHL-Soup+", [0, 1], 83.0, 88.0, {}, args={"exclude_top": 1, "randomseed": 1}))
    db.write_text("".join(json.dumps(r) + "\n" for r in rows))
    main(["--results-db", str(db), "--out", str(tmp_path / "rep")])
    # the run without ingredients removed is seed 1's (84), as the run with the top-1 removed, not seed 3's
    assert "| MEHL-Soup+ (seed 1) | 84.00 | 83.00 |" in (tmp_path / "rep" / "report.md").read_text()


def in_memory_block_ratios(soup, ingredients, blocks):
    """The reference: the report's distances as they were computed before streaming, every ingredient
    in memory at once (float64)."""
    import math

    import torch
    out = []
    for names in blocks:
        stacked = [torch.cat([sd[n].double().flatten() for n in names]) for sd in ingredients]
        mean = torch.stack(stacked).mean(0)
        spread = sum(float((s - mean).norm()) for s in stacked) / len(stacked)
        far = float((torch.cat([soup[n].double().flatten() for n in names]) - mean).norm())
        out.append(far / spread if spread > 0 else (0.0 if far == 0 else math.nan))
    return out


def streamed_block_ratios(soup, ingredients, blocks):
    from utils.soup import distance
    names = [n for b in blocks for n in b]
    mean = distance.mean_of(iter(ingredients), names)
    spread = [distance.squared_distances(sd, mean) for sd in ingredients]
    return distance.block_ratios(distance.squared_distances(soup, mean), spread, blocks)


def test_report_how_far_the_soup_went(tmp_path):
    import torch

    a, b = {"w": torch.tensor([0.0, 0.0]), "v": torch.tensor([1.0])}, {"w": torch.tensor([2.0, 0.0]),
                                                                         "v": torch.tensor([1.0])}
    blocks = [["w"], ["v"]]
    assert streamed_block_ratios({"w": torch.tensor([1.0, 0.0]), "v": torch.tensor([1.0])}, [a, b], blocks)[0] == 0.0
    assert streamed_block_ratios({"w": torch.tensor([0.0, 0.0]), "v": torch.tensor([1.0])}, [a, b], blocks)[0] == 1.0
    # the ingredients do not differ in v: 0 for a soup at their mean, nan (0/0) otherwise
    assert streamed_block_ratios({"w": torch.tensor([0.0, 0.0]), "v": torch.tensor([1.0])}, [a, b], blocks)[1] == 0.0
    assert math.isnan(streamed_block_ratios({"w": a["w"], "v": torch.tensor([3.0])}, [a, b], blocks)[1])
    # 4 times as far from the mean as the ingredients are: alpha (-1.5, 2.5)
    soup = {"w": torch.tensor([5.0, 0.0]), "v": torch.tensor([1.0])}
    for name, sd in (("model_0.pt", a), ("model_1.pt", b), ("soup.pt", soup)):
        torch.save(sd, tmp_path / name)
    recipe = {"ingredients": [{"path": str(tmp_path / f"model_{i}.pt")} for i in (0, 1)],
              "coefficients": {"blocks": [["w"]], "alpha": [[-1.5, 2.5]]}}
    (tmp_path / "soup.recipe.json").write_text(json.dumps(recipe))
    db = tmp_path / "r.jsonl"
    db.write_text(json.dumps(line("MEHL-Soup+", [0, 1], 80.0, 80.0, {}, soup_file=str(tmp_path / "soup.pt"),
                                  args={"exclude_top": 0, "randomseed": 1})) + "\n")
    main(["--results-db", str(db), "--out", str(tmp_path / "rep")])
    report = (tmp_path / "rep" / "report.md").read_text()
    assert "| MEHL-Soup+ seed 1 | 1 | 4.00 | 4.00 | 4.00 | -1.5 .. 2.5 |" in report
    csv = (tmp_path / "rep" / "distances.csv").read_text().splitlines()
    assert csv[1] == "MEHL-Soup+ seed 1,0,1,w,4,-1.5,2.5"


def test_streamed_distances_equal_the_in_memory_ones(tmp_path):
    """On a tiny zoo (5 ingredients, tensors of several shapes and dtypes, blocks of one and of several
    tensors, two soups sharing the ingredients): the report's streamed ratios, read back from
    distances.csv, and the streaming functions equal the in-memory float64 computation."""
    import torch

    g = torch.Generator().manual_seed(0)
    shapes = {"a.weight": (4, 3), "a.bias": (4,), "b.weight": (2, 4), "b.bias": (2,), "c": (3, 1, 2)}
    base = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    ingredients = [{k: (v + 0.1 * torch.randn(v.shape, generator=g)).to(torch.float64 if k == "c" else torch.float32)
                    for k, v in base.items()} for _ in range(5)]
    for i, sd in enumerate(ingredients):
        torch.save({**sd, "n.num_batches_tracked": torch.tensor(3)}, tmp_path / f"model_{i}.pt")
    soups = {"mehl": [["a.weight", "a.bias"], ["b.weight"], ["b.bias", "c"]],
             "learned": [["a.weight", "a.bias", "b.weight", "b.bias", "c"]]}
    rows, expected = [], {}
    for s, (stem, blocks) in enumerate(soups.items()):
        alpha = torch.randn(len(blocks), 5, generator=g).double()
        soup = {k: sum(alpha[next(j for j, b in enumerate(blocks) if k in b), i] * sd[k].double()
                       for i, sd in enumerate(ingredients)).to(ingredients[0][k].dtype) for k in shapes}
        torch.save(soup, tmp_path / f"{stem}.pt")
        recipe = {"method": stem, "soup": f"{stem}.pt", "args": {},
                  "ingredients": [{"path": str(tmp_path / f"model_{i}.pt"), "sha256": "x"} for i in range(5)],
                  "coefficients": {"names": list(shapes), "blocks": blocks, "alpha": alpha.tolist()}}
        (tmp_path / f"{stem}.recipe.json").write_text(json.dumps(recipe))
        method = "MEHL-Soup+" if stem == "mehl" else "Learned-Soup+"
        rows.append(line(method, list(range(5)), 80.0, 80.0, {}, soup_file=str(tmp_path / f"{stem}.pt")))
        expected[method] = in_memory_block_ratios(soup, ingredients, blocks)
        got = streamed_block_ratios(soup, ingredients, blocks)
        torch.testing.assert_close(torch.tensor(got), torch.tensor(expected[method]), rtol=1e-12, atol=0)
    db = tmp_path / "r.jsonl"
    db.write_text("".join(json.dumps(r) + "\n" for r in rows))
    main(["--results-db", str(db), "--out", str(tmp_path / "rep")])
    csv = [row.split(",") for row in (tmp_path / "rep" / "distances.csv").read_text().splitlines()[1:]]
    for method, ratios in expected.items():
        got = [float(row[4]) for row in csv if row[0] == method]
        assert len(got) == len(ratios) and min(ratios) > 0
        torch.testing.assert_close(torch.tensor(got), torch.tensor(ratios), rtol=1e-5, atol=0)  # csv: 6 digits


def test_distances_of_the_soups_the_scripts_write(tmp_path, fmnist_root):
    """Recipes and soups as Learned-Soup+ and MEHL-Soup+ write them on a tiny zoo: the report reads them,
    and its distances equal the in-memory float64 computation."""
    from functools import partial

    import torch

    import learned_soup
    import MEHL_soup_layer
    from tests import helpers
    from tests.conftest import make_zoo
    from utils.files.state_dicts import load_state_dict
    zoo = make_zoo(tmp_path / "zoo", 3)
    argv = partial(helpers.argv, heldout=5, test_size=40, batch_size=None)
    learned_soup.main(argv(zoo, fmnist_root, tmp_path, "--layerwise", "--epochs", "1", name="learned"))
    MEHL_soup_layer.main(argv(zoo, fmnist_root, tmp_path, *helpers.QUICK["mehl"], name="mehl"))
    main(["--results-db", str(tmp_path / "results.jsonl"), "--out", str(tmp_path / "rep")])
    csv = [row.split(",") for row in (tmp_path / "rep" / "distances.csv").read_text().splitlines()[1:]]
    for stem, name in (("learned", "Learned-Soup+"), ("mehl", "MEHL-Soup+ seed 1")):
        recipe = json.loads((tmp_path / f"{stem}.recipe.json").read_text())
        ingredients = [load_state_dict(item["path"]) for item in recipe["ingredients"]]
        expected = in_memory_block_ratios(load_state_dict(tmp_path / f"{stem}.pt"), ingredients,
                                          recipe["coefficients"]["blocks"])
        got = [float(row[4]) for row in csv if row[0] == name]
        assert len(got) == len(expected) > 1
        torch.testing.assert_close(torch.tensor(got), torch.tensor(expected), rtol=1e-5, atol=0)
