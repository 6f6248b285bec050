"""Files that cannot be read or written end in one message naming them (finetune/file_errors.py), with the errors
the libraries really raise: a real small (or read-only) tmpfs where the machine lets us mount one, safetensors'
own SafetensorError and torch.save's own RuntimeError, and real files cut short."""
from __future__ import annotations

import errno
import io
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from finetune.cli import main
from finetune.file_errors import FileProblem, error_number, writing
from finetune.io.pickle_files import UnsafePickleError, load_plain_pickle, write_pickle_atomically
from finetune.io.safetensors_io import read_header, read_metadata, read_safetensors, save_safetensors
from finetune.training import checkpoint
from finetune.training.failures import SaveFailed, saving
from finetune.training.resume import load_for_resume
from tests.bad_inputs import Workspace, _cut_in_half, _half_lora
from tests.helpers import mount_tmpfs

BIG = {"weight": torch.ones(64, 1024)}  # 256 KiB: more than the small disk holds


def test_a_real_full_disk_names_the_file_and_leaves_nothing(small_disk):
    with pytest.raises(FileProblem, match="no room left on the disk while writing the file") as raised:
        save_safetensors(BIG, small_disk / "a.safetensors")
    assert str(small_disk / "a.safetensors") in str(raised.value) and raised.value.errno == errno.ENOSPC
    with pytest.raises(FileProblem, match="no room left on the disk") as raised:
        write_pickle_atomically(BIG, small_disk / "b.pt")
    assert raised.value.errno == errno.ENOSPC
    assert list(small_disk.iterdir()) == []


def test_a_real_full_disk_mid_checkpoint_keeps_the_last_one_and_says_how_to_go_on(small_disk):
    small = {"weight": torch.ones(4, 4)}
    checkpoint.save_checkpoint(small_disk, 1, small, {"optimizer": {}}, {"train": {}}, keep=3)
    with pytest.raises(SaveFailed) as raised, saving("a checkpoint", 2, "finetune train r.yaml --resume latest",
                                                     small_disk):
        checkpoint.save_checkpoint(small_disk, 2, BIG, {"optimizer": {}}, {"train": {}}, keep=3)
    message = str(raised.value)
    assert "no room left on the disk while writing a checkpoint at step 2" in message
    assert f"({small_disk / 'checkpoints' / 'step-000002'})" in message  # the checkpoint, not its temporary
    assert "step-000001, is kept" in message and "finetune train r.yaml --resume latest" in message
    assert [p.name for p in (small_disk / "checkpoints").iterdir()] == ["step-000001"]
    assert checkpoint.checkpoint_problem(small_disk / "checkpoints" / "step-000001") is None


def test_torch_save_reports_a_full_disk_only_through_a_file_object(small_disk):
    """Given a file name, torch.save (2.x) says only "unexpected pos"; through a Python file object the OSError
    it met comes out, itself or in the context of its RuntimeError, which is why finetune's writers hand it one."""
    with pytest.raises(RuntimeError) as by_name:
        torch.save(BIG, small_disk / "by-name.pt")
    assert error_number(by_name.value) is None
    with open(small_disk / "by-object.pt", "wb", buffering=0) as handle:
        with pytest.raises((OSError, RuntimeError)) as by_object:
            torch.save(BIG, handle)
    assert error_number(by_object.value) == errno.ENOSPC


def test_a_read_only_disk_names_the_file(read_only_disk):
    with pytest.raises(FileProblem, match="cannot write the file to .*Read-only file system"):
        save_safetensors(BIG, read_only_disk / "a.safetensors")


def test_a_read_only_finetune_cache_is_refused_before_the_model_loads(read_only_disk, tiny_base, concept_dir,
                                                                     tmp_path, monkeypatch):
    """On a CPU, cache.offload writes a scratch file under $FINETUNE_CACHE (the run used to stop there, after
    the model had loaded)."""
    from finetune.recipe.load import RecipeError, load_recipe
    from finetune.training.engine import has_accelerator
    from tests.helpers import recipe_dict
    import yaml

    if has_accelerator():
        pytest.skip("on an accelerator idle parts go to RAM, not to a scratch file")
    monkeypatch.setenv("FINETUNE_CACHE", str(read_only_disk))
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe_dict(tiny_base, concept_dir, tmp_path / "out")))
    with pytest.raises(RecipeError, match="cache.offload keeps .* in a scratch file in .*cannot be written.*"
                                          "cache.offload: false"):
        load_recipe(str(path), [])
    load_recipe(str(path), ["cache.offload=false"])


