"""``python -m runtime`` is the ``ingress`` command."""

import sys

from ._cli import main

sys.exit(main())
