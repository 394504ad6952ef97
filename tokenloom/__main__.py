"""`python -m tokenloom ...` works like the `tokenloom` command."""

import sys

from tokenloom.cli import main

if __name__ == "__main__":
    sys.exit(main())
