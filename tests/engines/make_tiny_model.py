"""Build a tiny random-weight Qwen3 model directory that a real vLLM can load, fully offline.

    python make_tiny_model.py OUT_DIR --tokenizer-dir DIR [--seed 0]

Run it with the vLLM venv's python: it needs torch and transformers, which the project's own
venv does not carry. The tokenizer comes from DIR (``tokenizer.json`` or ``tokenizer.json.gz``
plus ``tokenizer_config.json``, e.g. ``shared/data/tokenizers/qwen3``); nothing is downloaded.
The weights are random (seeded), so the text it generates is gibberish, but an engine serving it
still does real prefill, decode and KV-cache work, and publishes real KV events.

The directory is written to ``OUT_DIR.partial`` first and renamed at the end, so a directory
named OUT_DIR is always complete (an interrupted build leaves only the ``.partial`` folder,
which the next build removes). Prints one JSON line describing what it built.
"""

from __future__ import annotations

import argparse
import gzip
import json
import shutil
from pathlib import Path

# The shape is the smallest that exercises what a frontend cares about: 2 layers, grouped-query
# attention (2 query heads, 1 KV head) and the tokenizer's full vocabulary, so any token id the
# Qwen3 tokenizer produces is a valid prompt id. ~20 M parameters, almost all in the embedding.
HIDDEN = 128
INTERMEDIATE = 256
LAYERS = 2
HEADS = 2
KV_HEADS = 1
HEAD_DIM = 64
MAX_POSITIONS = 4096
# Embedding rows: at least the tokenizer's size (151,669 with its added tokens), rounded up the
# way the published Qwen3 checkpoints round it.
VOCAB = 151936


def _copy_tokenizer(source: Path, out: Path) -> dict[str, int]:
    """Copy the tokenizer files into ``out``; return the special ids the config must name.

    Raises FileNotFoundError naming the folder when it holds no tokenizer.
    """
    packed = source / "tokenizer.json.gz"
    plain = source / "tokenizer.json"
    if packed.exists():
        with gzip.open(packed, "rb") as reader, (out / "tokenizer.json").open("wb") as writer:
            shutil.copyfileobj(reader, writer)
    elif plain.exists():
        shutil.copy(plain, out / "tokenizer.json")
    else:
        raise FileNotFoundError(
            f"no tokenizer.json(.gz) in {source}: pass --tokenizer-dir the Qwen3 tokenizer folder"
        )
    shutil.copy(source / "tokenizer_config.json", out / "tokenizer_config.json")
    config = json.loads((source / "tokenizer_config.json").read_text(encoding="utf-8"))
    added = {
        entry["content"]: int(token_id)
        for token_id, entry in config.get("added_tokens_decoder", {}).items()
    }
    return {
        "endoftext": added.get("<|endoftext|>", 151643),
        "im_end": added.get("<|im_end|>", 151645),
    }


def build(out: Path, tokenizer_dir: Path, seed: int) -> dict[str, object]:
    """Write the model to ``out`` (atomically, through ``out.partial``); return a summary.

    Blocks for the few seconds torch needs to initialise and save ~20 M parameters.
    """
    import torch
    import transformers

    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    special = _copy_tokenizer(tokenizer_dir, partial)
    config = transformers.Qwen3Config(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        head_dim=HEAD_DIM,
        max_position_embeddings=MAX_POSITIONS,
        rms_norm_eps=1e-6,
        rope_theta=1_000_000.0,
        tie_word_embeddings=True,
        bos_token_id=special["endoftext"],
        eos_token_id=special["im_end"],
        pad_token_id=special["endoftext"],
        initializer_range=0.02,
    )
    torch.manual_seed(seed)
    model = transformers.Qwen3ForCausalLM(config).to(torch.bfloat16).eval()
    model.save_pretrained(partial, safe_serialization=True)
    generation = {
        "bos_token_id": special["endoftext"],
        "eos_token_id": [special["im_end"], special["endoftext"]],
        "pad_token_id": special["endoftext"],
        "do_sample": False,
    }
    (partial / "generation_config.json").write_text(json.dumps(generation, indent=2))
    shutil.rmtree(out, ignore_errors=True)
    partial.rename(out)
    return {
        "out": str(out),
        "params": sum(parameter.numel() for parameter in model.parameters()),
        "files": sorted(path.name for path in out.iterdir()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="the model directory to write")
    parser.add_argument(
        "--tokenizer-dir", type=Path, required=True, help="the Qwen3 tokenizer folder"
    )
    parser.add_argument("--seed", type=int, default=0, help="seeds the random weights")
    args = parser.parse_args()
    print(json.dumps(build(args.out, args.tokenizer_dir, args.seed)))


if __name__ == "__main__":
    main()
