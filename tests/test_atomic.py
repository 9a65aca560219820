from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from defect_studio.atomic import TEMP_SUFFIX, atomic_open, atomic_write_bytes, remove_stale_temporaries


def test_a_write_that_fails_midway_leaves_the_old_file(tmp_path: Path):
    target = tmp_path / "tags.json"
    atomic_write_bytes(target, b"old content")
    with pytest.raises(RuntimeError):
        with atomic_open(target) as handle:
            handle.write(b"new half")
            raise RuntimeError("disk unplugged")
    assert target.read_bytes() == b"old content"
    assert [p.name for p in tmp_path.iterdir()] == ["tags.json"]


def test_a_killed_writer_leaves_the_old_file_and_a_temporary_that_is_cleaned(tmp_path: Path):
    target = tmp_path / "mask.png"
    atomic_write_bytes(target, b"old content")
    script = (
        "import os, sys\n"
        "from defect_studio.atomic import atomic_open\n"
        f"with atomic_open({str(target)!r}) as handle:\n"
        "    handle.write(b'partial')\n"
        "    handle.flush()\n"
        "    os.kill(os.getpid(), 9)\n"
    )
    completed = subprocess.run([sys.executable, "-c", script], cwd=Path(__file__).resolve().parents[1])
    assert completed.returncode == -9
    assert target.read_bytes() == b"old content"
    leftovers = [p for p in tmp_path.iterdir() if p.name.endswith(TEMP_SUFFIX)]
    assert len(leftovers) == 1
    assert remove_stale_temporaries(tmp_path) == 1
    assert sorted(os.listdir(tmp_path)) == ["mask.png"]


def test_stale_staging_folders_are_removed_too(tmp_path: Path):
    staging = tmp_path / "exports" / ".model.abc123.partial"
    (staging / "inner").mkdir(parents=True)
    (staging / "inner" / ".x.partial").write_bytes(b"half")
    (tmp_path / "exports" / "model.onnx").write_bytes(b"kept")
    assert remove_stale_temporaries(tmp_path) >= 1
    assert [p.name for p in (tmp_path / "exports").iterdir()] == ["model.onnx"]


def test_a_write_error_is_both_an_oserror_and_a_user_message(tmp_path: Path):
    from defect_studio.atomic import WriteError, configure_faults
    from defect_studio.errors import DefectStudioError

    configure_faults("enospc:1")
    try:
        with pytest.raises(WriteError) as raised:
            atomic_write_bytes(tmp_path / "a.bin", b"data")
    finally:
        configure_faults(None)
    assert isinstance(raised.value, OSError) and isinstance(raised.value, DefectStudioError)
    assert raised.value.errno == 28 and "a.bin: No space left on device" in str(raised.value)
    assert list(tmp_path.iterdir()) == []


def test_written_files_have_the_usual_permissions_not_private_temp_ones(tmp_path: Path):
    from defect_studio import atomic

    atomic_write_bytes(tmp_path / "mask.png", b"x")
    assert (tmp_path / "mask.png").stat().st_mode & 0o777 == 0o666 & ~atomic._UMASK
