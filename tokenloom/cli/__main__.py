"""`python -m tokenloom.cli`: the `tokenloom` command."""

import sys

from tokenloom.cli import main

sys.exit(main())
