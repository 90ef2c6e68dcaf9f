"""The study the studio works on: a TOML file of its own in the workspace (studio/study.toml), edited through the
pages and validated by the same schema as the command line. A user's config file is never written: the studio
starts from a copy of it, whose relative paths keep meaning what they meant (they are taken from that file's
folder). Each job trains from a snapshot of the study as it was when the job was submitted (studio/configs/), with
every path absolute, so that later edits never change what a queued or running job trains."""

from __future__ import annotations

import shutil
import tomllib
from pathlib import Path
from typing import Any

import tomlkit

from lookalike.config import StudyConfig, validate
from lookalike.data.images import IMAGE_SUFFIXES, load_rgb
from lookalike.errors import LookalikeError
from lookalike.workspace import Workspace, atomic_path, read_json, write_json


class StudioStudy:
    def __init__(self, workspace: Path, base_dir: Path):
        self.workspace = Workspace(Path(workspace).resolve())
        self.folder = self.workspace.root / "studio"
        self.file = self.folder / "study.toml"
        self.base_dir = Path(base_dir).resolve()  # where the study's relative paths start

    @classmethod
    def open(cls, path: Path) -> "StudioStudy":
        """The studio's study of a config file (copied into its workspace on first open) or of a workspace folder
        (its study, once a subject is made there)."""
        path = Path(path).resolve()
        if path.is_dir() or not path.exists():
            origin = path / "studio" / "origin.json"
            base_dir = Path(read_json(origin)["base_dir"]) if origin.is_file() else path
            return cls(path, base_dir)
        if path.suffix != ".toml":
            raise LookalikeError(f"{path}: the studio opens a study's .toml file, or a workspace folder")
        text = path.read_text()
        study = cls(validate(_parsed(text, path), str(path), path.parent).workspace, path.parent)
        if not study.file.is_file():
            study.folder.mkdir(parents=True, exist_ok=True)
            study._write(text)
            write_json(study.folder / "origin.json", {"config": str(path), "base_dir": str(path.parent)})
        return study

    @property
    def exists(self) -> bool:
        return self.file.is_file()

    def text(self) -> str:
        return self.file.read_text() if self.exists else ""

    def config(self, text: str | None = None) -> StudyConfig:
        """The study as the schema reads it (of `text`, else of the file); a bad one is a LookalikeError naming the
        key."""
        text = self.text() if text is None else text
        return validate(_parsed(text, self.file), "study.toml", self.base_dir)

    def save(self, text: str) -> StudyConfig:
        """Replace the study with `text`, once it validates."""
        config = self.config(text)
        self._write(text)
        return config

    def set(self, values: dict[str, Any]) -> StudyConfig:
        """Set keys (section.key -> value; None removes the key, which then takes its default), keeping the file's
        comments and order."""
        document = tomlkit.parse(self.text())
        for key, value in values.items():
            *sections, leaf = key.split(".")
            table = document
            for section in sections:
                if section not in table:
                    table[section] = tomlkit.table()
                table = table[section]
            if value is None:
                table.pop(leaf, None)
            else:
                table[leaf] = value
        return self.save(tomlkit.dumps(document))

    def create(self, token: str, class_word: str, real_name: str | None, base: str) -> StudyConfig:
        """A new study in this workspace: one person, whose photos the studio keeps in photos/<token>/."""
        if self.exists:
            raise LookalikeError(f"{self.file} exists: this workspace has its study")
        document = tomlkit.document()
        document["name"] = token
        document["workspace"] = str(self.workspace.root)
        document["model"] = {"base": base}
        subject = {"token": token, "class_word": class_word or "person",
                   "images": str(self.workspace.root / "photos" / token)}
        if real_name:
            subject["real_name"] = real_name
        document["subject"] = subject
        config = self.config(tomlkit.dumps(document))
        self.folder.mkdir(parents=True, exist_ok=True)
        config.subject.images.mkdir(parents=True, exist_ok=True)
        self._write(tomlkit.dumps(document))
        return config

    def add_photos(self, files: list[Path]) -> list[str]:
        """Copy uploaded photos into the subject's folder, each byte for byte once it reads as an image (a name
        already there, of other bytes, gets a number: nothing is written over); the names added."""
        folder = self.config().subject.images
        folder.mkdir(parents=True, exist_ok=True)
        added = []
        for file in files:
            file = Path(file)
            if file.suffix.lower() not in IMAGE_SUFFIXES:
                raise LookalikeError(f"{file.name}: not a photo ({', '.join(IMAGE_SUFFIXES)})")
            try:
                load_rgb(file)
            except OSError as error:
                raise LookalikeError(f"{file.name} is not a readable image ({str(error).replace(str(file), file.name)})"
                                     ) from None
            target, number = folder / file.name, 1
            while target.exists() and target.read_bytes() != file.read_bytes():
                number += 1
                target = folder / f"{file.stem}-{number}{file.suffix}"
            if not target.exists():
                with atomic_path(target) as tmp:
                    shutil.copyfile(file, tmp)
                added.append(target.name)
        return added

    def snapshot(self, run: str) -> Path:
        """The study now, every path absolute, as the file a job trains from."""
        config = self.config()
        taken = sorted(self.folder.glob(f"configs/{run}-*.json"))
        path = self.folder / "configs" / f"{run}-{len(taken) + 1}.json"
        write_json(path, config.to_json_dict())
        return path

    def _write(self, text: str) -> None:
        with atomic_path(self.file) as tmp:
            tmp.write_text(text)


def _parsed(text: str, path: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise LookalikeError(f"{path.name}: not valid TOML: {error}") from None
