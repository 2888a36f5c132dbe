import sys

from klsweep import _lean_imports

_lean_imports.install()  # klsweep's own process, as ``python -m klsweep`` (see there)

from klsweep.bench.cli import main

sys.exit(main())
