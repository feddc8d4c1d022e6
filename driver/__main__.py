import sys

from driver.entrypoints.cli import main

sys.exit(main())
