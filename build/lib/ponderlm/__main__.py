import sys

from ponderlm.cli import main

sys.exit(main())
