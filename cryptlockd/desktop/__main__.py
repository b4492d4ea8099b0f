import sys

from cryptlockd.desktop.main import main

sys.exit(main())
