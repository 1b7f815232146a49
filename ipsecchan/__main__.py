import sys

from ipsecchan.cli import main

sys.exit(main())
