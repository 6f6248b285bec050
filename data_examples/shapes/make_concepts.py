"""Draw the example images of the shapes-world concepts into data_examples/shapes/concepts/<name>/.

    python data_examples/shapes/make_concepts.py

Deterministic: each concept draws from its own fixed seed (see finetune.shapes.concepts).
"""
from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from finetune.shapes.concepts import CONCEPTS

HERE = Path(__file__).resolve().parent


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE / "concepts")
    args = parser.parse_args(argv)
    for name, concept in CONCEPTS.items():
        folder = args.out / name
        shutil.rmtree(folder, ignore_errors=True)  # no stale examples from an older definition
        written = concept.write_examples(folder)
        print(f"{folder}: {len(written)} images, e.g. {written[0].with_suffix('.txt').read_text().strip()!r}")
    return args.out


if __name__ == "__main__":
    main()
