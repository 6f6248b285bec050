"""Draw the example images of the shapes-world concepts into data_examples/shapes/concepts/<name>/.

    python data_examples/shapes/make_concepts.py

Deterministic: each concept draws from its own fixed seed (see finetune.shapes.concepts). Also writes
concepts/new_object_bare_too/: the same stars, each also captioned with the bare concept prompt "a sks" (the
transformer base's LoRA recipe trains on it: a prompt never captioned was the one it missed), and
concepts/new_edit/: the edit base's held-out edit ("turn it into a ring", finetune.shapes.edits.NEW_EDIT) as 8
targets with their instructions and a control/ subfolder matched by file name (`data.control: {folders: [control]}`).
"""
from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from finetune.shapes.concepts import CONCEPTS
from finetune.shapes.edits import NEW_EDIT

HERE = Path(__file__).resolve().parent
BARE_TOO = "new_object_bare_too"


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE / "concepts")
    args = parser.parse_args(argv)
    for name, concept in CONCEPTS.items():
        folder = args.out / name
        shutil.rmtree(folder, ignore_errors=True)  # no stale examples from an older definition
        written = concept.write_examples(folder)
        print(f"{folder}: {len(written)} images, e.g. {written[0].with_suffix('.txt').read_text().strip()!r}")
    folder = args.out / BARE_TOO
    shutil.rmtree(folder, ignore_errors=True)
    written = CONCEPTS["new_object"].write_examples(folder, bare_copies=True)
    print(f"{folder}: {len(written)} images, half of them captioned {CONCEPTS['new_object'].concept_prompt()!r}")
    folder = args.out / NEW_EDIT.name
    shutil.rmtree(folder, ignore_errors=True)
    written = NEW_EDIT.write_pairs(folder)
    print(f"{folder}: {len(written)} targets captioned {NEW_EDIT.edit.instruction!r}, their controls in control/")
    return args.out


if __name__ == "__main__":
    main()
