"""Lark's parse-table cache lives where only this user can write: Lark unpickles the file, so a cache in the
shared temp directory (Lark's default) would run whatever pickle another user left there."""

from __future__ import annotations

import os
import sys
import tempfile

import pytest

from specbridge.dsl import expressions


def test_cache_is_in_a_private_directory_of_the_user(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    path = expressions.table_cache()
    assert path and os.path.dirname(path) == str(tmp_path / "cache" / "specbridge")
    assert not path.startswith(tempfile.gettempdir() + os.sep + ".lark")
    assert os.stat(os.path.dirname(path)).st_mode & 0o077 == 0


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX permissions")
def test_no_cache_in_a_directory_others_can_write(tmp_path, monkeypatch):
    shared = tmp_path / "cache" / "specbridge"
    shared.mkdir(parents=True)
    shared.chmod(0o777)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert expressions.table_cache() is False


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX permissions")
def test_no_cache_through_a_link(tmp_path, monkeypatch):
    (tmp_path / "elsewhere").mkdir(mode=0o700)
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "specbridge").symlink_to(tmp_path / "elsewhere")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert expressions.table_cache() is False


def test_a_cache_directory_that_cannot_be_made_means_no_cache(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "file"))  # a file where the directory would go
    assert expressions.table_cache() is False


def test_the_parser_uses_the_private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    expressions.parser.cache_clear()
    try:
        expressions.parser()
        assert os.path.isfile(expressions.table_cache())
    finally:
        expressions.parser.cache_clear()
