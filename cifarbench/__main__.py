import sys

from cifarbench.cli import main

sys.exit(main())
