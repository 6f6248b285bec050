"""`finetune eval` and `finetune demo` on the shipped shapes world."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


from finetune.shapes.demo import available_strategies


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

    assert main(["demo", "--out", str(tmp_path), "--strategies", "lora,dreambooth", "--max-steps", "2"]) == 0
    report = json.loads((tmp_path / "demo_report.json").read_text())
    assert isinstance(report["base_accuracy"], float)
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
    for row in ("| lora | new_object |", "| lora | known_look |", "| dreambooth | new_object |",
                "| dreambooth_no_prior | new_object |"):
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
    for run in report["runs"]:
        assert run["grid_prompts"][0] == run["concept"] and run["grid_images"] == 4
        assert f"<td class=\"n\">{run['concept_fidelity']:.3f}</td>" in page
        # each run's own folder keeps its figures, and its report.html shows them
        run_dir = Path(run["artifact"]).parent
        figures = json.loads((run_dir / "eval" / f"{run['concept_kind']}.json").read_text())
        assert figures["concept_fidelity"] == run["concept_fidelity"] and figures["by"] == "finetune demo"
        assert "<h2>Evaluation</h2>" in (run_dir / "report.html").read_text()


def test_quick_demo_runs_the_headline_alone(tmp_path):
    from finetune.cli import main

    assert main(["demo", "--out", str(tmp_path), "--quick", "--max-steps", "1"]) == 0
    report = json.loads((tmp_path / "demo_report.json").read_text())
    assert report["quick"] is True
    assert [(r["strategy"], r["concept_kind"]) for r in report["runs"]] == [("lora", "new_object")]
    assert "Quick look (`--quick`)" in (tmp_path / "demo_report.md").read_text()
    assert main(["demo", "--out", str(tmp_path), "--quick", "--strategies", "dreambooth"]) == 2


def test_demo_refuses_an_unknown_strategy(tmp_path):
    from finetune.cli import main

    assert main(["demo", "--out", str(tmp_path), "--strategies", "lora,dreambooth-typo"]) == 2
    assert not (tmp_path / "demo_report.json").exists()


def test_every_strategy_so_far_has_demo_recipes():
    from finetune.strategies import KINDS

    assert set(available_strategies()) == set(KINDS)  # every strategy is in the demo, on both concepts
