"""`analyze`: run estimators over checkpoints (not yet available)."""
import sys


def main(argv=None) -> int:
    print("analyze: not yet available", file=sys.stderr)
    return 2
