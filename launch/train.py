"""One rank of a dora-engine run: ``deepspeed [--hostfile H] launch/train.py --config C.yaml [key=value ...]``.

Also ``--resume auto`` and ``--task ref-logps``. Identical to ``dora-engine train`` (docs/design.md section 6).
"""

import sys

from dora_engine.training.commands import launch_main

if __name__ == "__main__":
    sys.exit(launch_main())
