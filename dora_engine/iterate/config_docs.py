"""The table of ``dora-engine iterate``'s config keys in launch/README.md, written from the fields of
``IterateConfig`` (``dora_engine.training.config_docs`` does the writing):

    python -m dora_engine.iterate.config_docs [README] [--check]
"""

from __future__ import annotations

import sys

from dora_engine.iterate.config import IterateConfig
from dora_engine.training.config_docs import KeyTable, main

ITERATE = KeyTable(IterateConfig, "iterate-config-keys", "dora_engine.iterate.config_docs",
                   "dora_engine/iterate/config.py")

if __name__ == "__main__":
    sys.exit(main(table=ITERATE))
