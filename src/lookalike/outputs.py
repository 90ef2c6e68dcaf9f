"""Where a command may write a LoRA file the user names (`merge`, `resize`, `export --out`): never over a source
photo, a file lookalike manages or the LoRA being read, and over an existing file only when asked (--force)."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

from lookalike.errors import LookalikeError

# A workspace's folders whose every file lookalike writes and reads back: a LoRA written there by hand would
# replace a run's LoRA, a checkpoint, a crop or a converted base, and every result shown for it would lie.
MANAGED_FOLDERS = ("runs", "data", "prior", "bases", "cache", "generated", "report")


def _looks_like_workspace(folder: Path) -> bool:
    """A folder lookalike made a workspace of: its results table, its prepared data's manifest or a run's status."""
    return ((folder / "results.sqlite").is_file() or (folder / "data" / "manifest.json").is_file()
            or any((folder / "runs").glob("*/status.json")))


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def check_lora_out(out: Path, sources: Iterable[Path], force: bool = False, workspace: Path | None = None,
                   photo_folders: Iterable[Path] = ()) -> Path:
    """`out`, refused by name where writing a LoRA there would lose or mislabel a user's work: a suffix other than
    .safetensors (a photo, a config), one of the `sources` being read, a folder, a file under a managed folder of
    `workspace` or of any workspace above it, a file in one of the study's `photo_folders`, or an existing file
    without `force`."""
    out = Path(out)
    if out.suffix != ".safetensors":
        raise LookalikeError(f"--out: {out} must end in .safetensors (the only LoRA format lookalike writes)")
    if out.is_dir():
        raise LookalikeError(f"--out: {out} is a folder; name the LoRA file to write")
    where = out.resolve()
    if any(where == Path(source).resolve() for source in sources):
        raise LookalikeError(f"--out: {out} is a LoRA being read; write to a new file")
    roots = [Path(workspace).resolve()] if workspace is not None else []
    roots += [folder for folder in where.parents if _looks_like_workspace(folder)]
    for root in roots:
        for name in MANAGED_FOLDERS:
            if _inside(where, root / name):
                raise LookalikeError(f"--out: {out} is inside the workspace's {name}/ folder ({root / name}), whose "
                                     "files lookalike manages; write the LoRA outside it")
    for folder in photo_folders:
        if _inside(where, Path(folder).resolve()):
            raise LookalikeError(f"--out: {out} is inside the study's photo folder {folder}; write the LoRA "
                                 "elsewhere")
    if out.exists() and not force:
        raise LookalikeError(f"--out: {out} already exists; give --force to replace it, or another name")
    return out
