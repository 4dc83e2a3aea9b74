"""``fnsft.stages``: the stage classes of :mod:`kfp_components.stages`."""

from kfp_components.stages import *  # noqa: F403
from kfp_components.stages import __all__  # noqa: F401
