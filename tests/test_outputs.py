"""moeless.outputs: files written together are renamed into place together, with the permissions a plain write
would give, and a failure names the output it could not write and leaves no temporaries behind."""
import os
import stat

import pytest

from moeless.outputs import OutputFiles, write_text


def _mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def test_new_files_follow_the_umask(tmp_path):
    old = os.umask(0o027)
    try:
        write_text(tmp_path / "a.md", "x")
        reference = tmp_path / "plain.md"
        with open(reference, "w") as fh:  # what a plain write gives under the same umask
            fh.write("x")
    finally:
        os.umask(old)
    assert _mode(tmp_path / "a.md") == _mode(reference) == 0o640


def test_a_rewrite_keeps_the_existing_mode(tmp_path):
    path = tmp_path / "report.md"
    path.write_text("old")
    os.chmod(path, 0o604)
    write_text(path, "new")
    assert path.read_text() == "new" and _mode(path) == 0o604


def test_failed_commit_names_the_output_and_leaves_no_temporaries(tmp_path):
    (tmp_path / "b.png").mkdir()  # a folder where a file must go: its rename fails
    (tmp_path / "c.md").write_text("earlier")
    with pytest.raises(OSError, match="cannot write .*b.png.*written before it: .*a.md"):
        with OutputFiles() as out:
            out.write_text(tmp_path / "a.md", "1")
            out.write_text(tmp_path / "b.png", "2")
            out.write_text(tmp_path / "c.md", "3")
    assert (tmp_path / "c.md").read_text() == "earlier"  # not reached: untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.md", "b.png", "c.md"]  # no temporaries


def test_an_error_inside_the_block_writes_nothing(tmp_path):
    (tmp_path / "a.md").write_text("earlier")
    with pytest.raises(RuntimeError):
        with OutputFiles() as out:
            out.write_text(tmp_path / "a.md", "new")
            raise RuntimeError("failed while rendering")
    assert [p.name for p in tmp_path.iterdir()] == ["a.md"] and (tmp_path / "a.md").read_text() == "earlier"
