import sys

from kaki.cli import main

sys.exit(main())
