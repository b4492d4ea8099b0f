"""`python -m cryptlockd` runs the daemon."""

import sys

from cryptlockd.daemon.main import main

sys.exit(main())
