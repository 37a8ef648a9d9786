"""Results are written whole or not at all: a failure mid-write leaves what was there before."""

from __future__ import annotations

import os
import shutil

import pytest

from latentqa_platform.files import _umask, publish_folder, write_whole


def test_a_folder_is_published_whole_or_not_at_all(tmp_path, monkeypatch):
    source = tmp_path / "checkpoint" / "adapter"
    source.mkdir(parents=True)
    for name in ("adapter_config.json", "adapter_model.safetensors", "latentqa_target.json"):
        (source / name).write_text(name)
    real_copytree = shutil.copytree

    def killed_after_one_file(src, dst, **kwargs):
        copied = []

        def copy(a, b):
            if copied:
                raise KeyboardInterrupt
            copied.append(shutil.copy2(a, b))

        return real_copytree(src, dst, **{**kwargs, "copy_function": copy})

    monkeypatch.setattr(shutil, "copytree", killed_after_one_file)
    with pytest.raises(KeyboardInterrupt):
        publish_folder(source, tmp_path / "run" / "decoder")
    assert list((tmp_path / "run").iterdir()) == []  # no decoder/, and no partial copy beside it
    monkeypatch.undo()
    publish_folder(source, tmp_path / "run" / "decoder")
    assert sorted(p.name for p in (tmp_path / "run" / "decoder").iterdir()) == sorted(p.name for p in source.iterdir())
    with pytest.raises(OSError):  # a published folder is never replaced
        publish_folder(tmp_path / "checkpoint", tmp_path / "run" / "decoder")
    assert (tmp_path / "run" / "decoder" / "adapter_config.json").read_text() == "adapter_config.json"


def test_a_file_is_replaced_whole_or_kept(tmp_path, monkeypatch):
    job = tmp_path / "out" / "job.json"
    write_whole(job, '{"shards": 3}')
    assert job.read_text() == '{"shards": 3}'

    def disk_full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(OSError, match="No space"):
        write_whole(job, '{"shards": 4, "half written')
    monkeypatch.undo()
    assert job.read_text() == '{"shards": 3}'
    assert [p.name for p in job.parent.iterdir()] == ["job.json"]  # no half-written file left beside it
    assert job.stat().st_mode & 0o777 == 0o666 & ~_umask()  # readable by others, as open() makes files
