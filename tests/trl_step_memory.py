"""Peak memory of one training step of TRL's DPOTrainer or of DoRADPOTrainer on a loss path.

``python tests/trl_step_memory.py VARIANT …`` (each ``trl``, ``logits`` or ``fused_linear``) trains, for each
variant in turn, a fresh tiny float32 Llama with a large vocabulary (V = 32000, H = 64) on CPU for one step on
the same data, reference log-probs precomputed, and prints one JSON line per variant: ``step_bytes``, the
peak resident memory during the step above the resident memory before it (the ``resource.getrusage``
high-water mark, reset to the resident memory before each step through ``/proc/self/clear_refs``, Linux),
``logits_bytes`` of the step's N·T·V logits, and the step's ``loss``. Run it in the environment ``ENV``:
with a fixed ``MALLOC_MMAP_THRESHOLD_`` glibc maps every large block and returns it when it is freed, so
that resident memory is what is allocated, not what an earlier phase freed into the heap.
"""

from __future__ import annotations

import json
import os
import random
import resource
import sys
import tempfile
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

VOCAB, HIDDEN, PROMPTS, WORDS_PER_TEXT = 32000, 64, 8, 30
TEXTS = (("prompt", ""), ("chosen", " "), ("rejected", " "))  # completions start a word
#: The environment to run this script in (a fixed mmap threshold also turns glibc's dynamic one off).
ENV = {"MALLOC_MMAP_THRESHOLD_": str(128 << 10), "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"}


def resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def step_peak(train) -> int:
    """Peak resident bytes of ``train()`` above the resident memory before it."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # the high-water mark := the resident memory now
    before = resident_bytes()
    train()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before  # ru_maxrss: KiB on Linux


def main(variants: list[str]) -> None:
    warnings.filterwarnings("ignore")
    import torch
    import trl
    from datasets import Dataset
    from training_toy import WORDS, build_tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    from dora_engine.integrations.trl import DoRADPOConfig, DoRADPOTrainer

    root = tempfile.mkdtemp()
    tokenizer = build_tokenizer(Path(root))
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=2 * HIDDEN, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4 * WORDS_PER_TEXT,
                         tie_word_embeddings=False, pad_token_id=0, bos_token_id=2, eos_token_id=3)
    rng = random.Random(0)
    rows = [{key: prefix + " ".join(rng.choices(WORDS, k=WORDS_PER_TEXT)) for key, prefix in TEXTS}
            for _ in range(PROMPTS)]
    common = {"output_dir": root, "per_device_train_batch_size": PROMPTS, "report_to": "none",
              "save_strategy": "no", "use_cpu": True, "bf16": False, "max_steps": 1, "beta": 0.1,
              "precompute_ref_log_probs": True, "precompute_ref_batch_size": 1}
    for variant in variants:
        torch.manual_seed(0)
        model = LlamaForCausalLM(config)
        data = Dataset.from_list(rows)
        if variant == "trl":
            trainer = trl.DPOTrainer(model, args=trl.DPOConfig(**common), train_dataset=data,
                                     processing_class=tokenizer)
        else:
            args = DoRADPOConfig(**common, dora_loss="dpo", dora_strategy="erm", dora_loss_path=variant)
            trainer = DoRADPOTrainer(model, args=args, train_dataset=data, processing_class=tokenizer)
        N, T = trainer.data_collator([trainer.train_dataset[i] for i in range(PROMPTS)])["input_ids"].shape
        print(json.dumps({"variant": variant, "step_bytes": step_peak(trainer.train),
                          "logits_bytes": N * T * VOCAB * 4, "loss": trainer.state.log_history[-1]["train_loss"]}),
              flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
