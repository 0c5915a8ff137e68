"""`python -m moeless ...`: the same command as `moeless ...` (see moeless.cli)."""
import sys

from moeless.cli import main

if __name__ == "__main__":
    sys.exit(main())
