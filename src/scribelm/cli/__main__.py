import sys

from scribelm.cli import main

sys.exit(main())
