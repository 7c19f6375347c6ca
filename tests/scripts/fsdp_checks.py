"""Checks of FSDP2 on a converted student, run under ``torchrun --nproc_per_node=2`` (gloo, CPU).

1. The sharded student's forward (BitLinear ternary weights + int8 activations, SubLN) gives bit-identical logits to
   the unsharded model, and its gradients, gathered, equal the unsharded ones.
2. The same with activation checkpointing on the sharded model.
3. A sharded teacher gives bit-identical logits to a replicated one, and never has gradients.
4. CPU offload trains one step to the same weights as the sharded model without offload.
5. LRC (latent weights frozen, only the adapters U, V trained): two AdamW steps sharded = unsharded.

Every rank feeds the same batch, so FSDP's gradient average over 2 ranks is (g + g) / 2 = g exactly (a power-of-two
world size makes the scaling exact), and the all-gather of fp32 shards is a copy: equality is exact, not approximate.
Prints "CHECKS OK" on rank 0. ``train_student.py --checks`` runs them too (one start-up for both).
"""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist

from bitnet.convert import BitNetConfig, add_lrc, convert_to_bitnet
from bitnet.layers import BitLinear
from bitnet.parallel import (
    apply_activation_checkpointing,
    full_state_dict,
    place_teacher,
    shard_model,
)
from bitnet.teacher import TinyTeacherConfig, build_tiny_teacher
from bitnet.trainer import init_distributed


def build() -> torch.nn.Module:
    torch.manual_seed(99)
    return build_tiny_teacher(
        TinyTeacherConfig(hidden_size=256, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, max_position_embeddings=128),
        512, bos_token_id=0, eos_token_id=0,
    )


def grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    from torch.distributed.tensor import DTensor

    out = {}
    for name, p in model.named_parameters():
        g = p.grad
        out[name] = g.full_tensor() if isinstance(g, DTensor) else g
    return out


def check_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], what: str) -> None:
    assert a.keys() == b.keys(), (what, sorted(set(a) ^ set(b))[:4])
    for k, v in a.items():
        assert torch.equal(v, b[k]), f"{what}: {k} differs by {float((v - b[k]).abs().max())}"


def run_checks(rank: int, world_size: int, device: torch.device) -> None:
    assert world_size == 2
    ids = torch.randint(0, 512, (2, 64), generator=torch.Generator().manual_seed(5))

    for ac in (False, True):
        ref = convert_to_bitnet(build(), BitNetConfig())
        sharded = copy.deepcopy(ref)
        if ac:
            apply_activation_checkpointing(sharded)
        shard_model(sharded, device)
        n_bitlinear = sum(isinstance(m, BitLinear) for m in sharded.modules())
        assert n_bitlinear == 14, n_bitlinear
        from torch.distributed.tensor import DTensor

        w = sharded.model.layers[0].mlp.down_proj.weight
        assert isinstance(w, DTensor) and w.to_local().shape[0] == w.shape[0] // 2, "BitLinear weight not sharded"
        out_ref = ref(input_ids=ids, labels=ids)
        out = sharded(input_ids=ids, labels=ids)
        assert torch.equal(out.logits, out_ref.logits), f"ac={ac}: sharded logits differ"
        assert torch.equal(out.loss, out_ref.loss)
        out_ref.loss.backward()
        out.loss.backward()
        check_equal(grads(sharded), grads(ref), f"grads ac={ac}")
        full = full_state_dict(sharded)
        if rank == 0:
            check_equal({k: v for k, v in full.items() if k in ref.state_dict()},
                        {k: v for k, v in ref.state_dict().items() if k in full}, "full state dict")
            codes, delta = full["model.layers.1.self_attn.o_proj.weight"], None
            t_ref = ref.model.layers[1].self_attn.o_proj.ternary_weight()
            from bitnet.quant import ternary_codes

            codes, delta = ternary_codes(codes)
            assert torch.equal(codes, t_ref.codes) and float(delta) == t_ref.scale

    # 3. teacher placement
    replicated = place_teacher(build(), device, placement="replicate")
    shard_t = place_teacher(build(), device, placement="shard")
    with torch.no_grad():
        assert torch.equal(shard_t(input_ids=ids).logits, replicated(input_ids=ids).logits), "sharded teacher differs"
    assert not any(p.requires_grad for p in shard_t.parameters())

    # 4. CPU offload: one AdamW step lands on the same weights as without offload
    finals = []
    for offload in (False, True):
        m = shard_model(convert_to_bitnet(build(), BitNetConfig()), device, cpu_offload=offload)
        opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
        m(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        finals.append(full_state_dict(m))
    if rank == 0:
        check_equal(finals[0], finals[1], "cpu offload")

    # 5. LRC: latent weights frozen, only U, V trained; two AdamW steps sharded = unsharded
    lrc = add_lrc(convert_to_bitnet(build(), BitNetConfig()), 8)
    for name, p in lrc.named_parameters():
        p.requires_grad_(name.endswith(("lrc_u", "lrc_v")))
    ref = copy.deepcopy(lrc)
    shard_model(lrc, device)
    pairs = [(m, torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2)) for m in (lrc, ref)]
    for _ in range(2):
        for m, opt in pairs:
            opt.zero_grad()
            m(input_ids=ids, labels=ids).loss.backward()
            opt.step()
    full = full_state_dict(lrc)
    if rank == 0:
        check_equal(full, {k: v for k, v in ref.state_dict().items() if k in full}, "lrc")
        print("CHECKS OK", flush=True)
    dist.barrier()


def main() -> None:
    torch.set_num_threads(1)
    run_checks(*init_distributed())
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
