"""What a bug report needs (`finetune env`), and the check that installed packages can work together, run before
any model loads (`finetune train`, `validate`, ...).

Installed versions are read from package metadata (importlib.metadata), never by importing the packages, so the
check is fast and works even when an import would crash. Two kinds of problem are found:
- a package outside a range that something in finetune's import graph declares (finetune's own pyproject
  ranges and exclusions, and every dependency's own, e.g. torchvision pinning one torch release): what
  `pip check` would say, limited to the packages finetune runs;
- a combination that no package declares but that is known to break finetune (`KNOWN_CONFLICTS`).
"""
from __future__ import annotations

import importlib.metadata as metadata
import os
import platform
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

# the packages a bug report names, in this order; those marked optional only when installed
REPORTED = ("torch", "diffusers", "transformers", "peft", "accelerate", "datasets", "safetensors",
            "huggingface-hub", "tokenizers", "matplotlib", "torchvision", "bitsandbytes", "xformers", "torchao",
            "prodigyopt", "schedulefree", "lion-pytorch")
# imported by diffusers or transformers when present although nothing requires them: a mismatched one breaks
# their import ("operator torchvision::nms does not exist")
IMPORTED_WHEN_PRESENT = ("torchvision", "xformers", "bitsandbytes")
# reported only when installed: those, and optional extras (torchao: model.quantize; the optimizers extra)
OPTIONAL = (*IMPORTED_WHEN_PRESENT, "torchao", "prodigyopt", "schedulefree", "lion-pytorch")


class IncompatiblePackages(Exception):
    """Installed packages that are known not to work together; the message names them and the fix."""


@dataclass(frozen=True)
class KnownConflict:
    """Installed versions matching every requirement in `when` break `what`; `fix` says how to get out."""
    when: tuple[str, ...]  # PEP 508 requirements, e.g. ("transformers>=5.24", "peft<0.22")
    what: str
    fix: str


# Combinations no package declares but that break finetune. Add one with the versions, what breaks and the fix,
# and a test in tests/cli/test_environment.py picks it up.
KNOWN_CONFLICTS: tuple[KnownConflict, ...] = (
    # both found by running the suite on older releases (`bash .ci/run --oldest`, then one package at a time);
    # pyproject's peft>=0.20 keeps a plain install out of them, these say why when one is installed anyway
    # transformers 5.6-5.19 ask for peft>=0.18.2 (never released) but import `_maybe_shard_state_dict_for_tp`,
    # which peft added in 0.19: diffusers' load_lora_weights goes through transformers' load_adapter for text
    # encoders, and fails with an ImportError
    KnownConflict(when=("transformers>=5.6,<5.20", "peft<0.19"),
                  what="diffusers' load_lora_weights cannot load a LoRA that adapts a text encoder (transformers' "
                       "load_adapter imports a function peft added in 0.19)",
                  fix="pip install 'peft>=0.20'"),
    # peft 0.19's set_peft_model_state_dict renames a transformers 5.6-5.10.1 model's adapter keys to
    # `base_model.model.<key>` (a PeftModel's), so they match nothing in the bare text encoder
    KnownConflict(when=("transformers>=5.6,<5.10.2", "peft>=0.19,<0.20"),
                  what="a text encoder's LoRA state cannot be loaded back (resume, strategy.initial_weights): "
                       "peft renames its keys to base_model.model.*",
                  fix="pip install 'peft>=0.20'"),
)


def installed_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _requirements(name: str) -> list:
    """The requirements distribution `name` declares for a plain install (no extras), markers applied."""
    from packaging.requirements import InvalidRequirement, Requirement

    found = []
    for text in metadata.requires(name) or []:
        try:
            requirement = Requirement(text)
        except InvalidRequirement:
            continue  # an old package's malformed line is not ours to judge
        if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
            found.append(requirement)
    return found


def _satisfies(version: str, requirement) -> bool:
    # pre-releases and local builds (2.13.0+cpu) count as what they are
    return requirement.specifier.contains(version, prereleases=True)


