"""A refactor's check that nothing it touched changed what training writes: every strategy (LoRA with and without
kohya's file and with LoHa, DreamBooth, textual inversion, hypernetwork) trained 3 steps on every registered
family's tiny model, and every tensor of every .safetensors file written hashed (checkpoints aside).

    python -m tests.artifact_hashes before.json                   # on the commit before the change
    python -m tests.artifact_hashes after.json --against before.json

The second prints each artifact whose hash differs (or that one side refused) and exits 1 if any does. Issue 33's
family specs were checked so: the 50 artifacts of the five families then, identical before and after.
"""
from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import os
import sys
import tempfile
from pathlib import Path

STRATEGIES = {
    "lora": {"kind": "lora", "rank": 4, "text_encoder": True},
    "lora_kohya": {"kind": "lora", "rank": 4, "formats": ["diffusers", "kohya"]},
    "loha": {"kind": "lora", "rank": 4, "variant": "loha"},
    "dreambooth": {"kind": "dreambooth", "text_encoder": True},
    "textual_inversion": {"kind": "textual_inversion", "placeholder_token": "<sks>", "initializer_token": "x"},
    "hypernetwork": {"kind": "hypernetwork", "layer_structure": [1, 2, 1]},
}


def tensor_hash(path: Path) -> str:
    """sha256 over the file's tensors, by sorted key (bf16 as its float32 values)."""
    import torch
    from safetensors.torch import load_file

    tensors, digest = load_file(str(path)), hashlib.sha256()
    for key in sorted(tensors):
        value = tensors[key].float() if tensors[key].dtype == torch.bfloat16 else tensors[key]
        digest.update(key.encode())
        digest.update(value.numpy().tobytes())
    return digest.hexdigest()


def hashes() -> dict[str, str]:
    """{family/strategy/file: hash, or "refused: ..." for a pair not trained}."""
    from finetune.models import specs
    from finetune.models.tiny import save_tiny_pipeline
    from finetune.recipe.load import parse_recipe
    from finetune.training import loop
    importlib.import_module("tests.conftest")  # the tests' environment (offline hub, test-only torchvision)
    from tests.helpers import draw_concept, recipe_dict, reset_accelerate

    root = Path(tempfile.mkdtemp())
    images, out = draw_concept(root / "images"), {}
    for family in specs():
        base = save_tiny_pipeline(root / f"base-{family}", family=family)
        for name, strategy in STRATEGIES.items():
            folder = root / f"out-{family}-{name}"
            try:
                loop.train(parse_recipe(recipe_dict(base, images, folder, strategy=strategy, checkpoint={"every": 0},
                                                    train={"max_steps": 3, "batch_size": 2, "learning_rate": 5e-3})))
            except Exception as exc:  # a pair the family refuses: named, so a new refusal shows as a change
                out[f"{family}/{name}"] = f"refused: {type(exc).__name__}"
                continue
            finally:
                reset_accelerate()
            for path in sorted(folder.rglob("*.safetensors")):
                if "checkpoints" not in path.parts:
                    out[f"{family}/{name}/{path.relative_to(folder)}"] = tensor_hash(path)
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m tests.artifact_hashes", description=__doc__.split("\n\n")[0])
    parser.add_argument("out", help="where to write the hashes (JSON)")
    parser.add_argument("--against", help="an earlier run's JSON to compare with")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    found = hashes()
    Path(args.out).write_text(json.dumps(found, indent=1, sort_keys=True))
    if args.against:
        before = json.loads(Path(args.against).read_text())
        changed = sorted(k for k in set(before) & set(found) if before[k] != found[k])
        for key in changed:
            print(f"changed: {key}: {before[key][:60]} -> {found[key][:60]}")
        print(f"{len(set(before) & set(found)) - len(changed)} identical, {len(changed)} changed, "
              f"{len(set(found) - set(before))} new, {len(set(before) - set(found))} gone")
        sys.exit(1 if changed else 0)
