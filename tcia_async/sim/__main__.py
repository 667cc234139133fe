import sys

from tcia_async.sim.cli import main

sys.exit(main())
