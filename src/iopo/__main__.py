import sys

from iopo.cli import main

sys.exit(main())
