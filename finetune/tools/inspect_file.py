"""`finetune inspect FILE`: prints what export/describe.py finds a file to be (the description is the library's,
the layout of the printout the command's)."""
from __future__ import annotations

from typing import Any


def render(info: dict[str, Any], all_shapes: bool = False) -> str:
    """`info` (export.describe.describe's) as lines; metadata values cut at 100 characters and shapes at 8 unless
    `all_shapes`."""
    lines = [f"{info['file']}: {info['kind']}"]
    for key in ("read_by", "base_model", "base_family", "bytes", "tensors", "parameters", "dtypes", "components",
                "lora"):
        if info.get(key) is not None:
            lines.append(f"  {key}: {info[key]}")
    metadata = info.get("metadata") or {}
    if metadata:
        lines.append("  metadata:")
        for key, value in sorted(metadata.items()):
            text = str(value).replace("\n", " ")
            lines.append(f"    {key}: {text if len(text) <= 100 or all_shapes else text[:97] + '...'}")
    shapes = info.get("shapes") or {}
    if shapes:
        shown = sorted(shapes.items()) if all_shapes else sorted(shapes.items())[:8]
        lines.append(f"  shapes ({len(shapes)} tensors{'' if all_shapes else ', first 8; --all for every one'}):")
        lines.extend(f"    {key}: {shape}" for key, shape in shown)
    return "\n".join(lines)
