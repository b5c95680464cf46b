"""Under torchrun: ``python -m uckpt`` whose rank $KILL_RANK kills itself with SIGKILL right after its
$KILL_AFTER-th flush of written parameter files (a node lost mid-conversion). Test helper only."""
import os
import signal
import sys

from uckpt.conversion import output
from uckpt.tools import cli

if int(os.environ.get("RANK", "0")) == int(os.environ["KILL_RANK"]):
    real_flush, flushes = output.OutputFolder.flush, [0]

    def flush(self):
        before = len(self._written)
        real_flush(self)
        flushes[0] += len(self._written) > before
        if flushes[0] >= int(os.environ["KILL_AFTER"]):
            os.kill(os.getpid(), signal.SIGKILL)

    output.OutputFolder.flush = flush

sys.exit(cli.main(sys.argv[1:]))
