import sys

from vidtune.cli import main

sys.exit(main())
