"""Policy files that once crashed, froze or blew up a loader (issue 10, item 8): for the
tests that reload them into a running monitor, unit and kernel alike."""

from __future__ import annotations

HOSTILE_POLICIES = {
    "nested 100000 deep": "mode: enforce\nrules: " + "[" * 100_000 + "]" * 100_000 + "\n",
    "billion laughs": "l0: &l0 [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * 9) + "]\n" for i in range(1, 9))
    + "mode: *l8\n",
    "a 5000-digit number": "mode: enforce\nrules:\n  - {name: a, event: processes, "
                           "action: kill, match: {above: " + "7" * 5000 + "}}\n",
    "a backreference": "mode: enforce\nrules:\n  - {name: a, event: exec, action: kill, "
                       "match: {argv: ['(a)\\1']}}\n",
}
