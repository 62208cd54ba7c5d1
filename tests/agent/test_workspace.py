from __future__ import annotations

import os

import pytest

from agentrunner.agent.workspace import ToolError, Workspace


@pytest.fixture
def ws(tmp_path):
    root = tmp_path / "work"
    (root / "pkg").mkdir(parents=True)
    (root / ".git").mkdir()
    (root / ".git" / "config").write_text("[core]\n")
    (root / "pkg" / "mod.py").write_text("def f():\n    return 1\n\n\ndef g():\n    return 1\n")
    (tmp_path / "work-sibling").mkdir()
    (tmp_path / "work-sibling" / "secret.txt").write_text("sibling secret")
    (tmp_path / "outside.txt").write_text("outside secret")
    return Workspace(root)


@pytest.mark.parametrize(
    "path, fragment",
    [
        ("/etc/passwd", "absolute"),
        ("../outside.txt", "'..'"),
        ("pkg/../../outside.txt", "'..'"),
        ("../work-sibling/secret.txt", "'..'"),
        (".git/config", ".git"),
        ("pkg/../.git/config", "'..'"),
        ("~/x", "absolute"),
    ],
)
def test_escapes_are_refused(ws, path, fragment):
    for call in (lambda: ws.read_file(path), lambda: ws.write_file(path, "x"), lambda: ws.delete_file(path)):
        with pytest.raises(ToolError, match=fragment):
            call()
    assert (ws.root.parent / "outside.txt").read_text() == "outside secret"


def test_symlinks_leading_outside_are_refused(ws, tmp_path):
    os.symlink(tmp_path / "outside.txt", ws.root / "link.txt")
    os.symlink(tmp_path, ws.root / "linkdir")  # a symlink in a parent folder
    os.symlink(tmp_path / "work-sibling", ws.root / "sib")  # sibling whose name starts like the root
    os.symlink(ws.root / ".git", ws.root / "gitlink")
    for path in ("link.txt", "linkdir/outside.txt", "sib/secret.txt", "gitlink/config", "linkdir/new.txt"):
        with pytest.raises(ToolError):
            ws.read_file(path) if "new" not in path else ws.write_file(path, "x")
        with pytest.raises(ToolError):
            ws.write_file(path, "pwned")
    assert (tmp_path / "outside.txt").read_text() == "outside secret"
    assert not (tmp_path / "new.txt").exists()
    with pytest.raises(ToolError):
        ws.list_files("linkdir")
    with pytest.raises(ToolError):
        ws.search_code("secret", "sib")


def test_symlink_inside_the_workspace_is_fine(ws):
    os.symlink(ws.root / "pkg", ws.root / "alias")
    assert "return 1" in ws.read_file("alias/mod.py")


def test_list_read_search(ws):
    listing = ws.list_files(".")
    assert listing.splitlines() == ["pkg/mod.py"]  # .git never listed
    assert ws.read_file("pkg/mod.py", start_line=2, end_line=2).startswith("    2|     return 1")
    assert "pkg/mod.py:2:     return 1" in ws.search_code(r"return \d")
    with pytest.raises(ToolError, match="invalid regular expression"):
        ws.search_code("(")
    with pytest.raises(ToolError, match="no such file"):
        ws.read_file("nope.py")


def test_write_creates_parents_and_tracks_changes(ws):
    assert ws.write_file("new/deep/file.txt", "hello") == "created new/deep/file.txt (5 characters)"
    assert (ws.root / "new/deep/file.txt").read_text() == "hello"
    assert ws.changed == {"new/deep/file.txt"}


def test_edit_exactly_one_occurrence(ws):
    with pytest.raises(ToolError, match=r"occurs 2 times \(lines 2, 6\)"):
        ws.edit_file("pkg/mod.py", "return 1", "return 2")
    with pytest.raises(ToolError, match="not found.*closest lines") as info:
        ws.edit_file("pkg/mod.py", "def f():\n    return 7", "x")
    assert "def f():" in str(info.value)
    ws.edit_file("pkg/mod.py", "def g():\n    return 1", "def g():\n    return 2")
    assert (ws.root / "pkg/mod.py").read_text().endswith("return 2\n")


def test_syntax_errors_are_reported_at_once_and_block_finish_state(ws):
    result = ws.write_file("pkg/bad.py", "def broken(:\n")
    assert "does not parse: SyntaxError at line 1" in result
    assert "pkg/bad.py" in ws.broken
    ws.write_file("pkg/bad.py", "def fixed():\n    pass\n")
    assert ws.broken == {}
    assert "does not parse" in ws.write_file("data.json", "{bad json")
    assert "does not parse" in ws.write_file("pyproject.toml", "[tool\n")
    ws.delete_file("data.json")
    assert set(ws.broken) == {"pyproject.toml"}


