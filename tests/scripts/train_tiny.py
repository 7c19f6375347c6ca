"""Train a tiny Llama on a built world with the project's Trainer (used by the resume and DDP tests).

Usage: python tests/scripts/train_tiny.py WORLD OUT --steps N [--ckpt-every K] [--sleep S] [--batch-size B]
Under torchrun it trains with DDP. Rank 0 writes OUT/final.safetensors with the final weights.
"""

from __future__ import annotations

import argparse
import time

import torch
from safetensors.torch import save_model

from bitnet.data import BlockLoader, iter_eval_batches
from bitnet.teacher import TinyTeacherConfig, build_tiny_teacher
from bitnet.trainer import TrainConfig, Trainer, init_distributed
from bitnet.world import open_world


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("world")
    ap.add_argument("out")
    ap.add_argument("--steps", type=int, required=True)
    ap.add_argument("--ckpt-every", type=int, default=0)
    ap.add_argument("--sleep", type=float, default=0.0)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--grad-accum", type=int, default=1)
    ap.add_argument("--dropout", type=float, default=0.0)
    args = ap.parse_args()

    torch.set_num_threads(1)
    rank, world_size, device = init_distributed()
    world = open_world(args.world)
    tok = world.tokenizer()
    torch.manual_seed(1234)
    model = build_tiny_teacher(
        TinyTeacherConfig(hidden_size=256, intermediate_size=256, num_hidden_layers=1, num_attention_heads=4,
                          num_key_value_heads=2, max_position_embeddings=128),
        len(tok), bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id,
    )
    # dropout makes the run consume RNG, so exact resume must restore the RNG state too
    model.config.attention_dropout = args.dropout
    loader = BlockLoader(world.dataset("train"), args.batch_size, seed=7, rank=rank, world_size=world_size)
    cfg = TrainConfig(max_steps=args.steps, lr=3e-3, warmup_steps=2, ckpt_every=args.ckpt_every,
                      grad_accum=args.grad_accum, eval_every=3, log_every=1, progress=False)

    def slow(step: int, _model: torch.nn.Module) -> None:
        if args.sleep:
            time.sleep(args.sleep)

    val = world.dataset("validation")
    trainer = Trainer(model, loader, cfg, args.out, val_batches=lambda: iter_eval_batches(val, 2, 2),
                      callbacks=[slow], device=device)
    result = trainer.fit()
    if rank == 0:
        save_model(model, f"{args.out}/final.safetensors")
        print(f"RESULT steps={result.steps} resumed_from={result.resumed_from} loss={result.train_loss:.4f}")


if __name__ == "__main__":
    main()
