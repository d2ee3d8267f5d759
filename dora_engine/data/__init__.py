"""The data side of dora-engine (docs/design.md section 3).

Each pipeline step is a plain function, so the steps compose in Python as on the command line
(``dora-engine data convert | augment | score | corrupt | synth``):

- schema: ``Record``, ``Response``, ``RecordError``, ``read_records``, ``write_records``, ``iter_jsonl``;
- ``converters``: ``convert_files(fmt, paths, target=None)``, ``from_trl``, ``from_hh_rlhf``, ``from_tldr``,
  ``from_alpaca_eval``, ``from_authors``, ``iter_rows``, ``read_rows``;
- ``augment``: ``augment_records``, ``augment_file`` (``Sampling`` from ``dora_engine.generation``);
- ``score``: ``score_records``, ``score_file``, ``ORACLE``;
- ``corrupt``: ``corrupt_records``;
- ``synth``: ``synth_records``, ``oracle_reward``, ``build_synth_tokenizer``.

No module here imports torch or transformers at import time.
"""

from dora_engine.data.augment import augment_file, augment_records
from dora_engine.data.converters import (
    convert_files,
    from_alpaca_eval,
    from_authors,
    from_hh_rlhf,
    from_tldr,
    from_trl,
    iter_rows,
    read_rows,
)
from dora_engine.data.corrupt import corrupt_records
from dora_engine.data.schema import Record, RecordError, Response, iter_jsonl, read_records, write_records
from dora_engine.data.score import ORACLE, score_file, score_records
from dora_engine.data.synth import build_synth_tokenizer, oracle_reward, synth_records
from dora_engine.generation import Sampling

__all__ = [
    "ORACLE",
    "Record",
    "RecordError",
    "Response",
    "Sampling",
    "augment_file",
    "augment_records",
    "build_synth_tokenizer",
    "convert_files",
    "corrupt_records",
    "from_alpaca_eval",
    "from_authors",
    "from_hh_rlhf",
    "from_tldr",
    "from_trl",
    "iter_jsonl",
    "iter_rows",
    "oracle_reward",
    "read_records",
    "read_rows",
    "score_file",
    "score_records",
    "synth_records",
    "write_records",
]
