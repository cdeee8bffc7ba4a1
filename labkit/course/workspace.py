"""The learner's workspace: the copies of the course notebooks and exercises that `make lab` opens.

JupyterLab saves what a learner runs into the file it opened (autosave too), so opening the
committed notebooks would overwrite their stored GPU outputs with the learner's. `make lab`
therefore opens a git-ignored copy, `workspace/` by default, laid out like the repository
(`notebooks/`, `exercises/learner/`, `exercises/solutions/`), so that a path a notebook cites,
such as `exercises/learner/08_continuous_batching.ipynb`, is valid from the lab's root.

The documents the notebooks cite (`REFERENCES`: the README, ARCHITECTURE.md,
benchmarks/RESULTS.md, ...) are copied in too, at the same paths, and refreshed at every sync:
they are for reading, the lab cannot reach files outside its root. `results/`, where notebooks
save what they measure (`labkit.course.notebook.RESULTS_DIR`), is a link to the repository's, so
the paths they print (`results/baseline.json`) open from the lab and its terminal.

A copy is made once and never overwritten by `sync`: the learner's answers survive the next
`make lab`. The manifest (`.upstream.json`) records the sha256 of each upstream file when it was
copied, which is how `sync` tells the two kinds of change apart: an upstream notebook that
changed replaces a copy still byte-identical to what was copied; a copy the learner changed is
kept, and `sync` prints the command that takes the new version (`reset`, which moves the
learner's copy aside to `NAME.mine-YYYYMMDD-HHMMSS.ipynb` first).

    python -m labkit.course.workspace sync [--into workspace]
    python -m labkit.course.workspace reset notebooks/04_load_test_concurrency.ipynb
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_INTO = REPO_ROOT / "workspace"
SOURCES = ("notebooks", "exercises/learner", "exercises/solutions")
MANIFEST = ".upstream.json"
# Files the notebooks cite, copied for reading (tests/test_workspace.py checks the list is whole)
REFERENCES = ("README.md", "ARCHITECTURE.md", "benchmarks/RESULTS.md",
              "benchmarks/lone_request.py", "deploy/kubernetes/README.md")

Say = Callable[[str], None]


def reset_command(rel: str, into: Path) -> str:
    """The command that takes the course's version of `rel` (into the same workspace)."""
    lab_dir = "" if into.resolve() == DEFAULT_INTO.resolve() else f" LAB_DIR={into}"
    return f"make lab-reset NOTEBOOK={rel}{lab_dir}"


def upstream_files(root: Path) -> dict[str, Path]:
    """Repository-relative path (posix) -> file, for every notebook the workspace mirrors."""
    found = {}
    for folder in SOURCES:
        for path in sorted((root / folder).glob("*.ipynb")):
            found[f"{folder}/{path.name}"] = path
    return found


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def load_manifest(into: Path) -> dict[str, str]:
    path = into / MANIFEST
    if not path.exists():
        return {}
    try:
        return dict(json.loads(path.read_text())["copied"])
    except (ValueError, KeyError, TypeError):
        # A damaged manifest only costs automatic updates: with no record, no copy is replaced.
        return {}


def save_manifest(into: Path, manifest: dict[str, str]) -> None:
    # Written aside and renamed: an interrupted `make lab` never leaves half a manifest.
    path = into / MANIFEST
    tmp = path.with_name(MANIFEST + ".tmp")
    tmp.write_text(json.dumps({"about": "sha256 of each upstream notebook when it was copied "
                                        "here (labkit.course.workspace)",
                               "copied": dict(sorted(manifest.items()))}, indent=1) + "\n")
    os.replace(tmp, path)


def _copy(source: Path, target: Path) -> str:
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, target)
    return sha256(source)


def sync(root: Path = REPO_ROOT, into: Path = DEFAULT_INTO, say: Say = print) -> dict[str, str]:
    """Bring the workspace up to date without overwriting any work; returns the manifest."""
    root, into = Path(root).resolve(), Path(into).resolve()
    fresh = not into.exists()
    into.mkdir(parents=True, exist_ok=True)
    manifest = load_manifest(into)
    say(f"Workspace: {into}")
    say(f"  JupyterLab opens your copies here; the committed notebooks in {root} are never "
        "modified by your runs.")
    notes = [note for rel, source in upstream_files(root).items()
             if (note := _sync_one(rel, source, into, manifest, fresh))]
    save_manifest(into, manifest)
    _copy_references(root, into)
    notes += filter(None, [_link_results(root, into)])
    for note in notes:
        say("  " + note)
    if fresh:
        say(f"  created, with {len(manifest)} notebooks; to read beside them (copies, refreshed "
            f"at each sync): {', '.join(REFERENCES)}; results/ is the repository's")
    elif not notes:
        say("  every copy is up to date")
    return manifest


def _copy_references(root: Path, into: Path) -> None:
    """The documents the notebooks cite, at their repository paths, as they are upstream now."""
    for rel in REFERENCES:
        if (root / rel).is_file():
            _copy(root / rel, into / rel)


