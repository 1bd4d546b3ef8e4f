import sys

from carclf.cli import main

sys.exit(main())
