"""`lookalike init` writes, for every base the registry knows, a study that `train --dry-run` accepts; every config
key has a docstring, and docs/configuration.md and the README's table of bases are what the code writes now
(`make docs`)."""

from __future__ import annotations

import pytest

from lookalike.config import load_config
from lookalike.generated_docs import keys_without_docstrings, reference_markdown, with_bases_table
from lookalike.errors import LookalikeError
from lookalike.models.families import KNOWN_BASES
from lookalike.starter import write_starter
from lookalike.train.memory import dry_run_lines
from tests.conftest import REPO, run_cli


def test_every_key_has_a_docstring_and_the_docs_written_from_the_code_are_current():
    assert keys_without_docstrings() == []
    written = (REPO / "docs" / "configuration.md").read_text()
    assert written == reference_markdown(), "docs/configuration.md is stale: run `make docs`"
    readme = (REPO / "README.md").read_text()
    assert readme == with_bases_table(readme), "the README's table of bases is stale: run `make docs`"
    for base in KNOWN_BASES:  # both list every base the registry knows
        assert f"| `{base}` |" in written and f"`{base}`" in readme


@pytest.mark.slow
def test_init_writes_for_every_base_a_study_that_train_dry_run_accepts(tmp_path, faces):
    for base in KNOWN_BASES:
        study = write_starter(tmp_path / f"{base}.toml", base, str(faces / "train" / "obama"), "sks")
        config = load_config(study)
        assert (config.model.base, config.subject.token, config.subject.images) == (
            base, "sks", faces / "train" / "obama")
        lines = dry_run_lines(config, None)
        assert lines[0].startswith(f"train --dry-run: {base}, ") and any(" total " in line for line in lines), base
    assert "hf auth login" in (tmp_path / "flux-dev.toml").read_text(), "a gated base says how to get it"
    assert "hf auth login" not in (tmp_path / "sd15.toml").read_text()
    assert "resolution = 512" in (tmp_path / "sd15.toml").read_text(), "a base of its own size says it"


def test_init_never_writes_over_a_file_and_names_a_bad_base_or_token(tmp_path):
    existing = tmp_path / "mine.toml"
    existing.write_text("name = 'mine'\n")
    result = run_cli("init", str(existing), "--base", "tiny")
    assert result.returncode == 2 and result.stderr.strip() == \
        f"error: {existing} already exists: give init a new file name"
    assert existing.read_text() == "name = 'mine'\n"
    with pytest.raises(LookalikeError, match="--base: 'flux3' is not a known base; known: flux-dev, "):
        write_starter(tmp_path / "a.toml", "flux3", "photos", "sks")
    with pytest.raises(LookalikeError, match="--token: 'two words' must be one word"):
        write_starter(tmp_path / "b.toml", "tiny", "photos", "two words")
    assert not (tmp_path / "a.toml").exists() and not (tmp_path / "b.toml").exists()