def _link_results(root: Path, into: Path) -> str | None:
    """`results/` in the workspace as a link to the repository's (where notebooks save);
    a folder of that name the learner made is left alone. Returns a note when it cannot link."""
    link, target = into / "results", root / "results"
    if link.exists() or link.is_symlink():
        return None
    target.mkdir(exist_ok=True)
    try:
        link.symlink_to(target, target_is_directory=True)
    except OSError as err:  # e.g. Windows without the right to make links
        return f"results/ could not be linked ({err}): the notebooks save into {target}"
    return None


def _sync_one(rel: str, source: Path, into: Path, manifest: dict[str, str],
              fresh: bool) -> str | None:
    """One notebook's sync; returns what the learner should hear, or None."""
    target, upstream = into / rel, sha256(source)
    if not target.exists():
        note = None if fresh else f"restored: {rel}" if rel in manifest else f"new: {rel}"
        manifest[rel] = _copy(source, target)
        return note
    mine = sha256(target)
    copied = manifest.get(rel)
    if mine == upstream:  # nothing to take (also: a copy found with no record)
        manifest[rel] = upstream
        return None
    if copied is None:
        # A copy with no record (lost manifest) is the learner's: keep it, and say once how to
        # take the course's version; recording it means the next sync stays quiet.
        manifest[rel] = upstream
        return (f"kept your {rel} (differs from the course's).\n"
                "    To take the course's version: " + reset_command(rel, into))
    if upstream == copied:
        return None
    if mine == copied:  # untouched since it was copied: nothing of the learner's to lose
        manifest[rel] = _copy(source, target)
        return f"updated: {rel} (changed upstream; your copy was untouched)"
    return (f"changed upstream: {rel}; your copy has your changes, so it was kept.\n"
            "    To take the new version (yours is moved aside, not deleted): "
            + reset_command(rel, into))


def resolve(name: str, root: Path, into: Path) -> str:
    """The repository-relative path of the notebook `name` names: `notebooks/04_….ipynb`, the
    same path inside the workspace, or just the file name when only one folder has it."""
    files = upstream_files(root)
    path = Path(name)
    if path.is_absolute() or path.exists():
        path = path.resolve()
        for base in (into, root):
            if path.is_relative_to(base):
                path = path.relative_to(base)
                break
    if path.as_posix() in files:
        return path.as_posix()
    matches = [rel for rel in files if rel.rsplit("/", 1)[-1] == path.name]
    if len(matches) == 1:
        return matches[0]
    known = ", ".join(files) if not matches else " or ".join(matches)
    raise ValueError(f"{name!r} is not one of the course's notebooks: say which of {known}")


def reset(name: str, root: Path = REPO_ROOT, into: Path = DEFAULT_INTO, say: Say = print,
          now: datetime | None = None) -> Path | None:
    """Take the course's current version of one notebook. The learner's copy, if it differs, is
    moved aside beside it first; returns where it went (None when nothing needed moving)."""
    root, into = Path(root).resolve(), Path(into).resolve()
    rel = resolve(name, root, into)
    source, target = root / rel, into / rel
    manifest = load_manifest(into)
    kept = None
    if target.exists() and sha256(target) != sha256(source):
        kept = _aside(target, now or datetime.now())
        target.rename(kept)
        say(f"your copy is kept as {kept.relative_to(into)}")
    manifest[rel] = _copy(source, target)
    save_manifest(into, manifest)
    say(f"{rel}: the course's current version is in {target}")
    return kept


def _aside(target: Path, now: datetime) -> Path:
    stem = f"{target.stem}.mine-{now:%Y%m%d-%H%M%S}"
    kept, n = target.with_name(stem + target.suffix), 2
    while kept.exists():  # two resets within a second: never move over an earlier copy
        kept, n = target.with_name(f"{stem}-{n}{target.suffix}"), n + 1
    return kept


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m labkit.course.workspace",
                                     description=__doc__.split("\n\n")[0])
    # The folders are options of each command, so they go after it: `sync --into DIR`.
    where = argparse.ArgumentParser(add_help=False)
    where.add_argument("--root", type=Path, default=REPO_ROOT,
                       help="the repository whose notebooks are copied (default: %(default)s)")
    where.add_argument("--into", type=Path, default=DEFAULT_INTO,
                       help="the workspace folder (default: %(default)s)")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("sync", parents=[where],
                        help="copy new notebooks in, update untouched copies")
    take = commands.add_parser("reset", parents=[where],
                               help="take the course's version of one notebook; yours is moved "
                                    "aside to NAME.mine-DATE.ipynb")
    take.add_argument("notebook", help="e.g. notebooks/04_load_test_concurrency.ipynb")
    args = parser.parse_args(argv)
    if args.command == "sync":
        sync(args.root, args.into)
        return 0
    try:
        reset(args.notebook, args.root, args.into)
    except ValueError as err:
        print(err, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
