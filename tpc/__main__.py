import sys

from tpc.cli import main

sys.exit(main())
