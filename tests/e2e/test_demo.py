"""`finetune eval` and `finetune demo` on the shipped shapes world."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from finetune.demo.run import available_strategies


def test_eval_on_the_bare_base_never_sees_the_new_object(tmp_path):
    out = tmp_path / "bare.json"
    result = subprocess.run([sys.executable, "-m", "finetune", "eval", "--concept", "new_object", "--json", str(out)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    numbers = json.loads(out.read_text())
    assert numbers["concept_fidelity"] <= 0.1  # the base never drew a star
    assert numbers["base_accuracy"] >= 0.9 and numbers["prior_drop"] == 0.0
    assert "concept_fidelity" in result.stdout


def test_eval_names_an_unknown_concept():
    result = subprocess.run([sys.executable, "-m", "finetune", "eval", "--concept", "new_objet"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "new_object" in result.stderr


def test_demo_writes_the_report_in_the_promised_shape(tmp_path):
    from finetune.cli import main

    assert main(["demo", "--out", str(tmp_path), "--strategies", "lora,dreambooth", "--max-steps", "2",
                 "--base", "unet", "--full"]) == 0
    report = json.loads((tmp_path / "demo_report.json").read_text())
    assert isinstance(report["base_accuracy"], float) and report["full"] is True
    assert [(r["strategy"], r["concept_kind"], r["prior_preservation"]) for r in report["runs"]] == [
        ("lora", "new_object", True), ("lora", "known_look", True),
        ("dreambooth", "new_object", True), ("dreambooth", "known_look", True),
        ("dreambooth_no_prior", "new_object", False)]
    for run in report["runs"]:
        for key in ("concept_fidelity", "prompt_fidelity", "prior_drop", "seconds"):
            assert isinstance(run[key], float), key
        assert isinstance(run["concept"], str)
        assert all(Path(g).is_file() for g in run["grids"])
    assert Path(report["runs"][0]["artifact"]).is_file()  # a LoRA file
    assert (Path(report["runs"][2]["artifact"]) / "model_index.json").is_file()  # a DreamBooth pipeline
    markdown = (tmp_path / "demo_report.md").read_text()
    for row in ("| unet | lora | new_object |", "| unet | lora | known_look |", "| unet | dreambooth | new_object |",
                "| unet | dreambooth_no_prior | new_object |"):
        assert row in markdown
    # shortened: said at the top and in every judged row, never reported as a miss
    assert report["max_steps_override"] == 2 and all(run["steps"] == 2 for run in report["runs"])
    assert markdown.splitlines()[2].startswith("**Shortened run** (`--max-steps 2`)")
    assert "MISSED" not in markdown and markdown.count("not judged: shortened to 2 steps") == 3
    # demo_report.html: every run's before/after grids side by side, rows labelled, its figures under them
    import base64
    import re

    page = (tmp_path / "demo_report.html").read_text()
    inlined = [base64.b64decode(d) for d in re.findall(r'src="data:image/png;base64,([^"]+)"', page)]
    assert inlined == [Path(g).read_bytes() for run in report["runs"] for g in run["grids"]]
    assert page.count('<div class="pair">') == len(report["runs"])
    assert page.count('<span class="prompt">a red circle</span>') == 2 * len(report["runs"])
    # each run's validation curve (held-out concept images drawn by the shapes world, every 2 // 10 -> 1 step)
    assert all([step for step, _ in run["validation"]] == [1, 2] for run in report["runs"])
    assert page.count("Validation loss") == 2 * len(report["runs"])  # the chart's note and its title
    assert sorted(p.name for p in (tmp_path / "validation").iterdir()) == ["known_look", "new_object"]
    for run in report["runs"]:
        assert f"validation loss {run['validation'][0][1]:.4g} at step 1 -> " in markdown
        assert run["grid_prompts"][0] == run["concept"] and run["grid_images"] == 4
        assert f"<td class=\"n\">{run['concept_fidelity']:.3f}</td>" in page
        # each run's own folder keeps its figures, and its report.html shows them
        run_dir = Path(run["artifact"]).parent
        figures = json.loads((run_dir / "eval" / f"{run['concept_kind']}.json").read_text())
        assert figures["concept_fidelity"] == run["concept_fidelity"] and figures["by"] == "finetune demo"
        assert "<h2>Evaluation</h2>" in (run_dir / "report.html").read_text()


def test_quick_demo_runs_the_headline_alone_on_both_bases(tmp_path):
    from finetune.cli import main

    # the default is every base: the U-Net's recipe, then the transformer's (a tiny SD3 trained by flow matching)
    assert main(["demo", "--out", str(tmp_path), "--quick", "--max-steps", "1"]) == 0
    report = json.loads((tmp_path / "demo_report.json").read_text())
    assert report["quick"] is True
    assert [(r["strategy"], r["concept_kind"], r["base"]) for r in report["runs"]] == [
        ("lora", "new_object", "unet"), ("lora", "new_object", "transformer")]
    bases = report["bases"]
    assert set(bases) == {"unet", "transformer"} and report["base_accuracy"] == bases["unet"]["base_accuracy"]
    assert Path(bases["transformer"]["model"]).name == "transformer_base"
    assert bases["transformer"]["base_accuracy"] >= 0.95  # the shipped transformer base draws its 36 prompts
    unet_run, transformer_run = report["runs"]
    assert Path(transformer_run["artifact"]).parent == tmp_path / "runs" / "transformer-lora-new_object"
    # the transformer run trained the sd3 family's LoRA: a file SD3's own loader reads
    header = json.loads((Path(transformer_run["artifact"]).parent / "run.json").read_text())
    assert header["recipe"]["model"]["family"] == "sd3"
    markdown = (tmp_path / "demo_report.md").read_text()
    assert "Quick look (`--quick`)" in markdown
    assert "Transformer base's accuracy on its own 36 prompts" in markdown
    assert "| transformer | lora | new_object |" in markdown
    assert "lora on new_object, transformer base" in (tmp_path / "demo_report.html").read_text()
    assert main(["demo", "--out", str(tmp_path), "--quick", "--strategies", "dreambooth"]) == 2
    assert main(["demo", "--out", str(tmp_path), "--quick", "--full"]) == 2


def test_the_default_demo_runs_each_strategy_on_the_concept_its_targets_judge():
    from finetune.demo.run import BASES, VARIANTS, demo_pairs
    from finetune.demo.report import TARGETS
    from finetune.strategies import KINDS

    default = demo_pairs(BASES)
    assert [(base, strategy) for base, _, strategy, _, _ in default] == [(b, s) for b in BASES for s in KINDS]
    for base, label, strategy, concept, changes in default:
        assert label == strategy and not changes and (strategy, concept) in TARGETS  # a judged pair, no variant
    assert {(s, c) for _, _, s, c, _ in default} == {("lora", "new_object"), ("dreambooth", "new_object"),
                                                     ("textual_inversion", "known_look"),
                                                     ("hypernetwork", "known_look")}
    full = demo_pairs(BASES, full=True)
    assert len(full) == 2 * len(default) + len(VARIANTS)  # both concepts on each base, the variant on one
    assert demo_pairs(("transformer",), ["lora"], quick=False) == [("transformer", "lora", "lora", "new_object", [])]


def test_demo_refuses_an_unknown_strategy_or_base(tmp_path):
    from finetune.cli import main
    from finetune.demo.run import run_demo

    assert main(["demo", "--out", str(tmp_path), "--strategies", "lora,dreambooth-typo"]) == 2
    with pytest.raises(ValueError, match="--base: vit; one of unet, transformer"):
        run_demo(tmp_path, bases=("vit",))
    with pytest.raises(SystemExit):
        main(["demo", "--out", str(tmp_path), "--base", "vit"])
    assert not (tmp_path / "demo_report.json").exists()


@pytest.mark.parametrize("base", ["unet", "transformer"])
def test_every_strategy_has_demo_recipes_on_every_base(base):
    from finetune.recipe.load import load_recipe
    from finetune.demo.run import BASE_RECIPES
    from finetune.strategies import KINDS

    assert set(available_strategies(base)) == set(KINDS)  # every strategy is in the demo, on both concepts
    families = {load_recipe(path).model.family for path in BASE_RECIPES[base].glob("*.yaml")}
    assert families == {"auto" if base == "unet" else "sd3"}


def test_demo_seeds_runs_each_recipe_with_every_seed_and_judges_the_worst(tmp_path, monkeypatch):
    from finetune.cli import main
    from finetune.demo import run as demo

    # real training (one step a seed); the evaluation is replaced by figures that differ from seed to seed, so the
    # aggregates are checked against distinct values (and the test skips the slow sampling)
    figures = iter([(1.0, 0.9, 1.4), (0.75, 0.95, 4.2)])

    def fake_score(pipe, evaluator, concept, bare_accuracy, label=""):
        concept_fidelity, prompt_fidelity, drop = next(figures)
        return {"concept_fidelity": concept_fidelity, "prompt_fidelity": prompt_fidelity, "prior_drop": drop,
                "base_accuracy_after": bare_accuracy - drop / 100}

    monkeypatch.setattr(demo, "score", fake_score)
    monkeypatch.setattr(demo.metrics, "base_vocabulary_accuracy", lambda pipe, evaluator: 0.97)
    assert main(["demo", "--out", str(tmp_path), "--quick", "--max-steps", "1", "--seeds", "2", "--base", "unet"]) == 0
    report = json.loads((tmp_path / "demo_report.json").read_text())
    assert report["seeds"] == 2
    runs = report["runs"]
    assert [(r["strategy"], r["concept_kind"], r["seed"], r["base"]) for r in runs] == [
        ("lora", "new_object", 0, "unet"), ("lora", "new_object", 1, "unet")]
    # each seed trained its own run (the recipe each ran records its seed; the LoRA files differ)
    assert [json.loads((Path(r["artifact"]).parent / "run.json").read_text())["recipe"]["train"]["seed"]
            for r in runs] == [0, 1]
    assert Path(runs[0]["artifact"]).read_bytes() != Path(runs[1]["artifact"]).read_bytes()
    assert len({g for r in runs for g in r["grids"]}) == 4  # each seed's grids, none overwritten
    assert Path(runs[0]["grids"][0]).read_bytes() == Path(runs[1]["grids"][0]).read_bytes()  # the same base
    [entry] = report["aggregates"]
    assert (entry["strategy"], entry["concept_kind"], entry["base"], entry["seeds"]) == ("lora", "new_object",
                                                                                           "unet", [0, 1])
    assert [r["concept_fidelity"] for r in runs] == [1.0, 0.75]
    for figure, worst in (("concept_fidelity", min), ("prompt_fidelity", min), ("prior_drop", max)):
        values = [r[figure] for r in runs]
        assert entry[figure]["mean"] == pytest.approx(sum(values) / 2)
        assert (entry[figure]["min"], entry[figure]["max"]) == (min(values), max(values))
        assert entry[figure]["worst"] == worst(values)
    markdown = (tmp_path / "demo_report.md").read_text()
    assert "judged on the worst seed" in markdown
    assert "| lora | new_object | 2 | 0.875 / 0.750 | 0.925 / 0.900 | 2.8 / 4.2 | not judged: shortened" in markdown
    page = (tmp_path / "demo_report.html").read_text()
    assert "<h2>Over 2 seeds</h2>" in page and page.count('<div class="pair">') == 2
    assert "lora on new_object, unet base, seed 1" in page


def test_one_seed_is_seed_zero_in_the_folders_of_a_demo_without_seeds(tmp_path):
    from finetune.cli import main

    assert main(["demo", "--out", str(tmp_path), "--quick", "--max-steps", "1", "--seeds", "0"]) == 2
    assert main(["demo", "--out", str(tmp_path), "--quick", "--max-steps", "1", "--base", "unet"]) == 0
    report = json.loads((tmp_path / "demo_report.json").read_text())
    [run] = report["runs"]
    assert (run["seed"], run["base"], report["seeds"]) == (0, "unet", 1)
    assert Path(run["artifact"]).parent == tmp_path / "runs" / "lora-new_object"
    assert [Path(g).name for g in run["grids"]] == ["lora-new_object-before.png", "lora-new_object-after.png"]
    assert "<h2>Over" not in (tmp_path / "demo_report.html").read_text()
    assert "judged on the worst seed" not in (tmp_path / "demo_report.md").read_text()


def _run(seed: int, concept: float, prompt: float, drop: float) -> dict:
    return {"strategy": "lora", "concept_kind": "new_object", "concept": "a sks", "base": "unet", "seed": seed,
            "concept_fidelity": concept, "prompt_fidelity": prompt, "prior_drop": drop, "seconds": 1.0,
            "steps": 300, "prior_preservation": True, "artifact": "", "grids": ["before.png", "after.png"]}


def test_targets_are_judged_on_the_worst_seed(tmp_path):
    from finetune.demo.page import build_demo_page
    from finetune.demo.report import aggregate, write_markdown

    # seed 0 meets every target; seed 1 misses concept fidelity, seed 2 the drop; the means would all pass
    runs = [_run(0, 1.0, 1.0, 0.0), _run(1, 0.78, 0.96, 2.8), _run(2, 1.0, 0.9, 5.6)]
    [entry] = aggregate(runs)
    assert entry["concept_fidelity"] == pytest.approx({"mean": 2.78 / 3, "min": 0.78, "max": 1.0, "worst": 0.78})
    assert entry["prompt_fidelity"]["worst"] == 0.9 and entry["prior_drop"]["worst"] == 5.6
    assert entry["prior_drop"]["mean"] == pytest.approx(8.4 / 3) and entry["prior_drop"]["min"] == 0.0
    assert entry["targets"] == {"concept_fidelity": False, "prompt_fidelity": True, "prior_drop": False}
    assert all(aggregate(runs[:1])[0]["targets"].values())
    report = {"base_accuracy": 0.97, "seeds": 3, "runs": runs, "aggregates": [entry], "full": False}
    write_markdown(tmp_path / "demo_report.md", report)
    assert "`finetune demo --full` also runs the other concept" in (tmp_path / "demo_report.md").read_text()
    row = next(line for line in (tmp_path / "demo_report.md").read_text().splitlines()
               if line.startswith("| unet | lora | new_object | 3 |"))
    assert row == ("| unet | lora | new_object | 3 | 0.927 / 0.780 | 0.953 / 0.900 | 2.8 / 5.6 | concept_fidelity MISSED, "
                   "prompt_fidelity ok, prior_drop MISSED |")
    page = build_demo_page(tmp_path, report)
    assert "<td>0.927 / 0.780</td>" in page and "<td>2.800 / 5.600</td>" in page
    assert "concept_fidelity MISSED, prompt_fidelity ok, prior_drop MISSED" in page


def test_the_demo_page_finds_its_grids_with_a_relative_out(tmp_path, monkeypatch):
    import base64
    import re

    from finetune.cli import main
    from finetune.demo import run as demo

    # the default --out is the relative demo_output; the figures are faked (the page is what is tested here)
    monkeypatch.setattr(demo, "score", lambda pipe, evaluator, concept, bare_accuracy, label="": {
        "concept_fidelity": 0.5, "prompt_fidelity": 0.5, "prior_drop": 0.0, "base_accuracy_after": bare_accuracy})
    monkeypatch.setattr(demo.metrics, "base_vocabulary_accuracy", lambda pipe, evaluator: 0.97)
    monkeypatch.chdir(tmp_path)
    assert main(["demo", "--out", "demo_output", "--quick", "--max-steps", "1", "--base", "unet"]) == 0
    out = tmp_path / "demo_output"
    grids = [out / "lora-new_object-before.png", out / "lora-new_object-after.png"]

    def check(page: str) -> None:
        assert "is missing" not in page
        inlined = [base64.b64decode(d) for d in re.findall(r'src="data:image/png;base64,([^"]+)"', page)]
        assert inlined == [g.read_bytes() for g in grids]
        assert 'href="runs/lora-new_object/report.html"' in page  # the run's own page, linked

    check((out / "demo_report.html").read_text())
    # `finetune report` rebuilds it from elsewhere, and after the folder moved
    moved = tmp_path / "elsewhere" / "moved"
    moved.parent.mkdir()
    out.rename(moved)
    monkeypatch.chdir(moved.parent)
    assert main(["report", str(moved)]) == 0
    grids = [moved / g.name for g in grids]
    check((moved / "demo_report.html").read_text())


def test_the_demos_validation_leaves_its_training_bit_identical(tmp_path):
    """The demo scores every run on held-out images; its figures must stay those of the recipes as shipped."""
    import torch
    from safetensors.torch import load_file

    from finetune.demo.run import RECIPES, validation_curve, validation_overrides
    from finetune.recipe.load import load_recipe
    from finetune.training.loop import train
    from tests.helpers import history_of, reset_accelerate

    recipe = RECIPES / "lora_new_object.yaml"
    short = ["train.max_steps=3"]
    plain = train(load_recipe(recipe, [f"output_dir={tmp_path / 'plain'}", *short]))
    reset_accelerate()
    overrides = validation_overrides(tmp_path, "new_object", 3)
    assert overrides[1] == "validation.every=1"
    scored = train(load_recipe(recipe, [f"output_dir={tmp_path / 'scored'}", *short, *overrides]))
    assert history_of(tmp_path / "plain") == history_of(tmp_path / "scored")
    a, b = load_file(plain), load_file(scored)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    curve = validation_curve(str(tmp_path / "scored"))
    assert [step for step, _ in curve] == [1, 2, 3] and all(v > 0 for _, v in curve)
    assert validation_curve(str(tmp_path / "plain")) == []
