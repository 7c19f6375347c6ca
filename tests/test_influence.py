"""Influence-based data selection: per-example gradients, projection, scoring, selection, subsets."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from bitnet.data import BlockLoader, DataError, Document, PackedDataset, build_packed_dataset
from bitnet.data.corpus import PYTHON_DOCS_DIR, clean_rst
from bitnet.data.influence import (
    PROJ_BLOCK_ROWS,
    InfluenceConfig,
    RandomProjector,
    gradient_features,
    influence_scores,
    per_example_gradients,
    resolve_params,
    select_influential,
    select_top,
    write_subset,
)
from bitnet.teacher import TinyTeacherConfig, build_tiny_teacher

N_IN, N_OOD, N_TARGETS, SEQ = 16, 16, 24, 64


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # The machine is small and shared: one intra-op thread is many times faster than two oversubscribed.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny_llama(vocab: int, layers: int = 1, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    cfg = TinyTeacherConfig(hidden_size=256, intermediate_size=256, num_hidden_layers=layers,
                            num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128)
    return build_tiny_teacher(cfg, vocab, bos_token_id=0, eos_token_id=0)


@pytest.fixture(scope="module")
def trained(small_world):
    """A 1-layer Llama trained for 60 AdamW steps on the in-domain (Python docs) train split."""
    train = small_world.dataset("train")
    model = tiny_llama(small_world.info["vocab_size"])
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(60):
        x = train.get_batch(torch.randint(0, len(train), (16,), generator=g))
        model(x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    model.eval()
    return model


def digit_text(n: int, seed: int = 0) -> str:
    rnd = random.Random(seed)
    return " ".join(str(rnd.randint(0, 10**6)) for _ in range(n))


def ranks_of(scores: torch.Tensor) -> torch.Tensor:
    r = torch.empty(scores.numel())
    r[torch.sort(scores, descending=True, stable=True).indices] = torch.arange(scores.numel(), dtype=torch.float32)
    return r


# -------------------------------------------------------------------------------------------------
# the constructed case: in-domain candidates must outrank out-of-domain ones


def test_in_domain_candidates_rank_above_out_of_domain(small_world, trained) -> None:
    tok = small_world.tokenizer()
    test, val = small_world.dataset("test"), small_world.dataset("validation")
    g = torch.Generator().manual_seed(1)
    in_domain = test.get_batch(range(0, 16 * N_IN, 16))  # held-out documents, never trained on
    rand_ids = torch.randint(0, len(tok), (N_OOD // 2, SEQ), generator=g)
    digits = torch.tensor(tok(digit_text(400), add_special_tokens=False)["input_ids"][: N_OOD // 2 * SEQ]).view(-1, SEQ)
    shuffled = torch.stack([b[torch.randperm(SEQ, generator=g)] for b in test.get_batch(range(8, 16 * N_OOD + 8, 16))])
    targets = val.get_batch(range(N_TARGETS))

    cfg = InfluenceConfig()  # defaults: all norm gains, 1024-d Rademacher, normalised, centred, mean
    tf = gradient_features(trained, targets, cfg)
    report = {}
    for name, ood in (("random+digits", torch.cat([rand_ids, digits])), ("shuffled", shuffled)):
        for center in (True, False):
            cf = gradient_features(trained, torch.cat([in_domain, ood]), cfg)
            scores = influence_scores(cf, tf, "mean", center=center)
            top = select_top(scores, N_IN / (N_IN + N_OOD))
            r = ranks_of(scores)
            precision = (top < N_IN).float().mean().item()
            report[(name, center)] = (precision, r[:N_IN].mean().item(), r[N_IN:].mean().item())
    print("\nprecision@16, mean rank in-domain / out-of-domain (0 = best):")
    for (name, center), (p, ri, ro) in report.items():
        print(f"  {name:14s} center={center!s:5s}  p@16={p:.2f}  rank {ri:.1f} / {ro:.1f}")
    p, ri, ro = report[("random+digits", True)]
    assert p >= 0.8 and ri < ro
    p, ri, ro = report[("shuffled", True)]  # same unigram statistics as the in-domain blocks: harder
    assert p >= 0.75 and ri < ro


def test_select_influential_on_packed_datasets_and_write_subset(small_world, trained, tmp_path: Path) -> None:
    tok = small_world.tokenizer()
    files = sorted(Path(PYTHON_DOCS_DIR).glob("library/*.rst.txt"))[40:]  # beyond the world's 40 files
    ids_in: list[int] = []
    docs = []
    for i, f in enumerate(files):  # unseen in-domain prose, about 24 blocks of it
        text = clean_rst(f.read_text(encoding="utf-8", errors="replace"))[:3000]
        docs.append(Document(f"in{i}", text))
        ids_in += tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        if len(ids_in) >= 24 * SEQ:
            break
    g = torch.Generator().manual_seed(2)
    gibberish = tok.decode(torch.randint(3, len(tok), (8 * SEQ,), generator=g).tolist())
    docs += [Document("digits", digit_text(300, 1)), Document("gibberish", gibberish)]
    cands = build_packed_dataset(docs, tok, tmp_path / "cands", seq_len=SEQ)
    starts = np.arange(len(cands)) * SEQ
    is_in = starts + SEQ <= len(ids_in)  # the one block holding the boundary counts as out-of-domain
    n_in = int(is_in.sum())
    assert n_in >= 16 and (starts >= len(ids_in)).sum() >= 8

    targets = small_world.dataset("validation")
    cfg = InfluenceConfig(keep_fraction=n_in / len(cands), batch_size=8, proj_dim=512)
    res = select_influential(trained, cands, targets, cfg, target_indices=range(N_TARGETS))
    assert res.scores.shape == (len(cands),) and res.indices.numel() == res.stats["n_kept"]
    kept = res.indices.numpy()
    precision = is_in[kept].mean()
    print(f"\nselect_influential: kept {len(kept)}/{len(cands)}, in-domain precision {precision:.2f}")
    assert precision >= 0.8
    assert res.stats["method"] == "vmap" and res.stats["n_targets"] == N_TARGETS
    assert res.stats["params"] == [n for n, _ in trained.named_parameters() if n.endswith("norm.weight")]
    assert torch.all(res.scores[res.indices][:-1] >= res.scores[res.indices][1:])

    sub = write_subset(cands, res.indices, tmp_path / "selected", info={"stats": res.stats["n_kept"]})
    assert isinstance(sub, PackedDataset) and len(sub) == len(kept) and sub.seq_len == SEQ
    assert torch.equal(sub.get_batch(range(len(sub))), cands.get_batch(kept))
    sub.verify()
    next(iter(BlockLoader(sub, 2)))  # any stage can train on it


# -------------------------------------------------------------------------------------------------
# per-example gradients


def test_per_example_gradient_matches_plain_backward() -> None:
    model = tiny_llama(64, layers=2)
    model.train()
    x = torch.randint(0, 64, (3, 12), generator=torch.Generator().manual_seed(0))
    patterns = ["model.norm", "{last_block}.self_attn.v_proj", "lm_head"]  # lm_head is tied to the embedding
    params = resolve_params(model, patterns)
    assert list(params) == ["model.embed_tokens.weight", "model.layers.1.self_attn.v_proj.weight", "model.norm.weight"]
    flags = {n: p.requires_grad for n, p in model.named_parameters()}

    cfg = InfluenceConfig(params=patterns, proj_dim=None, normalize=False, batch_size=2)
    feats = {m: gradient_features(model, x, cfg.model_copy(update={"method": m})) for m in ("vmap", "loop")}
    assert feats["vmap"].shape == (3, sum(p.numel() for p in params.values()))
    # the model is left as it was: train mode, requires_grad flags, no .grad
    assert model.training and {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())

    model.eval()
    for i in range(3):
        model.zero_grad(set_to_none=True)
        model(x[i : i + 1], labels=x[i : i + 1]).loss.backward()
        ref = torch.cat([p.grad.flatten() for p in params.values()])
        for m in ("vmap", "loop"):
            torch.testing.assert_close(feats[m][i], ref, rtol=1e-4, atol=1e-6)
    model.zero_grad(set_to_none=True)

    # a forward that vmap cannot batch (data-dependent Python control flow): "auto" falls back to the loop
    class Branchy(torch.nn.Module):
        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, input_ids: torch.Tensor, **kw):
            return self.inner(input_ids if input_ids.max().item() >= 0 else input_ids, **kw)

    with pytest.warns(RuntimeWarning, match="using a per-example loop"):
        fallback = gradient_features(Branchy(model), x, cfg)
    torch.testing.assert_close(fallback, feats["loop"])

    grads = per_example_gradients(model, x, params)
    assert grads["model.norm.weight"].shape == (3, 256)
    with pytest.raises(DataError, match="seq_len>=2"):
        per_example_gradients(model, x[:, :1], params)


# -------------------------------------------------------------------------------------------------
# projection


def test_projection_is_deterministic_blockwise_and_linear() -> None:
    model = tiny_llama(64)
    x = torch.randint(0, 64, (4, 10), generator=torch.Generator().manual_seed(0))
    cfg = InfluenceConfig(params=["{last_block}.mlp.down_proj", "model.norm"], proj_dim=64, batch_size=3)
    a = gradient_features(model, x, cfg)
    assert a.shape == (4, 64) and torch.allclose(a.norm(dim=1), torch.ones(4))
    assert torch.equal(a, gradient_features(model, x, cfg))  # same seed: same features
    # batch size only changes float rounding (batched matmuls), not the projection
    torch.testing.assert_close(a, gradient_features(model, list(x), cfg.model_copy(update={"batch_size": 4})))
    assert torch.equal(a, gradient_features(model, x, cfg.model_copy(update={"projection_cache_mb": 0})))
    assert not torch.allclose(a, gradient_features(model, x, cfg.model_copy(update={"seed": 1})), atol=1e-3)
    gauss = gradient_features(model, x, cfg.model_copy(update={"projection": "gaussian"}))
    assert not torch.allclose(a, gauss, atol=1e-3)

    # the projection is raw_gradient @ R, with R assembled from the per-parameter row blocks
    raw = gradient_features(model, x, cfg.model_copy(update={"proj_dim": None, "normalize": False}))
    proj = RandomProjector(64, seed=0)
    params = resolve_params(model, cfg.params)
    blocks = []
    for name, p in params.items():
        for b, start in enumerate(range(0, p.numel(), PROJ_BLOCK_ROWS)):
            blocks.append(proj.block(name, b, min(PROJ_BLOCK_ROWS, p.numel() - start), torch.device("cpu")))
    R = torch.cat(blocks)
    assert R.shape == (raw.shape[1], 64) and set(R.mul(8).round().unique().tolist()) == {-1.0, 1.0}
    torch.testing.assert_close(gradient_features(model, x, cfg.model_copy(update={"normalize": False})), raw @ R)
    # Johnson–Lindenstrauss: cosines survive the projection roughly
    cos = torch.nn.functional.cosine_similarity
    wide = gradient_features(model, x, cfg.model_copy(update={"proj_dim": 2048}))
    assert (cos(wide[0], wide[1], dim=0) - cos(raw[0], raw[1], dim=0)).abs() < 0.15


# -------------------------------------------------------------------------------------------------
# scoring and selection


def test_influence_scores_reductions() -> None:
    c = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0], [-1.0, 0.0]])
    t = torch.tensor([[3.0, 0.0], [0.0, 1.0]])
    mean = influence_scores(c, t, "mean", center=False)  # cosine to (0.5, 0.5)
    torch.testing.assert_close(mean, torch.tensor([0.5**0.5, 0.5**0.5, 1.0, -(0.5**0.5)]))
    mx = influence_scores(c, t, "max", center=False)
    torch.testing.assert_close(mx, torch.tensor([1.0, 1.0, 0.5**0.5, 0.0]))
    # groups: each group's mean direction, then max (LESS: max over sub-tasks)
    grouped = influence_scores(c, torch.cat([t, t[:1]]), "max", groups=[0, 1, 0], center=False)
    torch.testing.assert_close(grouped, mx)
    # centring subtracts the mean (normalised) candidate from both sides
    centred = influence_scores(c, t, "mean")
    mu = torch.nn.functional.normalize(c, dim=1).mean(0)
    tn = torch.nn.functional.normalize(t, dim=1)
    cn = torch.nn.functional.normalize(c, dim=1)
    expect = torch.nn.functional.cosine_similarity(cn - mu, (tn - mu).mean(0, keepdim=True))
    torch.testing.assert_close(centred, expect)
    torch.testing.assert_close(influence_scores(c, t, center=mu), centred)
    with pytest.raises(DataError, match="empty target set"):
        influence_scores(c, t[:0])
    with pytest.raises(DataError, match="feature sizes differ"):
        influence_scores(c, torch.ones(2, 3))


def test_select_top() -> None:
    s = torch.tensor([0.1, 0.9, 0.5, 0.9, -1.0, 0.5])
    assert select_top(s, 1.0).tolist() == [1, 3, 2, 5, 0, 4]  # ties: lower index first
    assert select_top(s, 0.5).tolist() == [1, 3, 2]
    assert select_top(s, 0.34).tolist() == [1, 3, 2]  # ceil(2.04) = 3
    assert select_top(s, 1e-6).tolist() == [1]  # at least one
    assert select_top(s, 0.5).dtype == torch.long
    for bad in (0.0, -0.1, 1.5, float("nan")):
        with pytest.raises(DataError, match="keep_fraction must be in"):
            select_top(s, bad)
    with pytest.raises(DataError, match="NaN"):
        select_top(torch.tensor([0.1, float("nan")]), 0.5)
    with pytest.raises(DataError, match="non-empty 1-D"):
        select_top(torch.zeros(0), 0.5)


def test_write_subset_round_trip_and_refusals(small_world, tmp_path: Path) -> None:
    src = small_world.dataset("validation")
    idx = [5, 0, 17, 3]
    sub = write_subset(src, torch.tensor(idx), tmp_path / "sub", info={"why": "test"})
    assert torch.equal(sub.get_batch(range(4)), src.get_batch(idx))
    assert [torch.equal(sub[i], src[j]) for i, j in enumerate(idx)] == [True] * 4
    meta = json.loads((tmp_path / "sub" / "meta.json").read_text())
    for k in ("format", "seq_len", "dtype", "vocab_size", "eos_token_id", "tokenizer_digest"):
        assert meta[k] == src.meta[k]
    assert meta["n_blocks"] == 4 and meta["n_tokens"] == 4 * src.seq_len
    assert meta["subset"]["source_digest"] == src.digest
    assert np.load(tmp_path / "sub" / "indices.npy").tolist() == idx
    sub.verify()
    # same selection: reused as is; another selection replaces it atomically
    mtime = (tmp_path / "sub" / "tokens.npy").stat().st_mtime_ns
    assert write_subset(src, idx, tmp_path / "sub", info={"why": "test"}).digest == sub.digest
    assert (tmp_path / "sub" / "tokens.npy").stat().st_mtime_ns == mtime
    assert len(write_subset(src, [1, 2], tmp_path / "sub")) == 2
    for bad, msg in (([], "empty selection"), ([0, len(src)], "out of range"), ([1, 1], "duplicate")):
        with pytest.raises(DataError, match=msg):
            write_subset(src, bad, tmp_path / "bad")
    assert not (tmp_path / "bad").exists()


# -------------------------------------------------------------------------------------------------
# parameter selection and errors


def test_resolve_params_patterns() -> None:
    model = tiny_llama(64, layers=2)
    assert list(resolve_params(model, ["lm_head"])) == ["model.embed_tokens.weight"]  # tied alias
    assert list(resolve_params(model, ["{last_block}.mlp.down_proj"])) == ["model.layers.1.mlp.down_proj.weight"]
    assert list(resolve_params(model, ["model.layers.1.mlp"])) == [
        f"model.layers.1.mlp.{n}_proj.weight" for n in ("gate", "up", "down")
    ]
    names = list(resolve_params(model, ["*norm.weight"]))
    assert len(names) == 5 and names[-1] == "model.norm.weight"
    assert list(resolve_params(model, ["norm"])) == ["model.norm.weight"]  # dot-bounded, not a raw substring
    with pytest.raises(DataError, match="'nope', 'layers.9' match no parameter"):
        resolve_params(model, ["lm_head", "nope", "layers.9"])


def test_errors(small_world) -> None:
    model = tiny_llama(small_world.info["vocab_size"])
    ds = small_world.dataset("validation")
    cfg = InfluenceConfig(proj_dim=16)
    messages = []
    with pytest.raises(DataError, match="empty target set") as e:
        select_influential(model, ds, ds, cfg, target_indices=[])
    messages.append(str(e.value))
    with pytest.raises(DataError, match="empty candidate set") as e:
        select_influential(model, ds, ds, cfg, candidate_indices=[])
    messages.append(str(e.value))
    with pytest.raises(DataError, match="keep_fraction must be in") as e:
        select_influential(model, ds, ds, InfluenceConfig.model_construct(**{**cfg.model_dump(), "keep_fraction": 1.5}))
    messages.append(str(e.value))
    with pytest.raises(DataError, match="match no parameter") as e:
        gradient_features(model, ds, InfluenceConfig(params=["transformer.h.0"]), indices=[0])
    messages.append(str(e.value))
    with pytest.raises(DataError, match="out of range") as e:
        gradient_features(model, ds, cfg, indices=[len(ds)])
    messages.append(str(e.value))
    with pytest.raises(DataError, match="no examples") as e:
        gradient_features(model, [], cfg)
    messages.append(str(e.value))
    assert all("\n" not in m for m in messages), messages
    with pytest.raises(ValidationError):
        InfluenceConfig(keep_fraction=0.0)
    with pytest.raises(ValidationError):
        InfluenceConfig(bogus=1)
