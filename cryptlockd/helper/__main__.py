import sys

from cryptlockd.helper.main import main

sys.exit(main(sys.argv[1:]))
