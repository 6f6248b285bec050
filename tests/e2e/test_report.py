"""A run's report (issue 23): history.jsonl survives a resume without duplicate or missing steps; report.html
holds the curves, every sample grid with its prompts and the evaluation figures, reloads itself only while the
run goes on, and is rebuilt from the folder alone (old runs without history.jsonl included); the page renders in
a real headless browser where one is installed."""
from __future__ import annotations

import base64
import json
import re
import shutil
from pathlib import Path

import pytest

from finetune.recipe.load import parse_recipe
from finetune.report import charts
from finetune.report.history import read_history
from finetune.training.loop import train
from tests.helpers import recipe_dict

PROMPTS = ["a purple sks", "a red <circle> & co"]  # the second checks that labels are escaped
SAMPLES = {"every": 2, "prompts": PROMPTS, "steps": 2, "images_per_prompt": 2, "seed": 5}
FIGURES = {"concept": "a sks", "concept_kind": "new_object", "concept_fidelity": 0.875, "prompt_fidelity": 0.625,
           "prior_drop": 1.5, "base_accuracy": 0.98}


class Crash(RuntimeError):
    pass


def _lines(out: Path) -> list[dict]:
    """history.jsonl as written, every line parsed (a line that does not parse fails the test)."""
    return [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]


def _page(out: Path) -> str:
    return (out / "report.html").read_text()


def test_history_survives_a_crash_and_a_resume_without_duplicate_or_missing_steps(tiny_base, concept_dir, tmp_path):
    run = {"max_steps": 6, "lr_scheduler": "linear"}
    full = tmp_path / "full"
    train(parse_recipe(recipe_dict(tiny_base, concept_dir, full, train=run)))
    uninterrupted = _lines(full)
    assert [r["step"] for r in uninterrupted] == [1, 2, 3, 4, 5, 6]
    for record in uninterrupted:
        assert record["seconds_per_step"] > 0 and record["samples_per_second"] > 0 and record["elapsed"] > 0
        assert record["peak_memory_bytes"] is None  # a CPU reports none
    assert uninterrupted[-1]["lr"] < uninterrupted[0]["lr"]  # the linear schedule, as the loop ran it

    out = tmp_path / "part"
    recipe = parse_recipe(recipe_dict(tiny_base, concept_dir, out, train=run, checkpoint={"every": 2}))

    def crash_in_step_5(step: int) -> None:
        if step == 5:
            raise Crash("power cut in step 5")

    with pytest.raises(Crash):
        train(recipe, on_step=crash_in_step_5)
    assert [r["step"] for r in _lines(out)] == [1, 2, 3, 4]  # checkpoint at 4 (every 2)
    state = json.loads((out / "run.json").read_text())
    assert state["state"] == "stopped" and "power cut in step 5" in state["reason"]
    assert "http-equiv=\"refresh\"" not in _page(out) and "Stopped after step 4 of 6: power cut" in _page(out)
    with (out / "history.jsonl").open("a") as handle:
        handle.write('{"step": 5, "loss": 0.1')  # the line a crash cut short
    assert [r["step"] for r in read_history(out)] == [1, 2, 3, 4]

    (out / "checkpoints" / "step-000004").rename(out / "checkpoints" / "gone")  # resume from 2: steps 3, 4 again
    train(recipe, resume="latest")
    resumed = _lines(out)
    assert [r["step"] for r in resumed] == [1, 2, 3, 4, 5, 6]
    # a resumed CPU run repeats the uninterrupted one exactly, so its history does too
    assert [(r["loss"], r["lr"]) for r in resumed] == [(r["loss"], r["lr"]) for r in uninterrupted]
    assert json.loads((out / "run.json").read_text())["state"] == "finished"


def test_the_page_moves_without_sample_grids(tiny_base, concept_dir, tmp_path, monkeypatch):
    from finetune.report import live

    # no sample grids (as the Flux recipes ship): the page is rewritten at each checkpoint ...
    out = tmp_path / "checkpointed"
    seen = {}

    def look(step: int) -> None:  # called as step `step` ends, before its own history line
        seen[step] = _page(out)

    train(parse_recipe(recipe_dict(tiny_base, concept_dir, out, checkpoint={"every": 2})), on_step=look)
    assert "Running: step 2 of 4" in seen[3] and "Running: step 2 of 4" in seen[4]
    # ... and every REWRITE_SECONDS between them (0 here: after every step), run.json with it
    monkeypatch.setattr(live, "REWRITE_SECONDS", 0.0)
    out = tmp_path / "timed"
    seen.clear()

    def look_at_both(step: int) -> None:
        seen[step] = (_page(out), json.loads((out / "run.json").read_text())["updated"])

    train(parse_recipe(recipe_dict(tiny_base, concept_dir, out)), on_step=look_at_both)
    # a log point reads the losses one step late (training/loop.py): as step n ends, step n - 2 is on the page
    assert [f"Running: step {step - 2} of 4" in seen[step][0] for step in (3, 4)] == [True] * 2
    assert seen[3][1] < seen[4][1]


