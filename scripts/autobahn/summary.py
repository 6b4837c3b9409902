"""Reads an Autobahn report index and prints `N passed, M failed`.

A case passes when its behaviour is OK, NON-STRICT or INFORMATIONAL (the issue's rule) and its
close behaviour is not FAILED. Failed cases are listed first, one per line.
"""
import json
import sys

GOOD = {"OK", "NON-STRICT", "INFORMATIONAL"}


def case_key(case):
    return [int(p) if p.isdigit() else p for p in case.split(".")]


def main(path):
    with open(path) as f:
        index = json.load(f)
    passed, failed = 0, []
    for agent, cases in sorted(index.items()):
        for case in sorted(cases, key=case_key):
            result = cases[case]
            behavior = result.get("behavior")
            close = result.get("behaviorClose")
            if behavior in GOOD and close != "FAILED":
                passed += 1
            else:
                failed.append("%s %s: behavior=%s close=%s" % (agent, case, behavior, close))
    for line in failed:
        print(line)
    print("%d passed, %d failed" % (passed, len(failed)))
    return 1 if failed or passed == 0 else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "reports/autobahn/index.json"))
