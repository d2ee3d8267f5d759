"""DeepSpeed's own just-in-time ops that a run triggers, built under this package's build lock
(docs/design.md section 7.7), and the process-group state DeepSpeed keeps between engines.

DeepSpeed compiles its ops with ``torch.utils.cpp_extension`` on first use, and a build killed midway
leaves torch's ``lock`` file in the op's build folder, on which every later run waits forever and
silently. ``load_deepspeed_op`` builds (or loads the cached build of) such an op before DeepSpeed asks
for it, holding ``dora_engine.ops.builder.build_lock`` on its build folder: a leftover lock whose
builder is gone is removed with a message, and DeepSpeed later finds the op loaded.
"""

from __future__ import annotations

import sys
from pathlib import Path

#: The op DeepSpeed builds when its process group starts on CPU (the shared-memory all-reduce).
SHM_COMM_BUILDER = "ShareMemCommBuilder"


def load_deepspeed_op(builder_name: str) -> bool:
    """Build or load DeepSpeed's op ``builder_name`` (an op-builder class name of the current accelerator)
    under the build lock; False when this DeepSpeed has no such op for the accelerator, or it is not
    compatible here (DeepSpeed then does without it)."""
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator
    from deepspeed.git_version_info import installed_ops
    from torch.utils.cpp_extension import _get_build_directory

    from dora_engine.ops.builder import build_lock

    builder = get_accelerator().create_op_builder(builder_name)
    if builder is None or not deepspeed.ops.__compatible_ops__.get(builder.NAME, False):
        return False
    if installed_ops.get(builder.NAME, False):  # built ahead of time: nothing to compile
        builder.load(verbose=False)
        return True
    build_dir = Path(_get_build_directory(builder.NAME, verbose=False))
    with build_lock(build_dir):
        if not (build_dir / f"{builder.NAME}.so").exists():
            print(f"dora_engine: building DeepSpeed's {builder.NAME} op just in time in {build_dir}; "
                  "later runs reuse it", file=sys.stderr, flush=True)
        builder.load(verbose=False)
    return True


def forget_deepspeed_groups() -> None:
    """Drop the groups DeepSpeed caches at module level once the process group they belong to is destroyed.

    DeepSpeed (0.19) makes a clone of the world group on first use and keeps it in ``deepspeed.utils.groups``
    for the life of the process; after ``destroy_process_group`` and a new ``init_process_group`` (a process
    that trains again: several seeds of a benchmark, the rounds of a pipeline) every new engine would be
    given that dead group and fail ("Group ... is not registered"). Clearing the cache makes the next
    engine clone the new world group."""
    groups = sys.modules.get("deepspeed.utils.groups")
    if groups is None:  # DeepSpeed never ran in this process: nothing cached
        return
    for name in ("_WORLD_GROUP", "_DATA_PARALLEL_GROUP", "_ZERO_PARAM_INTRA_PARALLEL_GROUP"):
        if hasattr(groups, name):
            setattr(groups, name, None)
    for name in ("_EXPERT_PARALLEL_GROUP", "_EXPERT_PARALLEL_GROUP_RANKS", "_EXPERT_DATA_PARALLEL_GROUP",
                 "_EXPERT_DATA_PARALLEL_GROUP_RANKS", "_ALL_TO_ALL_GROUP"):
        cached = getattr(groups, name, None)
        if isinstance(cached, dict):
            cached.clear()