def test_safetensors_own_error_on_a_full_disk_is_recognised(tmp_path, monkeypatch):
    """The exception safetensors 0.8 raises on ENOSPC (seen on a real tmpfs), constructed as it is."""
    from finetune.io import safetensors_io

    def full(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\0" * 10)
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(safetensors_io, "save_file", full)
    with pytest.raises(FileProblem, match="no room left") as raised:
        save_safetensors(BIG, tmp_path / "a.safetensors")
    assert raised.value.errno == errno.ENOSPC and list(tmp_path.iterdir()) == []


def test_torch_saves_own_error_on_a_full_disk_is_recognised():
    class FullDisk(io.BytesIO):
        def write(self, data):
            if self.tell() + len(data) > 1000:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return super().write(data)

    with pytest.raises(FileProblem, match="no room left on the disk while writing the state"):
        with writing("state.pt", "the state"):
            torch.save(BIG, FullDisk())


def test_errors_that_are_not_about_files_keep_their_traceback():
    with pytest.raises(RuntimeError, match="size mismatch"), writing("x", "the file"):
        raise RuntimeError("size mismatch for weight")


@pytest.mark.parametrize("keep", [0.5, 0.99, 10])
def test_every_reader_names_a_file_cut_short(tmp_path, keep):
    path = tmp_path / "a.safetensors"
    save_file({"weight": torch.ones(8, 8)}, str(path), metadata={"k": "v"})
    os.truncate(path, int(path.stat().st_size * keep) if keep < 1 else keep)
    for read in (read_header, read_metadata, read_safetensors):
        with pytest.raises(FileProblem, match=f"{path} is cut short or damaged .*download or copy it again"):
            read(path)
    pt = tmp_path / "a.pt"
    torch.save({"weight": torch.ones(8, 8)}, pt)
    os.truncate(pt, int(pt.stat().st_size * keep) if keep < 1 else keep)
    with pytest.raises(FileProblem, match=f"{pt} is cut short or damaged"):
        load_plain_pickle(pt, "embedding")


def test_a_whole_unsafe_pickle_is_still_refused_as_unsafe(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"x": Path("/")}, path)  # rebuilding a Path needs more than plain data
    with pytest.raises(UnsafePickleError):
        load_plain_pickle(path, "embedding")


def _checkpoints(root: Path, steps=(1, 2, 3)) -> Path:
    for step in steps:
        checkpoint.save_checkpoint(root, step, {"w": torch.full((4,), float(step))}, {"optimizer": {"s": step}},
                                   {"train": {}}, keep=5)
    return root / "checkpoints"


@pytest.mark.parametrize("damage, says", [
    (lambda c: _cut_in_half(c / "trainable.safetensors"), "trainable.safetensors is cut short or damaged"),
    (lambda c: _cut_in_half(c / "training_state.pt"), "training_state.pt is cut short or damaged"),
    (lambda c: (c / "state.json").unlink(), "it has no state.json"),
    (lambda c: (c / "state.json").write_text('{"step": 3, "rec'), "its state.json is cut short or damaged"),
])
def test_a_damaged_checkpoint_is_named_and_the_newest_good_one_offered(tmp_path, damage, says):
    folders = _checkpoints(tmp_path)
    damage(folders / "step-000003")
    newest = checkpoint.find_checkpoint(tmp_path, "latest")
    assert newest == folders / "step-000003"  # not skipped in silence
    with pytest.raises(checkpoint.CheckpointError) as raised:
        load_for_resume(newest, "r.yaml", ["output_dir=o u t"])
    message = str(raised.value)
    assert f"checkpoint {newest} is damaged: " in message and says in message
    assert f"finetune train r.yaml 'output_dir=o u t' --resume {folders / 'step-000002'}" in message
    assert load_for_resume(folders / "step-000002", "r.yaml")[0]["step"] == 2


def test_with_no_good_checkpoint_left_a_new_start_is_offered(tmp_path):
    folders = _checkpoints(tmp_path, steps=(1,))
    _cut_in_half(folders / "step-000001" / "trainable.safetensors")
    with pytest.raises(checkpoint.CheckpointError, match="No good checkpoint is left.*finetune train r.yaml "
                                                         "--overwrite"):
        load_for_resume(folders / "step-000001", "r.yaml")


