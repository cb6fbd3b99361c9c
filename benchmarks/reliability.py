"""The reliability table of BENCHMARKS.md: the attack suite (`tests/attacks/`) run and counted.

Every attack is one test case that asserts the outcome a careful user expects: a kill leaves
nothing that is trusted and the next run recovers; damage, a bad input or a misused path stops the
command with one message naming it (no traceback) and nothing is lost. A case that passes is an
attack survived; the table counts them per kind of attack. Cases marked `guard` check that valid
input is still accepted; they are counted apart.

    python benchmarks/reliability.py
"""

import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ElementTree
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PYTEST = [sys.executable, "-m", "pytest", "-q"]
KINDS = {
    "kills survived (SIGKILL at the worst moment of a stage, then the next run)": "kill",
    "corruptions caught (store files and checkpoints deleted, emptied, truncated, flipped, "
    "edited)": "corrupt",
    "bad inputs rejected (params, dataset files, foreign and malicious checkpoints, stale "
    "inputs)": "bad",
    "full disks reported (a real small tmpfs)": "disk",
    "paths refused (someone's files and folders, stores inside stores or over inputs)": "path",
}


def kind_of(file: str, name: str) -> str:
    if "full_disk" in name:
        return "disk"
    if file.endswith("test_kills") or "kill" in name:
        return "kill"
    if name.startswith("test_bad_input"):
        return "bad"
    if file.endswith("test_store_damage") or "corrupt" in name or "edited" in name:
        return "corrupt"
    if file.endswith("test_paths"):
        return "path"
    return "bad"


def main() -> None:
    listed = subprocess.run(
        [*PYTEST, "--collect-only", "-m", "guard", "tests/attacks"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    )
    guards = {line.split("::")[-1] for line in listed.stdout.splitlines() if "::" in line}
    with tempfile.TemporaryDirectory() as folder:
        report = Path(folder) / "attacks.xml"
        subprocess.run(
            [*PYTEST, "-p", "no:cacheprovider", "tests/attacks", "--junitxml", str(report)],
            cwd=REPO,
            check=False,
        )
        cases = ElementTree.parse(report).getroot().iter("testcase")
        tried, passed = Counter(), Counter()
        for case in cases:
            kind = kind_of(case.get("classname", ""), case.get("name", ""))
            guard = case.get("name", "") in guards
            kind = "guard" if guard else kind
            tried[kind] += 1
            if not any(child.tag in ("failure", "error", "skipped") for child in case):
                passed[kind] += 1
    print("| attack | handled / tried |")
    print("|---|---|")
    for label, kind in KINDS.items():
        print(f"| {label} | {passed[kind]} / {tried[kind]} |")
    attacks = [kind for kind in tried if kind != "guard"]
    print(f"| all attacks | {sum(passed[k] for k in attacks)} / {sum(tried[k] for k in attacks)} |")
    print(f"| guards: valid input still accepted | {passed['guard']} / {tried['guard']} |")


if __name__ == "__main__":
    main()
