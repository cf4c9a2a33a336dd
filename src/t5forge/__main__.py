"""`python -m t5forge` is the `t5forge` command."""

import sys

from t5forge.cli import main

sys.exit(main())
