"""``python -m dora_engine.training``: one rank of a run (what the ``deepspeed`` launcher starts)."""

import sys

from dora_engine.training.commands import launch_main

sys.exit(launch_main())
