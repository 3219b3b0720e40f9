"""Per-module mutation score of the last `make mutate` run (reads mutmut's mutants/**/*.py.meta).

Not a test module (pytest collects only test_*.py). Usage, from the repository root, after `mutmut run`:
    python tests/mutation_score.py          # the per-module table for docs/TESTING.md
    python tests/mutation_score.py -f       # plus every function that still has survivors
Then `mutmut show NAME` prints a survivor's diff and `mutmut browse` opens them all.
"""

from __future__ import annotations

import json
import re
import sys
from collections import Counter, defaultdict
from pathlib import Path

from mutmut.stats import status_by_exit_code


def main(argv: list[str]) -> int:
    per_module: dict[str, Counter[str]] = defaultdict(Counter)
    per_function: dict[str, Counter[str]] = defaultdict(Counter)
    metas = sorted(Path("mutants").rglob("*.py.meta"))
    if not metas:
        print("no mutants/ here: run `make mutate` first", file=sys.stderr)
        return 1
    for meta in metas:
        for key, code in json.loads(meta.read_text())["exit_code_by_key"].items():
            module, function = key.rsplit(".", 1)
            status = status_by_exit_code[code]
            per_module[module][status] += 1
            per_function[f"{module}.{re.sub(r'__mutmut_[0-9]+$', '', function)}"][status] += 1

    def row(name: str, c: Counter[str]) -> str:
        total = sum(c.values())
        detected = c["killed"] + c["timeout"] + c["caught by type check"]
        other = total - detected - c["survived"] - c["no tests"]
        return (
            f"| {name} | {c['killed']} | {c['timeout']} | {c['survived']} | {c['no tests']} | {other} | {total} "
            f"| {100 * detected / total:.1f}% |"
        )

    print("| module | killed | timeout | survived | no tests | other | total | score |")
    print("|---|---|---|---|---|---|---|---|")
    everything: Counter[str] = Counter()
    for module, c in sorted(per_module.items()):
        print(row(module, c))
        everything += c
    print(row("**all**", everything))
    if "-f" in argv:
        print()
        for name, c in sorted(per_function.items()):
            if c["survived"] or c["no tests"]:
                print(row(name, c))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
