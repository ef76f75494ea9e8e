"""Check a dataset or a recording before using it, and report every problem, not just the first.

    fmfast check DATA [DATA ...]

DATA is a V2 root (videos/, currents/, timestamps/, train.json, test.json), a V1 root or .mat
file, a current log or frame timestamps CSV, or a video file. Each is read with the same rules
training, ingest and detect use (fmfast.data.check). Prints one `problem:` line per problem
found (file, place, what is wrong) and exits with code 2 when there is any; otherwise prints
what was checked and exits 0.
"""
from __future__ import annotations

from fmfast.cli.common import Parser, fail
from fmfast.data.check import check


def build_parser(prog: str = "fmfast check") -> Parser:
    p = Parser(prog=prog, description=__doc__)
    p.add_argument("data", nargs="+", help="dataset folder, .mat, .csv or video file")
    return p


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    total = 0
    for data in a.data:
        report = check(data)
        for line in report.checked:
            print(f"  ok: {line}")
        for line in report.problems:
            print(f"problem: {line}")
        kind = f" ({report.kind})" if report.kind else ""
        print(f"{data}{kind}: {len(report.problems) or 'no'} problem{'s' * (len(report.problems) != 1)}")
        total += len(report.problems)
    if total:
        fail(f"{total} problem{'s' * (total != 1)} found in {', '.join(map(str, a.data))}")
    return 0
