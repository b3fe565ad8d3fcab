"""Build a LoRA adapter for the tiny Qwen3 model (make_tiny_model.py) that a real vLLM can serve.

    python make_tiny_lora.py OUT_DIR [--seed 0] [--rank 8]

Run it with the vLLM venv's python (it needs torch and safetensors). It writes the two files
vLLM's ``--lora-modules name=OUT_DIR`` reads, in PEFT's layout: ``adapter_config.json`` and
``adapter_model.safetensors`` with seeded random ``lora_A``/``lora_B`` weights for the query and
value projections of both layers. The weights are random, so an adapter changes the tiny model's
gibberish; what matters to a frontend is that the engine serves it under its own name, lists it
in ``/v1/models`` and reports it in ``vllm:lora_requests_info``. Written to ``OUT_DIR.partial``
first and renamed, so OUT_DIR is always complete. Prints one JSON line describing it.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

# The tiny model's shapes (make_tiny_model.py): q_proj maps 128 -> 2 heads x 64, v_proj
# 128 -> 1 KV head x 64.
HIDDEN = 128
LAYERS = 2
TARGETS = {"q_proj": 2 * 64, "v_proj": 1 * 64}


def build(out: Path, *, seed: int, rank: int) -> dict[str, object]:
    """Write the adapter into ``out`` (replacing it); return what was written."""
    import torch
    from safetensors.torch import save_file

    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    generator = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for layer in range(LAYERS):
        for module, out_features in TARGETS.items():
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{module}"
            tensors[f"{prefix}.lora_A.weight"] = (
                torch.randn(rank, HIDDEN, generator=generator) * 0.02
            ).to(torch.bfloat16)
            tensors[f"{prefix}.lora_B.weight"] = (
                torch.randn(out_features, rank, generator=generator) * 0.02
            ).to(torch.bfloat16)
    save_file(tensors, str(partial / "adapter_model.safetensors"))
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": "tiny",
        "r": rank,
        "lora_alpha": 2 * rank,
        "lora_dropout": 0.0,
        "bias": "none",
        "target_modules": sorted(TARGETS),
        "fan_in_fan_out": False,
        "modules_to_save": None,
    }
    (partial / "adapter_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    shutil.rmtree(out, ignore_errors=True)
    partial.rename(out)
    return {"out": str(out), "rank": rank, "tensors": len(tensors), "seed": seed}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rank", type=int, default=8)
    args = parser.parse_args()
    print(json.dumps(build(args.out, seed=args.seed, rank=args.rank)))


if __name__ == "__main__":
    main()
