import sys

from mdsgen.cli import main

sys.exit(main())