def test_a_latent_cache_entry_cut_short_is_named_and_encoded_again(tmp_path, caplog):
    from finetune.data.caches import LatentStore

    store = LatentStore(tmp_path / "cache")
    mean, std = torch.randn(4, 4, 4), torch.rand(4, 4, 4)
    store.put("ab" * 20, mean, std)
    entry = store._path("ab" * 20)
    _cut_in_half(entry)
    with caplog.at_level(logging.WARNING):
        assert "ab" * 20 not in store
    assert f"latent cache entry {entry} is cut short or damaged" in caplog.text and "encoding it again" in caplog.text
    store.put("ab" * 20, mean, std)  # what fill does for an entry not in the store
    got_mean, got_std = store.get(["ab" * 20])
    assert torch.equal(got_mean[0], mean) and torch.equal(got_std[0], std)
    _cut_in_half(entry)  # damaged after fill looked: a clear error, not a traceback
    with pytest.raises(FileProblem, match="cut short or damaged .*delete it"):
        store.get(["ab" * 20])


@pytest.fixture
def half_lora(tiny_base, tmp_path, monkeypatch, capsys) -> Path:
    half = _half_lora(Workspace(tmp_path, tiny_base, monkeypatch))
    capsys.readouterr()
    return half


@pytest.mark.parametrize("argv", [
    ["inspect", "{half}"],
    ["convert", "{half}", "{tmp}/k.safetensors", "--to", "kohya"],
    ["merge", "--base", "{base}", "--lora", "{half}:0.5", "--out", "{tmp}/m.safetensors"],
], ids=lambda argv: argv[0])
def test_the_tools_name_a_lora_file_cut_short(argv, half_lora, tiny_base, tmp_path, capsys, monkeypatch):
    from finetune.models.stable_diffusion import StableDiffusion

    monkeypatch.setattr(StableDiffusion, "load", lambda *a, **k: pytest.fail("the base loaded first"))
    argv = [a.format(half=half_lora, tmp=tmp_path, base=tiny_base) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"error: file {half_lora} is cut short or damaged" in err and "download or copy it again" in err
    assert not list(tmp_path.glob("*k.safetensors")) and not list(tmp_path.glob("m.safetensors"))


def test_inspect_names_an_a1111_embedding_cut_short(tmp_path, capsys):
    from finetune.export.textual_inversion import save_a1111_pt

    path = _cut_in_half(save_a1111_pt(torch.randn(2, 32), tmp_path / "emb.pt", "<sks>", 10, "base"))
    assert main(["inspect", str(path)]) == 2
    assert f"{path} is cut short or damaged" in capsys.readouterr().err


def test_inspect_into_a_closed_pipe_stops_quietly(half_lora, tmp_path):
    """`finetune inspect FILE | head`: the reader is gone before inspect writes; no BrokenPipe traceback."""
    whole = tmp_path / "lora-run" / "pytorch_lora_weights.safetensors"
    read_end, write_end = os.pipe()
    os.close(read_end)  # a reader that stopped early, deterministically
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    done = subprocess.run([sys.executable, "-m", "finetune", "inspect", str(whole)], stdout=write_end,
                          stderr=subprocess.PIPE, text=True, env=env)
    os.close(write_end)
    assert done.returncode == 141 and "Traceback" not in done.stderr and "BrokenPipe" not in done.stderr


def test_finetune_report_on_a_read_only_disk_names_the_page(half_lora, tmp_path, capsys):
    """`finetune report` rewrites report.html in a run folder on a disk that became read-only."""
    import shutil

    disk = mount_tmpfs(tmp_path / "disk", "size=1m")
    try:
        shutil.copytree(tmp_path / "lora-run", disk / "run")
        subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
        assert main(["report", str(disk / "run")]) == 2
        err = capsys.readouterr().err
        # the page's own name, not the temporary file it is first written to
        assert f"error: cannot write report.html to {disk / 'run' / 'report.html'}: Read-only file system" in err
        assert ".tmp" not in err and "Traceback" not in err
    finally:
        subprocess.run(["umount", "--lazy", str(disk)], check=True)


def test_a_single_file_base_cut_short_is_refused_with_the_recipe(tiny_base, concept_dir, tmp_path):
    import yaml

    from finetune.recipe.load import RecipeError, load_recipe
    from tests.helpers import recipe_dict

    base = tmp_path / "model.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.ones(64, 64)}, str(base))
    _cut_in_half(base)
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe_dict(base, concept_dir, tmp_path / "out")))
    with pytest.raises(RecipeError, match=f"model.base: model.base file {base} is cut short or damaged"):
        load_recipe(str(path), [])
