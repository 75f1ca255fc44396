"""Run several itlens commands in one process: ``python tests/cli_sequence.py CMD ARGS --- CMD ARGS ...``.

The sharding test launches it under ``accelerate launch`` so that one launch (two processes, one
torch import each) covers both sharded commands.
"""

import sys

from itlens.cli import main

if __name__ == "__main__":
    argv, commands = sys.argv[1:], [[]]
    for a in argv:
        commands.append([]) if a == "---" else commands[-1].append(a)
    for cmd in commands:
        main(cmd)
