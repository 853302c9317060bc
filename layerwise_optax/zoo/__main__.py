"""``python -m layerwise_optax.zoo``: see :mod:`layerwise_optax.zoo._cli`."""

import sys

from layerwise_optax.zoo._cli import main

sys.exit(main())
