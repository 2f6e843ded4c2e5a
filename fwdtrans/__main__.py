"""``python -m fwdtrans``: the command line (``fwdtrans.app``)."""

import sys

from .app import main

sys.exit(main())
