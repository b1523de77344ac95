"""Print the commands of README.md's "Quick start": the main job, then the tests.

``.ci/run`` runs exactly what this prints, so that CI and the README cannot drift apart:

    python3 tools/readme_commands.py main     # pip install . && cinstnorm demo
    python3 tools/readme_commands.py tests    # pip install -e ".[test]" && pytest

Only the standard library: it runs before anything is installed.
"""
from __future__ import annotations

import os
import sys

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")
NAMES = ("main", "tests")


def quick_start_commands(text: str) -> list[str]:
    """The command lines of the bash blocks in the "## Quick start" section, in order."""
    commands, in_section, in_block = [], False, False
    for line in text.splitlines():
        if line.startswith("## "):
            in_section = line.strip() == "## Quick start"
            continue
        if not in_section:
            continue
        if line.strip().startswith("```"):
            in_block = not in_block and line.strip() in ("```bash", "```sh")
            continue
        if in_block and line.strip() and not line.lstrip().startswith("#"):
            commands.append(line.strip())
    return commands


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or argv[0] not in NAMES:
        print(f"usage: {os.path.basename(__file__)} {{{'|'.join(NAMES)}}}", file=sys.stderr)
        return 2
    with open(README, encoding="utf-8") as f:
        commands = quick_start_commands(f.read())
    if len(commands) != len(NAMES):
        print(f"README.md's Quick start has {len(commands)} commands, expected "
              f"{len(NAMES)} (the main job, then the tests): {commands}", file=sys.stderr)
        return 1
    print(commands[NAMES.index(argv[0])])
    return 0


if __name__ == "__main__":
    sys.exit(main())
