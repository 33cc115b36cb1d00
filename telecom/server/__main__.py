"""``python -m telecom.server``: see :func:`telecom.server.main`."""

import sys

from telecom.server import main

sys.exit(main())
