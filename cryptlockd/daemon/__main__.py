import sys

from cryptlockd.daemon.main import main

sys.exit(main())
