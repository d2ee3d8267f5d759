"""The DoRA loss inside other trainers (docs/design.md section 9).

- ``dora_engine.integrations.trl``: ``DoRADPOConfig`` and ``DoRADPOTrainer``, TRL's ``DPOTrainer`` with its
  loss computed by ``dora_engine.ops.dora_loss`` (needs ``trl``);
- ``dora_engine.integrations.hf_trainer``: ``ListwiseCollator`` (K responses per prompt), ``listwise_loss``,
  ``reference_logps`` and ``ListwiseTrainer``, a ``transformers.Trainer`` with the same loss.

Nothing here is imported by ``dora_engine.ops`` or the engine; each module imports its trainer library.
"""