@pytest.fixture(scope="module")
def sampled_run(tiny_base, concept_dir, tmp_path_factory):
    """A 4-step LoRA run with sample grids at steps 2 and 4 and a checkpoint at 2; the page as it was while the
    run went on (read in step 3) is kept in running.html."""
    from tests.helpers import reset_accelerate

    out = tmp_path_factory.mktemp("report") / "run"
    recipe = parse_recipe(recipe_dict(tiny_base, concept_dir, out, sample=SAMPLES, checkpoint={"every": 2}))

    def look_in_step_3(step: int) -> None:
        if step == 3:
            shutil.copy(out / "report.html", out.parent / "running.html")

    artifact = train(recipe, on_step=look_in_step_3)
    reset_accelerate()
    return out, artifact


def test_the_page_holds_curves_every_sample_grid_with_its_prompts_and_the_figures(sampled_run):
    from finetune.report.evaluations import save_evaluation

    out, artifact = sampled_run
    figures_file, page_file = save_evaluation(artifact, "new_object", FIGURES, by="finetune eval")
    assert figures_file == out.resolve() / "eval" / "new_object.json" and page_file == out / "report.html"
    page = _page(out)
    assert page.count("<svg") == 3  # loss, learning rate, seconds per step: inline, nothing fetched
    for label in ("Loss", "smoothed (EMA 0.9)", "Learning rate", "Seconds per step (the step alone)"):
        assert f"<!-- {label} -->" in page
    assert not re.search(r"(src|href)=\"(https?:)?//", page)
    # every grid, in step order, the PNG's own bytes inlined
    inlined = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    grids = sorted((out / "samples").glob("step-*.png"))
    assert [p.name for p in grids] == ["step-000002.png", "step-000004.png"]
    assert [base64.b64decode(data) for data in inlined] == [p.read_bytes() for p in grids]
    assert page.index("step 2 (step-000002.png)") < page.index("step 4 (step-000004.png)")
    # each row labelled with its prompt and seed, each column with its image; 32 px shown at 128 px, pixelated
    assert page.count('<span class="prompt">a purple sks</span><span class="note">seed 5</span>') == 2
    assert page.count('<span class="prompt">a red &lt;circle&gt; &amp; co</span><span class="note">seed 6</span>') == 2
    assert page.count('<div class="col">image 2</div>') == 2 and "repeat(2,128px)" in page
    assert "image-rendering:pixelated" in page
    # figures, data, files with sizes and readers, the recipe
    assert "<td class=\"n\">0.875</td>" in page and "finetune eval" in page
    assert "data: 4 image(s), 4 samples per epoch with their repeats" in page
    assert re.search(r"<code>pytorch_lora_weights\.safetensors</code></td><td class=\"n\">[\d.]+ KB</td><td>LoRA "
                     r"\(diffusers/peft format\); read by", page)
    assert "<code>history.jsonl</code>" in page and "from run.json" in page and "images_per_prompt: 2" in page
    assert "Finished: 4 steps" in page and "http-equiv=\"refresh\"" not in page
    assert "not reported on cpu" in page


def test_the_page_reloads_itself_while_the_run_goes_on(sampled_run):
    out, _ = sampled_run
    running = (out.parent / "running.html").read_text()  # written at the sample step 2, read in step 3
    assert '<meta http-equiv="refresh" content="30">' in running
    assert "Running: step 2 of 4, about" in running and "to go" in running and "<th>ETA</th>" in running
    assert running.count("data:image/png") == 1


def test_finetune_report_rebuilds_the_same_page_from_the_folder_alone(sampled_run, capsys):
    from finetune.cli import main

    out, _ = sampled_run
    written = _page(out)
    (out / "report.html").unlink()
    assert main(["report", str(out)]) == 0
    assert f"wrote {out / 'report.html'}" in capsys.readouterr().out
    assert _page(out) == written


def test_a_run_made_before_history_jsonl_still_gets_a_page(sampled_run, tmp_path):
    from finetune.cli import main

    old = tmp_path / "old run"
    shutil.copytree(sampled_run[0], old)
    for name in ("history.jsonl", "run.json", "report.html"):
        (old / name).unlink()
    shutil.rmtree(old / "eval", ignore_errors=True)  # figures another test may have added
    assert main(["report", str(old)]) == 0
    page = _page(old)
    assert "this folder has no history.jsonl" in page and "<svg" not in page
    assert "from checkpoints/step-000002/state.json" in page  # the recipe, and so the grids' labels
    assert page.count("data:image/png") == 2 and page.count('<span class="prompt">a purple sks</span>') == 2
    assert "<code>pytorch_lora_weights.safetensors</code>" in page and "Finished: 4 steps" in page

    shutil.rmtree(old / "checkpoints")  # then the artifact's header is all that holds the recipe
    assert main(["report", str(old)]) == 0
    assert "from the header of pytorch_lora_weights.safetensors" in _page(old)
    assert _page(old).count('<span class="prompt">a purple sks</span>') == 2


def test_finetune_report_on_a_folder_that_is_not_a_run(tmp_path, capsys):
    from finetune.cli import main

    (tmp_path / "photos").mkdir()
    assert main(["report", str(tmp_path / "photos")]) == 2
    assert "not a run folder" in capsys.readouterr().err
    assert main(["report", str(tmp_path / "nowhere")]) == 2
    assert "no such folder" in capsys.readouterr().err


