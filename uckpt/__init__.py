"""uckpt: distributed DeepSpeed ZeRO -> Universal checkpoint conversion."""
__version__ = "0.1.0"

from .api import convert  # noqa: E402,F401
from .errors import CheckpointError, OutputError, UckptError, UnsupportedCheckpointError  # noqa: E402,F401
from .load import Topology, load_into_engine, load_state_dict  # noqa: E402,F401
