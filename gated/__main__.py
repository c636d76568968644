"""`python -m gated`."""

import sys

from gated.cli import main

sys.exit(main())
