"""Phase 2: the DeepSpeed ZeRO-3 training engine for SFT and DoRA alignment (docs/design.md sections 5-7).

``config`` (YAML schema), ``data`` (tokenisation, sampler, collator), ``model`` (the module DeepSpeed
wraps), ``engine`` (the trainer), ``ref_logps`` (reference cache), ``checkpoint``, ``metrics``,
``export``, ``plots``; ``commands`` registers ``dora-engine train`` and ``dora-engine ref-logps``.
Heavy libraries (deepspeed, transformers) are imported inside functions.
"""