def declared_problems(root: str = "finetune") -> list[str]:
    """Every package reachable from `root`'s requirements (plus `IMPORTED_WHEN_PRESENT`) that is missing or outside
    a range some package in that graph declares: one line each, naming who asks for what and what is installed."""
    from packaging.utils import canonicalize_name

    if installed_version(root) is None:
        return []  # run from a source tree that was never installed: no declared graph to walk
    problems, seen = [], set()
    todo = [root] + [name for name in IMPORTED_WHEN_PRESENT if installed_version(name)]
    while todo:
        name = canonicalize_name(todo.pop())
        if name in seen:
            continue
        seen.add(name)
        for requirement in _requirements(name):
            version = installed_version(requirement.name)
            if version is None:
                problems.append(f"{name} needs {requirement}, which is not installed")
            elif not _satisfies(version, requirement):
                problems.append(f"{name} needs {requirement}, but {requirement.name} {version} is installed")
            else:
                todo.append(requirement.name)
    return problems


def conflict_problems(conflicts: tuple[KnownConflict, ...] = KNOWN_CONFLICTS) -> list[str]:
    from packaging.requirements import Requirement

    problems = []
    for conflict in conflicts:
        versions = {}
        for text in conflict.when:
            requirement = Requirement(text)
            version = installed_version(requirement.name)
            if version is None or not _satisfies(version, requirement):
                break
            versions[requirement.name] = version
        else:
            named = " with ".join(f"{name} {version}" for name, version in versions.items())
            problems.append(f"{named}: {conflict.what}; fix: {conflict.fix}")
    return problems


def check_packages() -> None:
    """Raise IncompatiblePackages, naming each problem and the fix, if the installed packages cannot work
    together. Reads metadata only: call it before any model loads."""
    problems = conflict_problems() + declared_problems()
    if problems:
        raise IncompatiblePackages(
            "installed packages that do not work together:\n  - " + "\n  - ".join(problems) + "\n"
            "Fix: install the versions this release was tested with, from a checkout of finetune: "
            "pip install -e . -c constraints.txt (or upgrade/downgrade the packages named above); "
            "`finetune env` shows what is installed")


def _git_commit() -> str | None:
    source = Path(__file__).resolve().parent.parent
    if not (source / ".git").exists():
        return None  # an installed wheel, not a checkout
    try:
        commit = subprocess.run(["git", "-C", str(source), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(source), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{commit}{' (with uncommitted changes)' if dirty else ''}" if commit else None


def _accelerators() -> list[str]:
    import torch

    lines = []
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(index)
            lines.append(f"cuda:{index} {props.name}, {props.total_memory / 2**30:.1f} GiB")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        lines.append("mps (Apple GPU, memory shared with the system)")
    if not lines:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30 if hasattr(os, "sysconf") else 0
        lines.append(f"cpu only ({os.cpu_count()} cores, {memory:.1f} GiB memory)")
    return lines


def report() -> list[tuple[str, str]]:
    """(name, value) pairs for a bug report: finetune, Python, platform, torch and its builds, accelerators, the
    key libraries (optional ones only when installed), the model families trained (the registered specs) and any
    problem `check_packages` would raise for."""
    import torch

    from finetune import __version__

    commit = _git_commit()
    rows = [("finetune", __version__ + (f" (git {commit})" if commit else "")),
            ("python", f"{platform.python_version()} ({sys.executable})"),
            ("platform", platform.platform()),
            ("torch", f"{torch.__version__} (CUDA build: {torch.version.cuda or 'none'}, MPS build: "
                      f"{'yes' if torch.backends.mps.is_built() else 'no'})")]
    rows += [("accelerator", line) for line in _accelerators()]
    for name in REPORTED[1:]:
        version = installed_version(name)
        if version or name not in OPTIONAL:
            rows.append((name, version or "not installed"))
    from finetune.models import specs

    rows.append(("families", ", ".join(f"{spec.name} ({spec.title})" for spec in specs().values())))
    problems = conflict_problems() + declared_problems()
    rows += [("problem", problem) for problem in problems] or [("problems", "none found")]
    return rows
