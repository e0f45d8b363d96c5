"""Atomic files and directories, the ownership marker, umask, stale temporaries."""

import json
import os
import stat
import subprocess
import sys

import pytest

from scribelm import io as sio
from scribelm.io import (
    DiskFullError, OutputError, atomic_directory, atomic_file, claim_output_directory, claim_output_file,
    exchange, foreign_entries, output_kind, read_json_object, read_output_marker, remove_stale_temporaries,
    rename_no_replace, write_file_atomically, write_output_marker,
)


def mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
def umask():
    """Set the process umask for one test, then put the old one back."""
    old = os.umask(0o022)
    os.umask(old)
    yield lambda value: os.umask(value)
    os.umask(old)


def _write(final, files, **kwargs):
    with atomic_directory(final, **kwargs) as tmp:
        for name, text in files.items():
            (tmp / name).write_text(text)
    return final


@pytest.mark.parametrize("mask, dir_mode, file_mode", [(0o022, 0o755, 0o644), (0o077, 0o700, 0o600), (0o002, 0o775, 0o664)])
def test_published_files_and_directories_follow_the_umask(tmp_path, umask, mask, dir_mode, file_mode):
    umask(mask)
    assert sio.current_umask() == mask
    out = _write(tmp_path / "out", {"a.json": "{}"})
    assert mode(out) == dir_mode and mode(out / "a.json") == file_mode and mode(out / sio.MARKER_FILE) == file_mode
    write_file_atomically(tmp_path / "f.txt", "hello")
    assert mode(tmp_path / "f.txt") == file_mode


def test_a_replaced_file_keeps_its_mode(tmp_path, umask):
    umask(0o022)
    target = tmp_path / "settings.json"
    target.write_text("old")
    os.chmod(target, 0o640)
    write_file_atomically(target, "new")
    assert target.read_text() == "new" and mode(target) == 0o640


def test_a_failed_file_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "f.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_file(target, "w") as handle:
            handle.write("half")
            raise RuntimeError("interrupted")
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["f.txt"]


def test_a_directory_carries_a_marker_listing_what_scribelm_wrote(tmp_path):
    out = _write(tmp_path / "out", {"b.bin": "x", "a.json": "{}"}, kind="shards")
    marker = read_output_marker(out)
    assert marker == {"format": "scribelm-output", "version": 1, "kind": "shards", "entries": ["a.json", "b.bin"]}
    assert output_kind(out) == "shards" and foreign_entries(out) == []
    (out / "mine.txt").write_text("a user's note")
    assert foreign_entries(out) == ["mine.txt"]
    grown = tmp_path / "run"
    grown.mkdir()
    write_output_marker(grown, "run")  # a directory that grows in place: everything in it is ours
    (grown / "metrics.jsonl").write_text("")
    assert foreign_entries(grown) == [] and output_kind(grown) == "run"


def test_replacing_swaps_in_the_complete_directory_and_leaves_no_temporaries(tmp_path):
    out = _write(tmp_path / "out", {"old.txt": "1"})
    _write(out, {"new.txt": "2"})
    assert sorted(p.name for p in out.iterdir()) == [sio.MARKER_FILE, "new.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_a_failure_inside_the_block_keeps_the_previous_directory(tmp_path):
    out = _write(tmp_path / "out", {"old.txt": "1"})
    with pytest.raises(RuntimeError):
        with atomic_directory(out) as tmp:
            (tmp / "new.txt").write_text("2")
            raise RuntimeError("interrupted")
    assert (out / "old.txt").read_text() == "1" and not (out / "new.txt").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_a_directory_with_a_users_files_is_never_replaced(tmp_path):
    user = tmp_path / "thesis"
    user.mkdir()
    (user / "thesis.tex").write_text("years of work")
    with pytest.raises(OutputError, match="not written by scribelm.*thesis.tex"):
        _write(user, {"a": "b"})
    ours = _write(tmp_path / "ours", {"a": "b"})
    (ours / "thesis.tex").write_text("years of work")  # put into scribelm's directory later
    with pytest.raises(OutputError, match="files scribelm did not write.*thesis.tex"):
        _write(ours, {"a": "c"})
    assert (user / "thesis.tex").read_text() == (ours / "thesis.tex").read_text() == "years of work"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ours", "thesis"]


def test_claim_output_directory(tmp_path):
    assert claim_output_directory(tmp_path / "new") == tmp_path / "new"
    (tmp_path / "empty").mkdir()
    assert claim_output_directory(tmp_path / "empty") == tmp_path / "empty"
    ours = _write(tmp_path / "ours", {"a": "b"}, kind="checkpoint")
    with pytest.raises(OutputError, match="already exists.*--force"):
        claim_output_directory(ours)
    with pytest.raises(OutputError, match="--new"):
        claim_output_directory(ours, force_flag="--new")
    assert claim_output_directory(ours, force=True) == ours
    user = tmp_path / "user"
    user.mkdir()
    (user / "notes.txt").write_text("mine")
    for force in (False, True):
        with pytest.raises(OutputError, match="not written by scribelm.*notes.txt"):
            claim_output_directory(user, force=force)
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match="not a directory"):
        claim_output_directory(tmp_path / "file", force=True)
    with pytest.raises(OutputError, match="is a file"):
        claim_output_directory(tmp_path / "file" / "sub")
    link = tmp_path / "link"
    link.symlink_to(ours)
    assert claim_output_directory(link, force=True) == ours.resolve()  # a link is followed, not replaced


