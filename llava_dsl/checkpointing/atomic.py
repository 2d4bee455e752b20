"""Atomic files and folders: the one writer every stage uses. A file is written under a temporary name,
fsynced and renamed; a new folder is staged beside its name and renamed into place (``atomic_folder``); files
published into an existing folder are staged inside it and renamed one by one (``atomic_directory``). A crash
leaves the old file or nothing, never half of one. Standard library only (``atomic_torch_save`` imports torch
when called)."""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from typing import Iterator


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_file(path: str) -> Iterator[str]:
    """Yield a temporary path beside ``path``; once the block returns, the file replaces ``path`` in one rename.

    The temporary name (``.NAME.tmp-PID``) is hidden and never the name a loader is given, so a crash leaves
    the previous ``path`` (or none) and at worst a stray temporary file.
    """
    folder, name = os.path.split(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    temporary = os.path.join(folder, f".{name}.tmp-{os.getpid()}")
    try:
        yield temporary
        _fsync(temporary)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(temporary)
        raise
    _fsync(folder)


def atomic_torch_save(obj, path: str) -> None:
    import torch

    with atomic_file(path) as temporary:
        torch.save(obj, temporary)


def atomic_write_text(path: str, text: str) -> None:
    with atomic_file(path) as temporary:
        with open(temporary, "w", encoding="utf-8") as f:
            f.write(text)


def _publish_order(relative: str) -> tuple:
    name = os.path.basename(relative)
    return (name == "config.json", name.endswith(".index.json"), relative)


@contextlib.contextmanager
def atomic_directory(output_dir: str) -> Iterator[str]:
    """Yield a staging folder inside ``output_dir``; its files then move into ``output_dir`` one rename each.

    Every file appears whole. The old ``config.json`` goes first and the new one comes last (after the weights
    and shard indexes), so a folder whose save was cut short has no ``config.json``: loading it fails plainly
    instead of pairing new weights with a stale config.
    """
    os.makedirs(output_dir, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".saving-", dir=output_dir)
    try:
        yield staging
        files = sorted((os.path.relpath(os.path.join(root, name), staging)
                        for root, _, names in os.walk(staging) for name in names), key=_publish_order)
        if "config.json" in files and os.path.exists(os.path.join(output_dir, "config.json")):
            os.remove(os.path.join(output_dir, "config.json"))
            _fsync(output_dir)
        for relative in files:
            source, target = os.path.join(staging, relative), os.path.join(output_dir, relative)
            _fsync(source)
            os.makedirs(os.path.dirname(target), exist_ok=True)
            os.replace(source, target)
        _fsync(output_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


@contextlib.contextmanager
def atomic_folder(final: str, staging: str, publish: bool = True) -> Iterator[str]:
    """Create ``staging`` and yield it; once the block returns it is renamed to ``final``, so ``final`` appears
    complete or not at all. On an error the staging folder is removed. ``staging`` is the caller's name for it
    (what a later start recognises as an interrupted save). ``publish=False`` yields the path and does nothing
    else: the other ranks of a save that rank 0 publishes."""
    if publish:
        os.makedirs(staging)
    try:
        yield staging
        if publish:
            os.replace(staging, final)
            _fsync(os.path.dirname(os.path.abspath(final)))
    except BaseException:
        if publish:
            shutil.rmtree(staging, ignore_errors=True)
        raise
