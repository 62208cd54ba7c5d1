"""Presenting artifacts: diffs, test tails and transcripts, including a 5,000-step one."""

from __future__ import annotations

import io
import json

from inspector.present import parse_diff, report_tail, timeline, transcript_page

DIFF = """From 1 Mon Sep 17 00:00:00 2001
Subject: [PATCH] fix

diff --git a/calc.py b/calc.py
index 1..2 100644
--- a/calc.py
+++ b/calc.py
@@ -1,3 +1,3 @@
 def add(a, b):
-    return a - b
+    return a + b  # "fixed"
diff --git a/new.txt b/new.txt
new file mode 100644
--- /dev/null
+++ b/new.txt
@@ -0,0 +1 @@
+<script>alert(1)</script>
"""
DIFF += "-- \n2.39.5\n"  # format-patch's signature (its "-- " ends in a space)


def test_diff_is_split_by_file_numbered_highlighted_and_escaped():
    files, cut = parse_diff(DIFF)
    assert not cut
    assert [(f.path, f.added, f.removed) for f in files] == [("calc.py", 1, 1), ("new.txt", 1, 0)]
    kinds = [(line.kind, line.old, line.new) for line in files[0].lines]
    assert kinds == [("hunk", None, None), ("ctx", 1, 1), ("del", 2, None), ("add", None, 2)]
    assert 'class="hl-k"' in files[0].lines[1].html  # "def" is a Python keyword
    assert "<script>" not in files[1].lines[1].html and "&lt;script&gt;" in files[1].lines[1].html
    assert all("2.39" not in line.html for f in files for line in f.lines)


def test_diff_is_cut_at_the_line_limit():
    files, cut = parse_diff(DIFF, max_lines=10)
    assert cut and files[0].path == "calc.py"


def test_test_tail_marks_failures_and_counts_the_cut():
    log = "\n".join(f"line {i}" for i in range(500)) + "\nFAILED test_x.py::test_y - assert 1 == 2\n1 failed\n"
    tail = report_tail(log, lines=50)
    assert tail["cut"] == 452 and len(tail["lines"]) == 50
    assert tail["lines"][tail["first_failing"]].text.startswith("FAILED test_x.py")


def test_timeline_scales_phases_and_llm_share():
    metrics = {"phases": {"tests": 2.0, "agent": 6.0, "claim": 0.0}, "total_seconds": 10.0, "llm": {"duration": 4.0}}
    result = timeline(metrics)
    assert [(s.name, round(s.percent), round(s.offset)) for s in result["segments"]] == [
        ("claim", 0, 0),
        ("agent", 60, 0),
        ("tests", 20, 60),
    ]
    assert result["llm_percent"] == 40.0
    assert timeline({})["segments"] == []


def big_transcript(steps: int) -> bytes:
    out = io.StringIO()
    for n in range(1, steps + 1):
        out.write(
            json.dumps({"type": "request", "model": "m", "messages": [{"role": "tool", "content": "x" * 200}]}) + "\n"
        )
        if n == 3:
            out.write(
                json.dumps({"type": "error", "kind": "rate_limited", "message": "slow down", "status": 429}) + "\n"
            )
            out.write(json.dumps({"type": "retry", "kind": "rate_limited", "attempt": 1, "wait": 1.0}) + "\n")
        call = {
            "id": f"c{n}",
            "type": "function",
            "function": {"name": "read_file", "arguments": json.dumps({"path": f"f{n}.py"})},
        }
        out.write(
            json.dumps(
                {
                    "type": "response",
                    "message": {"role": "assistant", "content": f"thinking {n}", "tool_calls": [call]},
                    "prompt_tokens": n,
                    "completion_tokens": 1,
                    "cost_usd": "0.000001",
                    "attempts": 2 if n == 3 else 1,
                }
            )
            + "\n"
        )
        result = "y\n" * (40 if n % 2 else 2)
        out.write(
            json.dumps({"type": "tool_call", "name": "read_file", "arguments": "{}", "ok": n != 4, "result": result})
            + "\n"
        )
    return out.getvalue().encode()


def test_transcript_pages_a_long_conversation():
    data = big_transcript(5000)
    first = transcript_page(io.BytesIO(data), page=1, per_page=50)
    assert first["total_steps"] == 5000 and first["pages"] == 100 and len(first["steps"]) == 50
    step3, step4 = first["steps"][2], first["steps"][3]
    assert step3.attempts == 2 and [e["type"] for e in step3.errors] == ["error", "retry"]
    assert step4.tools[0].ok is False
    assert first["steps"][0].tools[0].folded and not first["steps"][1].tools[0].folded
    assert json.loads(first["steps"][0].tools[0].pretty_arguments) == {"path": "f1.py"}
    last = transcript_page(io.BytesIO(data), page=100, per_page=50)
    assert [s.number for s in last["steps"]] == list(range(4951, 5001))
    assert last["steps"][-1].content == "thinking 5000" and last["steps"][-1].prompt_tokens == 5000
    beyond = transcript_page(io.BytesIO(data), page=101, per_page=50)
    assert beyond["steps"] == []


def test_transcript_survives_garbage_lines():
    lines = [b'{"type": "request", "messages": []}', b"not json", b'{"type": "response", "message": {"content": "hi"}}']
    page = transcript_page(lines)
    assert page["total_steps"] == 1 and page["steps"][0].content == "hi"
