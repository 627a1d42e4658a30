import sys

from pyeuler.cli import main

sys.exit(main())
