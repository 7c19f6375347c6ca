"""Train a tiny converted BitNet student with the project's Trainer, DDP or FSDP (used by tests/test_fsdp.py).

Usage: python tests/scripts/train_student.py WORLD OUT --steps N [--parallel ddp|fsdp] [--loss cpt|kd]
       [--ckpt-every K] [--batch-size B] [--sleep S] [--dropout P] [--dump-at STEP] [--pid-dir DIR]

The student is the tiny Llama teacher (seeded) converted with convert_to_bitnet (BitLinear + SubLN). ``cpt``:
cross-entropy with the λ warm-up callback; ``kd``: cross-entropy + τ²·KL to the frozen teacher, placed with
bitnet.parallel.place_teacher (sharded under FSDP). Rank 0 writes OUT/model (save_student of the consolidated
state) and prints a RESULT line. ``--dump-at S`` writes OUT/dump-S/{model,optimizer}.safetensors with the full
model and optimizer state at step S (before step S+1 runs), gathered from every rank.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from bitnet.convert import BitNetConfig, convert_to_bitnet
from bitnet.data import BlockLoader, iter_eval_batches
from bitnet.layers import set_quant_lambda
from bitnet.objectives import logits_kd_loss
from bitnet.parallel import place_teacher
from bitnet.student import save_student
from bitnet.teacher import TinyTeacherConfig, build_tiny_teacher
from bitnet.trainer import TrainConfig, Trainer, causal_lm_loss, init_distributed
from bitnet.world import open_world


def tiny_pair(vocab: int, eos: int, dropout: float) -> tuple[torch.nn.Module, torch.nn.Module]:
    torch.manual_seed(1234)
    teacher = build_tiny_teacher(
        TinyTeacherConfig(hidden_size=256, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, max_position_embeddings=128),
        vocab, bos_token_id=eos, eos_token_id=eos,
    )
    student = convert_to_bitnet(copy.deepcopy(teacher), BitNetConfig())
    student.config.attention_dropout = dropout
    return student, teacher


def full_optimizer_state(trainer: Trainer) -> dict[str, torch.Tensor]:
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_optimizer_state_dict,
    )

    osd = get_optimizer_state_dict(trainer.model, trainer.optimizer,
                                   options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {f"{name}.{k}": v.clone() for name, st in osd.get("state", {}).items() for k, v in st.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("world")
    ap.add_argument("out")
    ap.add_argument("--steps", type=int, required=True)
    ap.add_argument("--parallel", choices=["ddp", "fsdp"], default="ddp")
    ap.add_argument("--loss", choices=["cpt", "kd"], default="kd")
    ap.add_argument("--ckpt-every", type=int, default=0)
    ap.add_argument("--keep", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--sleep", type=float, default=0.0)
    ap.add_argument("--dropout", type=float, default=0.0)
    ap.add_argument("--dump-at", type=int, default=-1)
    ap.add_argument("--checks", action="store_true", help="first run tests/scripts/fsdp_checks.py's checks")
    ap.add_argument("--pid-dir", default=None, help="write PID_DIR/rankR.pid (so a test can SIGKILL every rank)")
    args = ap.parse_args()

    torch.set_num_threads(1)
    rank, world_size, device = init_distributed()
    if args.pid_dir:
        Path(args.pid_dir).mkdir(parents=True, exist_ok=True)
        Path(args.pid_dir, f"rank{rank}.pid").write_text(str(os.getpid()))
    if args.checks:
        sys.path.insert(0, str(Path(__file__).parent))
        from fsdp_checks import run_checks

        run_checks(rank, world_size, device)
    world = open_world(args.world)
    tok = world.tokenizer()
    student, teacher = tiny_pair(len(tok), tok.eos_token_id, args.dropout)
    cfg = TrainConfig(max_steps=args.steps, lr=3e-3, warmup_steps=2, ckpt_every=args.ckpt_every,
                      keep_checkpoints=args.keep, eval_every=3, log_every=1, progress=False,
                      parallel=args.parallel)
    callbacks = []
    if args.loss == "cpt":
        loss_fn = causal_lm_loss
        callbacks.append(lambda step, model: set_quant_lambda(model, min(1.0, (step + 1) / 4)))
    else:
        teacher = place_teacher(teacher, device, placement="shard" if args.parallel == "fsdp" else "replicate")

        def loss_fn(model: torch.nn.Module, batch: dict[str, torch.Tensor]):
            ids = batch["input_ids"]
            with torch.no_grad():
                t_logits = teacher(input_ids=ids).logits
            out = model(input_ids=ids, labels=ids)
            kl = logits_kd_loss(out.logits, t_logits, 2.0)
            return out.loss + 4.0 * kl, {"kl": float(kl.detach())}

    holder: dict[str, Trainer] = {}

    def hooks(step: int, model: torch.nn.Module) -> None:
        if step == args.dump_at:
            weights = holder["t"].full_state_dict()
            optim = full_optimizer_state(holder["t"])
            if rank == 0:
                dump = Path(args.out) / f"dump-{step}"
                dump.mkdir(parents=True, exist_ok=True)
                save_file({k: v.clone() for k, v in weights.items()}, str(dump / "model.safetensors"))
                save_file({k: v.contiguous() for k, v in optim.items()}, str(dump / "optimizer.safetensors"))
        if args.sleep:
            time.sleep(args.sleep)

    callbacks.append(hooks)
    loader = BlockLoader(world.dataset("train"), args.batch_size, seed=7, rank=rank, world_size=world_size)
    val = world.dataset("validation")
    trainer = Trainer(student, loader, cfg, args.out, loss_fn=loss_fn,
                      val_batches=lambda: iter_eval_batches(val, 2, 2), callbacks=callbacks, device=device,
                      desc=f"{args.parallel}-{args.loss}")
    holder["t"] = trainer
    result = trainer.fit()
    state = trainer.full_state_dict()
    if rank == 0:
        save_student(student, Path(args.out) / "model", state_dict=state if args.parallel == "fsdp" else None)
        print(f"RESULT steps={result.steps} resumed_from={result.resumed_from} loss={result.train_loss:.4f} "
              f"tokens={result.tokens} wall_s={result.wall_s:.1f}", flush=True)
    if world_size > 1:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
