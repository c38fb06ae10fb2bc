"""tests/repeated_code.py, the pre-commit repeated-code check: it finds a planted repeat, reports it once as a
maximal run, and ignores imports, comments, blank lines and overlapping windows of one file."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import repeated_code  # noqa: E402

BODY = "\n".join(f"    total = total * {k} + value_{k}" for k in range(8)) + "\n"


def test_finds_a_planted_repeat(tmp_path):
    a, b, c = tmp_path / "a.py", tmp_path / "b.py", tmp_path / "c.py"
    a.write_text("import os\n\n\ndef f(value_0):\n    total = 0\n" + BODY + "    return total\n")
    b.write_text("# other\nimport sys\n\ndef g(value_0):\n    # a comment\n\n" + BODY)
    c.write_text("\n".join(f"x_{k} = {k}" for k in range(20)) + "\n")  # no repeat
    pairs = repeated_code.find_pairs([str(a), str(b), str(c)], 6)
    assert pairs == [(str(a), 6, 13, str(b), 7, 14)]  # one maximal run of the 8 shared lines
    assert repeated_code.find_pairs([str(a), str(b)], 9) == []


def test_ignores_imports_and_overlapping_windows(tmp_path):
    a, b = tmp_path / "a.py", tmp_path / "b.py"
    imports = "".join(f"import mod_{k}\n" for k in range(10))
    a.write_text(imports + "y = 1\n")
    b.write_text(imports + "y = 2\n")
    run = tmp_path / "run.py"
    run.write_text("x += 1\n" * 9)  # windows 0-5 and 3-8 overlap: one run of equal lines, not a repeated block
    assert repeated_code.find_pairs([str(a), str(b)], 6) == []
    assert repeated_code.find_pairs([str(run)], 6) == []
    run.write_text("x += 1\n" * 12)  # lines 1-6 and 7-12 do not overlap: a repeat
    assert repeated_code.find_pairs([str(run)], 6) == [(str(run), 1, 6, str(run), 7, 12)]
