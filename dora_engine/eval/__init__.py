"""Evaluation (``dora-engine eval``): generation, win rates against golden responses, calibration diagnostic.

Modules:

``generate``
    ``generate_records``: responses with the paper's decoding (temperature 0.8, top-k 50, top-p 0.9; see
    ``dora_engine.generation``), transformers or vllm; JSONL and AlpacaEval ``model_outputs.json`` writers and a
    reader.
``comparison``
    what a pairwise judge is given and answers: ``Comparison``, ``Verdict``, the ``Judge`` protocol.
``judges`` and ``http_judge``
    pairwise judges (``make_judge``): ``oracle``, ``reward-model:PATH``, ``openai:MODEL`` (cached, retried).
``winrate``
    ``pair_with_golden`` and ``summarise``: win / lose / tie rates with percentile-bootstrap intervals.
``calibration_diag``
    the reward–confidence diagnostic: pooled reward normalisation, OLS slope per model, one scatter PNG.

Heavy libraries (transformers, matplotlib) are imported inside the functions that need them.
"""