def test_claim_output_file_replaces_only_a_file_of_its_kind(tmp_path):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF" + b"\0" * 8)
    looks = lambda p: p.read_bytes().startswith(b"GGUF")  # noqa: E731
    with pytest.raises(OutputError, match="--force"):
        claim_output_file(gguf, looks_like=looks)
    assert claim_output_file(gguf, force=True, looks_like=looks) == gguf
    essay = tmp_path / "essay.txt"
    essay.write_text("mine")
    with pytest.raises(OutputError, match="not a GGUF file"):
        claim_output_file(essay, force=True, kind="GGUF file", looks_like=looks)
    assert essay.read_text() == "mine"


def test_directories_written_before_the_marker_are_recognised_by_their_manifest(tmp_path):
    legacy = tmp_path / "ckpt"
    legacy.mkdir()
    (legacy / "config.json").write_text(json.dumps({"format": "scribelm", "d_model": 8}))
    (legacy / "model.safetensors").write_bytes(b"")
    assert output_kind(legacy) == "checkpoint" and foreign_entries(legacy) == []
    assert claim_output_directory(legacy, force=True) == legacy
    (legacy / "README.md").write_text("a user's notes")
    with pytest.raises(OutputError, match="README.md"):
        claim_output_directory(legacy, force=True)


def test_stale_temporaries_of_dead_processes_are_removed_by_the_next_write(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)  # a process that has exited
    out = _write(tmp_path / "out", {"a": "1"})
    stale = tmp_path / f".out.tmp-{pid}-dead0000"
    stale.mkdir()
    (stale / "half.bin").write_bytes(b"\0" * 10)
    live = tmp_path / f".out.tmp-{os.getpid()}-live0000"  # ours: another writer in this process may own it
    live.mkdir()
    unrelated = tmp_path / ".other.tmp-1-abc"
    unrelated.mkdir()
    _write(out, {"a": "2"})
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["out", live.name, unrelated.name])


def test_an_interrupted_two_rename_swap_is_undone(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    out = _write(tmp_path / "out", {"a": "old"})
    aside = tmp_path / f".out.old-{int(dead.stdout)}-abcd1234"
    os.rename(out, aside)  # as if killed between the two renames of the portable swap
    remove_stale_temporaries(out)
    assert (out / "a").read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_the_portable_swap_gives_the_same_result(tmp_path, monkeypatch):
    monkeypatch.setattr(sio, "_renameat2", None)  # as on a system without renameat2
    out = _write(tmp_path / "out", {"a": "old"})
    _write(out, {"a": "new"})
    assert (out / "a").read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["out"]
    (tmp_path / "x").mkdir()
    (tmp_path / "y").mkdir()
    exchange(tmp_path / "x", tmp_path / "y")
    with pytest.raises(FileExistsError):
        rename_no_replace(tmp_path / "x", tmp_path / "y")


def test_rename_no_replace_never_replaces(tmp_path):
    (tmp_path / "a").write_text("a")
    (tmp_path / "b").write_text("b")
    with pytest.raises(FileExistsError):
        rename_no_replace(tmp_path / "a", tmp_path / "b")
    assert (tmp_path / "b").read_text() == "b"
    rename_no_replace(tmp_path / "a", tmp_path / "c")
    assert (tmp_path / "c").read_text() == "a" and not (tmp_path / "a").exists()


def test_exchange_swaps_two_directories(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "in-x").write_text("")
    (tmp_path / "y").mkdir()
    exchange(tmp_path / "x", tmp_path / "y")
    assert (tmp_path / "y" / "in-x").exists() and list((tmp_path / "x").iterdir()) == []


def test_read_json_object_errors_are_one_line(tmp_path):
    class Bad(Exception):
        pass

    file = tmp_path / "c.json"
    file.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(Bad, match="nested too deeply"):
        read_json_object(file, Bad, missing="none")
    file.write_text("[1]")
    with pytest.raises(Bad, match="must hold a JSON object"):
        read_json_object(file, Bad, missing="none")


def _can_mount_tmpfs():
    import shutil

    if shutil.which("unshare") is None:
        return False
    return subprocess.run(["unshare", "-Urm", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt"],
                          capture_output=True).returncode == 0


@pytest.mark.skipif(not _can_mount_tmpfs(), reason="needs `unshare -Urm` to mount a small tmpfs")
def test_a_full_disk_is_a_disk_full_error_and_the_old_output_stays(tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    script = f"""
import os, sys
from scribelm.io import DiskFullError, atomic_directory, write_file_atomically
with atomic_directory({str(disk / 'out')!r}) as tmp:
    (tmp / "small").write_bytes(b"x" * 1000)
write_file_atomically({str(disk / 'f')!r}, b"y" * 1000)
for attempt in ("dir", "file"):
    try:
        if attempt == "dir":
            with atomic_directory({str(disk / 'out')!r}) as tmp:
                (tmp / "big").write_bytes(b"x" * 200_000)
        else:
            write_file_atomically({str(disk / 'f')!r}, b"z" * 200_000)
    except DiskFullError as err:
        print(attempt, err)
print(sorted(os.listdir({str(disk)!r})), sorted(os.listdir({str(disk / 'out')!r})), len(open({str(disk / 'f')!r}, 'rb').read()))
"""
    result = subprocess.run(["unshare", "-Urm", "sh", "-c", f"mount -t tmpfs -o size=64k tmpfs {disk} && {sys.executable} -"],
                            input=script, capture_output=True, text=True)
    lines = result.stdout.splitlines()
    assert len(lines) == 3, result.stderr
    assert lines[0].startswith("dir disk full while writing") and "is unchanged" in lines[0]
    assert lines[1].startswith("file disk full while writing") and "is unchanged" in lines[1]
    assert lines[2] == "['f', 'out'] ['.scribelm-output.json', 'small'] 1000"
    assert issubclass(DiskFullError, OutputError)
