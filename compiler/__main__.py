import sys

from hetflow.cli import main

sys.exit(main())
