import sys

from klsweep.bench.cli import main

sys.exit(main())
