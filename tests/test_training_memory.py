"""The trainer's memory under ZeRO-3 in fp32: no second copy of the weights as the optimizer's master
(``startup.share_fp32_master``) and torch's fused AdamW, with the same training as DeepSpeed's own copy."""

from __future__ import annotations

import pytest
from training_toy import make_toy


def _two_steps(rank: int, config: str, share: bool) -> dict:
    """Rank body: a trainer of ``config`` (fp32) with or without the shared master; two steps."""
    from dora_engine.training import startup
    from dora_engine.training.config import load_config
    from dora_engine.training.engine import Trainer

    if not share:
        startup.share_fp32_master = lambda optimizer: 0
    trainer = Trainer.from_config(load_config(config), progress=False)
    optimizer = trainer.engine.optimizer
    pairs = list(zip(optimizer.fp32_partitioned_groups_flat, optimizer.fp16_partitioned_groups_flat, strict=True))
    shared = [master.data_ptr() == weights.data_ptr() for master, weights in pairs]
    losses = [trainer.train_step(step)[0]["loss"] for step in range(2)]
    state = trainer.trained_state_dict()
    fused = optimizer.optimizer.defaults.get("fused")
    trainer.close()
    return {"shared": shared, "losses": losses, "state": state, "fused": fused}


@pytest.mark.multiproc
def test_the_fp32_master_is_the_weights_and_trains_the_same(tmp_path):
    from multiproc import run_gloo

    config = str(make_toy(tmp_path, n_records=4, overrides={"train.precision": "fp32"}))
    (own,) = run_gloo(_two_steps, 1, config, True)
    (deepspeed,) = run_gloo(_two_steps, 1, config, False)
    assert own["shared"] and all(own["shared"])
    assert not any(deepspeed["shared"])  # DeepSpeed alone keeps a clone: the test can tell
    assert own["fused"] is True
    assert own["losses"] == deepspeed["losses"]
    assert own["state"].keys() == deepspeed["state"].keys()
    for name, value in own["state"].items():
        assert value.equal(deepspeed["state"][name]), name
