import sys

from klsweep.report.cli import main

sys.exit(main())
