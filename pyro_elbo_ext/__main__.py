"""``python -m pyro_elbo_ext``: the ``pyro-elbo-ext`` command line."""

import sys

from .cli import main

sys.exit(main())