def test_overwriting_keeps_the_file_mode(ws):
    script = ws.root / "run.sh"
    script.write_text("#!/bin/sh\necho old\n")
    script.chmod(0o750)
    ws.write_file("run.sh", "#!/bin/sh\necho new\n")
    assert script.stat().st_mode & 0o7777 == 0o750
    ws.edit_file("run.sh", "echo new", "echo newer")
    assert script.stat().st_mode & 0o7777 == 0o750
    assert script.read_text() == "#!/bin/sh\necho newer\n"
    assert not [p.name for p in ws.root.iterdir() if p.name.startswith(".agentrunner-tmp-")]


def test_symlinks_inside_are_followed_safely_and_listed_as_links(ws):
    (ws.root / "docs").mkdir()
    os.symlink("../pkg/mod.py", ws.root / "docs" / "mod.py")  # relative, through ".."
    os.symlink(str(ws.root / "pkg"), ws.root / "abs")  # absolute, naming the root
    os.symlink("loop-b", ws.root / "loop-a")
    os.symlink("loop-a", ws.root / "loop-b")
    assert ws.read_file("docs/mod.py", end_line=1) == "    1| def f():\n… (5 more lines; read from line 2)"
    assert "return 1" in ws.read_file("abs/mod.py")
    assert ws.search_code("def g", "abs") == "pkg/mod.py:5: def g():"
    assert ws.search_code("def g") == "pkg/mod.py:5: def g():"  # links are not searched twice
    # Writing through an inside link changes the target, recorded under its real path.
    ws.write_file("docs/mod.py", "X = 1\n")
    assert (ws.root / "pkg" / "mod.py").read_text() == "X = 1\n"
    assert (ws.root / "docs" / "mod.py").is_symlink()
    assert ws.changed == {"pkg/mod.py"}
    with pytest.raises(ToolError, match="too many levels of symlinks"):
        ws.read_file("loop-a")
    assert ws.list_files(".").splitlines() == [
        "abs -> " + str(ws.root / "pkg") + " (symlink)",
        "loop-a -> loop-b (symlink)",
        "loop-b -> loop-a (symlink)",
        "docs/mod.py -> ../pkg/mod.py (symlink)",
        "pkg/mod.py",
    ]
    # Deleting a link removes the link, not its target.
    assert ws.delete_file("docs/mod.py") == "deleted docs/mod.py"
    assert (ws.root / "pkg" / "mod.py").exists() and not (ws.root / "docs" / "mod.py").exists()


def test_read_file_lines_and_arguments(ws):
    (ws.root / "crlf.txt").write_bytes(b"one\r\ntwo\x0cstill two\r\nthree")
    assert ws.read_file("crlf.txt") == "    1| one\n    2| two\x0cstill two\n    3| three"
    assert (
        ws.read_file("crlf.txt", start_line="2", end_line=2)
        == "    2| two\x0cstill two\n… (1 more lines; read from line 3)"
    )
    for bad in ({"start_line": "two"}, {"end_line": [3]}, {"start_line": 3, "end_line": 2}):
        with pytest.raises(ToolError, match="start_line|end_line"):
            ws.read_file("crlf.txt", **bad)
    (ws.root / "long.min.js").write_text("x" * 300_000 + "\nsecond\n")
    shown = ws.read_file("long.min.js").splitlines()
    assert shown[0].startswith("    1| xxx") and shown[1:] == ["… (line 1 cut at 262144 bytes)", "… (read from line 2)"]
    assert ws.read_file("long.min.js", start_line=2) == "    2| second"


def test_text_the_model_cannot_have_meant_is_an_error_not_a_crash(ws):
    for call in (
        lambda: ws.write_file("pkg/x.py", "a = '\ud800'\n"),
        lambda: ws.write_file("pkg/\ud800.py", "a = 1\n"),
        lambda: ws.edit_file("pkg/mod.py", "return 1", "\ud800"),
    ):
        with pytest.raises(ToolError, match="not valid Unicode"):
            call()
    assert ws.changed == set()


def test_bytes_that_are_not_utf8_survive_an_edit(ws):
    (ws.root / "latin1.txt").write_bytes(b"caf\xe9 = 1\nname = 'x'\n")
    ws.edit_file("latin1.txt", "name = 'x'", "name = 'y'")
    assert (ws.root / "latin1.txt").read_bytes() == b"caf\xe9 = 1\nname = 'y'\n"
