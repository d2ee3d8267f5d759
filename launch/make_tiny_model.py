"""Write a tiny randomly initialised model with a given tokenizer (the quickstart's policy, or an encoder).

``python launch/make_tiny_model.py --kind llama|bert --tokenizer DIR --out DIR [--hidden 64 --layers 2 ...]``
``llama``: the causal LM to align (loads with ``AutoModelForCausalLM``); ``bert``: an encoder backbone
for ``dora-engine calibrate --backbone DIR`` (the classifier loads its encoder with ``AutoModel``).
"""

from __future__ import annotations

import argparse
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kind", choices=("llama", "bert"), default="llama")
    parser.add_argument("--tokenizer", required=True, help="tokenizer folder (save_pretrained)")
    parser.add_argument("--out", required=True, help="model folder to write")
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--max-positions", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    torch.manual_seed(args.seed)
    special = dict(pad_token_id=tokenizer.pad_token_id, max_position_embeddings=args.max_positions)
    if args.kind == "llama":
        config = LlamaConfig(
            vocab_size=len(tokenizer), hidden_size=args.hidden, intermediate_size=2 * args.hidden,
            num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.heads,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=True,
            **special,
        )
        model = LlamaForCausalLM(config)
    else:
        config = BertConfig(
            vocab_size=len(tokenizer), hidden_size=args.hidden, intermediate_size=2 * args.hidden,
            num_hidden_layers=args.layers, num_attention_heads=args.heads, **special,
        )
        model = BertModel(config)
    out = Path(args.out)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    print(f"tiny {args.kind} ({sum(p.numel() for p in model.parameters()):,} parameters) -> {out}")


if __name__ == "__main__":
    main()
