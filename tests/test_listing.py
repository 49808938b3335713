"""Tests for serve.listing: the listing rule, one scan of real files in tmp_path (no waiting, no threads)."""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

from serve.listing import Problems, scan, version_directories


def hints(location: Path, problems: Problems | None = None) -> list[str]:
    return [c.version_hint for c in scan(location, problems or Problems())]


def test_numbered_versions_highest_first_model_star_breaks_ties_loose_files_ignored(tmp_path: Path) -> None:
    for version in (1, 2, 10):
        (tmp_path / str(version)).mkdir()
        (tmp_path / str(version) / "model.pth").write_bytes(f"v{version}".encode())
    (tmp_path / "2" / "extra.pt").write_bytes(b"not the model")
    (tmp_path / "loose.pth").write_bytes(b"ignored in versioned mode")
    (tmp_path / "3").write_bytes(b"a file named like a version is not one")
    found = scan(tmp_path, Problems())
    assert [c.version_hint for c in found] == ["10", "2", "1"]  # numeric, not lexical, order
    assert found[1].path == tmp_path / "2" / "model.pth"
    assert version_directories(tmp_path) == ["10", "2", "1"]


def test_ambiguous_version_directory_is_skipped_with_one_warning(tmp_path: Path, caplog) -> None:
    (tmp_path / "1").mkdir()
    (tmp_path / "1" / "model.pth").write_bytes(b"v1")
    (tmp_path / "2").mkdir()
    (tmp_path / "2" / "a.pth").write_bytes(b"a")
    (tmp_path / "2" / "b.pth").write_bytes(b"b")
    with caplog.at_level(logging.WARNING, logger="serve.listing"):
        first = Problems()
        assert hints(tmp_path, first) == ["1"]
        assert hints(tmp_path, Problems(first.warned)) == ["1"]  # still true: not logged again
    assert caplog.text.count("several weights files") == 1


def test_flat_directory_newest_mtime_first_name_breaks_ties(tmp_path: Path) -> None:
    for name, mtime in (("old.pth", 1_000), ("new.pt", 3_000), ("a.pth", 2_000), ("b.safetensors", 2_000)):
        (tmp_path / name).write_bytes(name.encode())
        os.utime(tmp_path / name, (mtime, mtime))
    assert hints(tmp_path) == ["new.pt", "a.pth", "b.safetensors", "old.pth"]


def test_hidden_temporary_empty_and_other_names_are_never_candidates(tmp_path: Path) -> None:
    (tmp_path / "model.pth").write_bytes(b"the model")
    for name in (".hidden.pth", "model.pth.tmp", "upload.pt.part", "model.pth~", "notes.txt", "empty.pth"):
        (tmp_path / name).write_bytes(b"" if name == "empty.pth" else b"junk")
    (tmp_path / ".3").mkdir()  # a hidden directory is not a version directory
    (tmp_path / ".3" / "model.pth").write_bytes(b"hidden version")
    assert [c.path for c in scan(tmp_path, Problems())] == [tmp_path / "model.pth"]


def test_one_candidate_per_real_path(tmp_path: Path) -> None:
    (tmp_path / "model.pth").write_bytes(b"weights")
    os.symlink("model.pth", tmp_path / "alias.pt")
    os.utime(tmp_path / "model.pth", (2_000, 2_000))
    [only] = scan(tmp_path, Problems())
    assert only.path == tmp_path / "model.pth" and only.version_hint == "alias.pt"  # same mtime: name order


def test_sidecar_next_to_the_name_or_the_resolved_file(tmp_path: Path) -> None:
    store = tmp_path / "store"
    store.mkdir()
    (store / "model.pth").write_bytes(b"weights")
    digest = hashlib.sha256(b"weights").hexdigest()
    (store / "model.pth.sha256").write_text(f"\\{digest.upper()}  model.pth\n")
    os.symlink(store / "model.pth", tmp_path / "served.pth")
    [candidate] = scan(tmp_path / "served.pth", Problems())
    assert candidate.expected_sha256 == digest and candidate.fingerprint[5][0] == str(store / "model.pth.sha256")


def test_malformed_sidecar_skips_the_file(tmp_path: Path, caplog) -> None:
    (tmp_path / "model.pth").write_bytes(b"weights")
    (tmp_path / "model.pth.sha256").write_text("not-a-digest  model.pth\n")
    problems = Problems()
    with caplog.at_level(logging.WARNING, logger="serve.listing"):
        assert scan(tmp_path / "model.pth", problems) == []
    assert "does not start with a sha256 hex digest" in caplog.text
    assert any("sidecar" in message for message in problems.messages)


def test_dangling_symlinks_loops_and_missing_locations_are_reported(tmp_path: Path) -> None:
    (tmp_path / "good.pth").write_bytes(b"good")
    os.symlink("missing.pth", tmp_path / "dangling.pth")
    os.symlink("loop.pth", tmp_path / "loop.pth")
    problems = Problems()
    assert hints(tmp_path, problems) == ["good.pth"]
    assert any("dangling symlink" in m for m in problems.warned)
    assert any("symlink loop" in m for m in problems.warned)
    missing = Problems()
    assert scan(tmp_path / "nowhere" / "model.pth", missing) == []
    assert missing.messages == [f"{tmp_path / 'nowhere' / 'model.pth'} does not exist"] and not missing.warned