def test_finetune_eval_keeps_its_figures_in_the_run(sampled_run, monkeypatch, capsys):
    from finetune.cli import main
    from finetune.shapes import evaluate

    out, artifact = sampled_run
    monkeypatch.setattr(evaluate, "evaluate", lambda base, adapter, concept: {**FIGURES, "concept_fidelity": 0.25})
    assert main(["eval", "--adapter", str(artifact), "--concept", "known_look"]) == 0
    assert "shown in" in capsys.readouterr().out
    assert json.loads((out / "eval" / "known_look.json").read_text())["concept_fidelity"] == 0.25
    assert "<td>known_look</td>" in _page(out) and "<td class=\"n\">0.250</td>" in _page(out)


def test_charts_draw_every_step_and_smooth_without_bias():
    losses = [1.0, 0.5, 0.75, 0.25, 0.5]
    assert charts.smoothed([2.0, 2.0, 2.0]) == pytest.approx([2.0, 2.0, 2.0])  # debiased: no pull towards 0
    svg = charts.loss_chart([1, 2, 3, 4, 5], losses)
    lines = [d for d in re.findall(r' d="(M [^"]*)"', svg) if "Q" not in d and "z" not in d]  # not glyphs
    assert sum(len(re.findall(r"[ML] [\d.]+ [\d.]+", d)) == len(losses) for d in lines) == 2  # raw and smoothed
    assert svg != charts.loss_chart([1, 2, 3, 4, 5], losses[::-1])


def test_the_page_renders_in_a_headless_browser(sampled_run, tmp_path):
    from benchmarks.render_report import find_browser, main

    if find_browser() is None:
        pytest.skip("no headless browser installed (apt-get install chromium); the page is not rendered here")
    from PIL import Image, ImageStat

    shot = tmp_path / "shot.png"
    assert main([str(sampled_run[0]), "--out", str(shot), "--height", "1600"]) == 0
    with Image.open(shot) as image:
        assert image.size == (1280, 1600)
        assert max(ImageStat.Stat(image.convert("L")).stddev) > 10  # something is drawn, not a blank page


def test_a_run_that_starts_anew_drops_the_figures_of_the_artifact_it_replaces(tiny_base, concept_dir, tmp_path):
    from finetune.report.evaluations import save_evaluation

    recipe = parse_recipe(recipe_dict(tiny_base, concept_dir, tmp_path / "out", train={"max_steps": 1}))
    save_evaluation(train(recipe), "new_object", FIGURES, by="finetune eval")
    assert "<h2>Evaluation</h2>" in _page(tmp_path / "out")
    train(recipe, overwrite=True)
    assert not (tmp_path / "out" / "eval").exists() and "<h2>Evaluation</h2>" not in _page(tmp_path / "out")


def test_peak_memory_is_what_the_device_reports(monkeypatch):
    import torch

    from finetune.report.live import peak_memory

    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: 3 * 2**30)
    assert peak_memory(torch.device("cuda", 0)) == 3 * 2**30
    assert peak_memory(torch.device("cpu")) is None


def test_finetune_report_rebuilds_a_demo_page_from_its_folder(tmp_path):
    from PIL import Image

    from finetune.cli import main

    prompts = ["a sks", "a red sks", "a red circle"]
    grids = []
    for label, colour in (("before", "white"), ("after", "red")):
        grids.append(tmp_path / f"lora-new_object-{label}.png")
        Image.new("RGB", (4 * 32, 3 * 32), colour).save(grids[-1])
    run = {"strategy": "lora", "concept_kind": "new_object", "concept": "a sks", "concept_fidelity": 0.5,
           "prompt_fidelity": 0.25, "prior_drop": 2.0, "seconds": 12.3, "steps": 2, "prior_preservation": True,
           "artifact": str(tmp_path / "runs" / "x" / "pytorch_lora_weights.safetensors"),
           "grids": [str(g) for g in grids], "grid_prompts": prompts, "grid_images": 4, "grid_seed": 7}
    (tmp_path / "demo_report.json").write_text(json.dumps(
        {"base_accuracy": 0.98, "max_steps_override": 2, "quick": False, "runs": [run]}))
    assert main(["report", str(tmp_path)]) == 0
    page = (tmp_path / "demo_report.html").read_text()
    inlined = [base64.b64decode(d) for d in re.findall(r'src="data:image/png;base64,([^"]+)"', page)]
    assert inlined == [g.read_bytes() for g in grids]  # before, then after, side by side
    assert page.index("before (the base)") < page.index("after (tuned)") and '<div class="pair">' in page
    assert page.count('<span class="prompt">a red circle</span>') == 2 and "repeat(4,96px)" in page
    assert '<td class="n">0.500</td>' in page and "not judged: shortened to 2 steps" in page
    assert "Shortened run (--max-steps 2)" in page and "http-equiv" not in page
    assert page.index("<img") < page.index("concept_fidelity")  # the figures under the grids
