"""sha256 manifests in `sha256sum` format, so shipped model files can be checked with or without Python."""
from __future__ import annotations

import hashlib
from pathlib import Path


def sha256_of(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def manifest(folder: str | Path) -> str:
    """One `<sha256>  <path relative to folder>` line per file, sorted by path (`cd folder && sha256sum -c`)."""
    folder = Path(folder)
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    return "".join(f"{sha256_of(p)}  {p.relative_to(folder).as_posix()}\n" for p in files)


def write_manifest(folder: str | Path, manifest_file: str | Path) -> Path:
    Path(manifest_file).write_text(manifest(folder))
    return Path(manifest_file)


def mismatches(folder: str | Path, manifest_file: str | Path) -> list[str]:
    """Paths whose content differs from the manifest, plus files missing from either side; empty when all match."""
    expected = dict(reversed(line.split("  ", 1)) for line in Path(manifest_file).read_text().splitlines() if line)
    actual = dict(reversed(line.split("  ", 1)) for line in manifest(folder).splitlines())
    return sorted(path for path in expected.keys() | actual.keys() if expected.get(path) != actual.get(path))
