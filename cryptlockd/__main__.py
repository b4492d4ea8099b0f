"""`python -m cryptlockd` runs the daemon."""

import sys

from cryptlockd.daemon import main

sys.exit(main())
