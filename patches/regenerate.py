"""Rebuild ``patches/llava-v1.5/*.patch`` from the edited files in ``patches/llava-v1.5/src/``.

    python patches/regenerate.py            # rewrite the .patch files
    python patches/regenerate.py --check    # exit 1 if a .patch file differs from what src/ gives

``src/NNNN-name/`` holds the files as they read after patch NNNN (only the files that patch touches) and a
``MESSAGE`` file (subject line, blank line, body). Patch NNNN is the diff from each file's previous state
(the latest earlier ``src/`` step that has it, else the pristine installed ``llava-torch``) to its state in
``src/NNNN-name/``. Output is plain Python ``difflib``, so it does not depend on the local diff or git.
"""
from __future__ import annotations

import argparse
import difflib
import importlib.metadata
import importlib.util
import os
import re
import sys
from typing import Dict, List, Optional, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
SERIES_DIR = os.path.join(HERE, "llava-v1.5")
LLAVA_DISTRIBUTION = "llava-torch"
LLAVA_VERSION = "1.2.2.post1"


def pristine_llava_root() -> str:
    """The directory that contains the installed, unpatched ``llava`` package (its site-packages)."""
    try:
        version = importlib.metadata.version(LLAVA_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        raise SystemExit(f"{LLAVA_DISTRIBUTION} is not installed; the patches are diffs against "
                         f"{LLAVA_DISTRIBUTION}=={LLAVA_VERSION} (pip install --no-deps {LLAVA_DISTRIBUTION}=={LLAVA_VERSION})")
    if version != LLAVA_VERSION:
        raise SystemExit(f"installed {LLAVA_DISTRIBUTION} is {version}; the patches are diffs against {LLAVA_VERSION}")
    spec = importlib.util.find_spec("llava")
    if spec is None or spec.origin is None:
        raise SystemExit("the llava package cannot be found on sys.path")
    return os.path.dirname(os.path.dirname(spec.origin))


def steps(series_dir: str = SERIES_DIR) -> List[str]:
    """The ``src/NNNN-name`` step directories, in order."""
    src = os.path.join(series_dir, "src")
    names = sorted(n for n in os.listdir(src) if n[:4].isdigit() and os.path.isdir(os.path.join(src, n)))
    if not names:
        raise SystemExit(f"{src}: no NNNN-name step directories")
    return [os.path.join(src, n) for n in names]


def _files(step_dir: str) -> List[str]:
    """Relative paths (forward slashes) of the source files a step holds, MESSAGE excluded."""
    found = []
    for root, dirs, files in os.walk(step_dir):
        dirs[:] = sorted(d for d in dirs if d != "__pycache__")
        for name in sorted(files):
            path = os.path.relpath(os.path.join(root, name), step_dir).replace(os.sep, "/")
            if path != "MESSAGE" and not name.endswith(".pyc"):
                found.append(path)
    return found


def _read(path: str) -> str:
    with open(path, encoding="utf-8", newline="") as handle:
        text = handle.read()
    if text and not text.endswith("\n"):
        raise SystemExit(f"{path}: no newline at the end of the file (the patches assume one)")
    return text


_HUNK = re.compile(r"^@@ -(\d+)(?:,\d+)? \+\d+(?:,\d+)? @@$")
_SCOPE = re.compile(r"^\s*(?:async\s+)?(?:def|class)\s")


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def _with_scope(header: str, old_lines: List[str]) -> str:
    """Append the enclosing def/class line to a hunk header (as git does) so a reader sees where it lands."""
    start = int(_HUNK.match(header.rstrip("\n")).group(1))
    first = next((line for line in old_lines[start - 1:] if line.strip()), "")
    level = _indent(first)
    for line in reversed(old_lines[: max(start - 1, 0)]):
        if line.strip() and _indent(line) < level:
            if _SCOPE.match(line):
                return header.rstrip("\n") + " " + line.strip()[:80] + "\n"
            level = _indent(line)
    return header


def _file_diff(rel: str, old: str, new: str) -> Tuple[str, int, int]:
    old_lines = old.splitlines(True)
    lines = list(difflib.unified_diff(old_lines, new.splitlines(True), f"a/{rel}", f"b/{rel}", n=3))
    lines = [_with_scope(line, old_lines) if line.startswith("@@") else line for line in lines]
    body = lines[2:]
    added = sum(1 for line in body if line.startswith("+"))
    removed = sum(1 for line in body if line.startswith("-"))
    return f"diff --git a/{rel} b/{rel}\n" + "".join(lines), added, removed


def _diffstat(stats: List[Tuple[str, int, int]]) -> str:
    width = max(len(rel) for rel, _, _ in stats)
    rows = [f" {rel.ljust(width)} | {added + removed:3d} {'+' * added}{'-' * removed}" for rel, added, removed in stats]
    added = sum(a for _, a, _ in stats)
    removed = sum(r for _, _, r in stats)
    rows.append(f" {len(stats)} file{'s' if len(stats) != 1 else ''} changed, {added} insertions(+), {removed} deletions(-)")
    return "\n".join(rows) + "\n"


def build_series(pristine_root: str, series_dir: str = SERIES_DIR) -> Dict[str, str]:
    """``{patch file name: patch text}`` for every step of the series."""
    step_dirs = steps(series_dir)
    current: Dict[str, str] = {}  # relative path -> text after the steps so far
    patches = {}
    for number, step_dir in enumerate(step_dirs, start=1):
        name = os.path.basename(step_dir)
        message = _read(os.path.join(step_dir, "MESSAGE")).strip("\n").split("\n")
        diffs, stats = [], []
        for rel in _files(step_dir):
            if rel not in current:
                pristine = os.path.join(pristine_root, rel)
                if not os.path.isfile(pristine):
                    raise SystemExit(f"{step_dir}/{rel}: no such file in the pristine package ({pristine})")
                current[rel] = _read(pristine)
            new = _read(os.path.join(step_dir, rel))
            diff, added, removed = _file_diff(rel, current[rel], new)
            if not added and not removed:
                raise SystemExit(f"{step_dir}/{rel}: identical to its previous state; remove it from this step")
            diffs.append(diff)
            stats.append((rel, added, removed))
            current[rel] = new
        header = f"Subject: [PATCH {number}/{len(step_dirs)}] {message[0]}\n\n" + "".join(
            line + "\n" for line in message[1:]).lstrip("\n")
        patches[f"{name}.patch"] = header + "---\n" + _diffstat(stats) + "\n" + "".join(diffs)
    return patches


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="compare instead of writing; exit 1 on a difference")
    parser.add_argument("--llava-root", help="directory holding a pristine llava/ (default: the installed package)")
    args = parser.parse_args(argv)
    root = args.llava_root or pristine_llava_root()
    built = build_series(root)
    stale = [] if not args.check else sorted(
        os.path.join(SERIES_DIR, n) for n in os.listdir(SERIES_DIR) if n.endswith(".patch") and n not in built)
    for name, text in built.items():
        path = os.path.join(SERIES_DIR, name)
        if args.check:
            if not os.path.isfile(path) or _read(path) != text:
                stale.append(path)
        else:
            with open(path, "w", encoding="utf-8", newline="") as handle:
                handle.write(text)
            print(f"wrote {os.path.relpath(path)}")
    if stale:
        print("out of date (run python patches/regenerate.py):\n  " + "\n  ".join(stale), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
