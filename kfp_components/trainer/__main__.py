"""``python -m kfp_components.trainer`` (and ``torchrun ... -m kfp_components.trainer``)."""

import sys

from kfp_components.trainer.cli import main

sys.exit(main())
