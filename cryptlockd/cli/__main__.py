import sys

from cryptlockd.cli.main import main

sys.exit(main())
