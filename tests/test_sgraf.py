"""SGRAF checkpoint import: SGRAF's key layout in, SGRAF's scores out; hostile pickles refused."""

from __future__ import annotations

import argparse
import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from matching import checkpoint
from matching.checkpoint import CheckpointError
from matching.importers.sgraf import import_sgraf
from matching.retrieval.scoring import ImageArrays, score_matrix
from tests.conftest import random_captions
from tests.published_weights import encoders_and_poolings, random_weights

D, M, WORD, IMG, K, VOCAB, STEPS = 16, 8, 10, 24, 36, 30, 3


def sgraf_state_dicts(seed: int = 0):
    """Random weights under the exact names and shapes of SGRAF's img_enc, txt_enc and sim_enc."""
    g = torch.Generator().manual_seed(seed)
    w = random_weights(g)
    img, txt, sim = encoders_and_poolings(g, embed=D, img=IMG, vocab=VOCAB, word=WORD, regions=K)
    for name, shape in (("sim_tranloc_w", (M, D)), ("sim_tranglo_w", (M, D)), ("sim_eval_w", (1, M))):
        sim[f"{name}.weight"], sim[f"{name}.bias"] = w(*shape), w(shape[0], scale=0.1)
    for step in range(STEPS):
        for name in ("graph_query_w", "graph_key_w", "sim_graph_w"):
            sim[f"SGR_module.{step}.{name}.weight"] = w(M, M)
            sim[f"SGR_module.{step}.{name}.bias"] = w(M, scale=0.1)
    return [img, txt, sim]


def sgraf_opt(**overrides):
    opt = dict(data_name="coco_precomp", batch_size=128, num_epochs=20, lr_update=10, learning_rate=0.0002,
               workers=10, log_step=10, val_step=1000, grad_clip=2.0, margin=0.2, max_violation=True,
               img_dim=IMG, word_dim=WORD, embed_size=D, sim_dim=M, num_layers=1, bi_gru=True,
               no_imgnorm=False, no_txtnorm=False, module_name="SGR", sgr_step=STEPS, vocab_size=VOCAB,
               vocab_path="/data/vocab", model_name="/runs/coco_SGR/checkpoint")
    opt.update(overrides)
    return argparse.Namespace(**opt)


def write_sgraf(path, parts=None, opt=None, legacy=False):
    torch.save({"epoch": 18, "model": parts or sgraf_state_dicts(), "best_rsum": 510.2,
                "opt": opt or sgraf_opt(), "Eiters": 170000}, path,
               _use_new_zipfile_serialization=not legacy)


def write_vocab(path, size=VOCAB):
    words = ["<pad>", "<start>", "<end>", "<unk>", *[f"w{i}" for i in range(size - 4)]]
    path.write_text(json.dumps({"word2idx": {w: i for i, w in enumerate(words)},
                                "idx2word": {str(i): w for i, w in enumerate(words)}, "idx": size}))


# --- a slow reference written from SGRAF's SGR equations, on SGRAF's own weight names -----------------

def l2norm(x, dim=-1):
    return x / (x.pow(2).sum(dim, keepdim=True).sqrt() + 1e-8)


def lin(p, name, x):
    return F.linear(x, p[f"{name}.weight"], p[f"{name}.bias"])


def bn_eval(p, name, x):
    return F.batch_norm(x, p[f"{name}.running_mean"], p[f"{name}.running_var"], p[f"{name}.weight"],
                        p[f"{name}.bias"], training=False)


def sgraf_reference(parts, features, captions):
    """SGRAF's evaluation path: encode, then one caption at a time against all images."""
    img, txt, sim = ({k: v.double() if v.is_floating_point() else v for k, v in part.items()} for part in parts)
    with torch.no_grad():
        img_emb = l2norm(lin(img, "fc", torch.from_numpy(features).double()))  # (n, 36, d)
        l_emb = torch.tanh(bn_eval(sim, "v_global_w.embedding_local.1", lin(sim, "v_global_w.embedding_local.0",
                                                                              img_emb)))
        g_emb = torch.tanh(bn_eval(sim, "v_global_w.embedding_global.1",
                                   lin(sim, "v_global_w.embedding_global.0", img_emb.mean(1))))
        weights = torch.softmax(lin(sim, "v_global_w.embedding_common.0", l_emb * g_emb.unsqueeze(1))[..., 0], 1)
        img_glo = l2norm((weights.unsqueeze(2) * img_emb).sum(1))
        gru = torch.nn.GRU(WORD, D, 1, batch_first=True, bidirectional=True).double()
        gru.load_state_dict({k[len("cap_rnn."):]: v for k, v in txt.items() if k.startswith("cap_rnn.")})
        columns = []
        for caption in captions:
            out, _ = gru(txt["embed.weight"][torch.tensor(caption)].unsqueeze(0))
            cap = l2norm((out[..., :D] + out[..., D:]) / 2)  # (1, L, d)
            l_t = torch.tanh(lin(sim, "t_global_w.embedding_local.0", cap))
            g_t = torch.tanh(lin(sim, "t_global_w.embedding_global.0", cap.mean(1)))
            w_t = torch.softmax(lin(sim, "t_global_w.embedding_common.0", l_t * g_t.unsqueeze(1))[..., 0], 1)
            cap_glo = l2norm((w_t.unsqueeze(2) * cap).sum(1))
            cap_rep = cap.repeat(len(img_emb), 1, 1)
            attn = F.leaky_relu(torch.bmm(img_emb, cap_rep.transpose(1, 2)), 0.1)  # (n, K, L)
            attn = torch.softmax(l2norm(attn, 2).transpose(1, 2) * 9.0, dim=2)  # (n, L, K)
            context = l2norm(torch.bmm(attn, img_emb))  # (n, L, d)
            sim_loc = l2norm(lin(sim, "sim_tranloc_w", (context - cap_rep) ** 2))
            sim_glo = l2norm(lin(sim, "sim_tranglo_w", (img_glo - cap_glo) ** 2))
            nodes = torch.cat([sim_glo.unsqueeze(1), sim_loc], 1)
            for step in range(STEPS):
                q = lin(sim, f"SGR_module.{step}.graph_query_w", nodes)
                k = lin(sim, f"SGR_module.{step}.graph_key_w", nodes)
                edges = torch.softmax(torch.bmm(q, k.transpose(1, 2)), -1)
                nodes = torch.relu(lin(sim, f"SGR_module.{step}.sim_graph_w", torch.bmm(edges, nodes)))
            columns.append(torch.sigmoid(lin(sim, "sim_eval_w", nodes[:, 0]))[:, 0])
        return torch.stack(columns, 1).numpy()


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy-format"])
def test_imported_sgraf_scores_match_the_sgr_reference(tmp_path, legacy):
    parts = sgraf_state_dicts(seed=1)
    write_sgraf(tmp_path / "model_best.pth.tar", parts, legacy=legacy)
    write_vocab(tmp_path / "vocab.json")
    out, config = import_sgraf(tmp_path / "model_best.pth.tar", tmp_path / "vocab.json", tmp_path / "ours.pt")
    assert (config.model.reasoning, config.model.streams, config.model.reasoning_steps) == ("sgr", "i2t", 3)
    assert (config.model.num_regions, config.model.embed_size, config.model.vocab_size) == (K, D, VOCAB)
    model, loaded_config, vocab = checkpoint.load(out)
    assert loaded_config == config and len(vocab) == VOCAB
    assert config.train.global_loss_weight == 0  # SGRAF never trained its global vectors for retrieval
    features = np.abs(np.random.default_rng(2).normal(size=(5, K, IMG))).astype(np.float32)
    captions = random_captions(7, VOCAB, seed=4)
    ours = score_matrix(model, ImageArrays(features, np.full(5, K)), captions)
    np.testing.assert_allclose(ours, sgraf_reference(parts, features, captions), atol=1e-5, rtol=0)
    assert ours.std() > 1e-4


def test_import_without_batchnorm_counters(tmp_path):
    """torch 0.4-era checkpoints have no num_batches_tracked: they import, with zero counters, to the same model
    (the counters play no part in evaluation) as the same weights saved with counters."""
    parts = sgraf_state_dicts()
    write_sgraf(tmp_path / "new.pth.tar", parts)
    old = [dict(part) for part in parts]
    old[2] = {k: v for k, v in old[2].items() if not k.endswith("num_batches_tracked")}
    assert len(old[2]) < len(parts[2])  # the fixture has counters to drop
    write_sgraf(tmp_path / "old.pth.tar", old)
    write_vocab(tmp_path / "vocab.json")
    for name in ("old", "new"):
        import_sgraf(tmp_path / f"{name}.pth.tar", tmp_path / "vocab.json", tmp_path / f"{name}.pt")
    (old_model, _, _), (new_model, _, _) = checkpoint.load(tmp_path / "old.pt"), checkpoint.load(tmp_path / "new.pt")
    old_state, new_state = old_model.state_dict(), new_model.state_dict()
    counters = [key for key in old_state if key.endswith("num_batches_tracked")]
    assert counters and all(int(old_state[key]) == 0 for key in counters)
    for key, value in new_state.items():
        if key not in counters:
            assert torch.equal(old_state[key], value), key
    rng = np.random.default_rng(0)
    images = ImageArrays(np.abs(rng.normal(size=(3, K, IMG))).astype(np.float32), np.full(3, K))
    captions = random_captions(4, VOCAB, seed=1)
    np.testing.assert_array_equal(score_matrix(old_model, images, captions), score_matrix(new_model, images, captions))


class RunsACommand:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("where", ["opt", "model"])
def test_hostile_sgraf_file_is_refused_and_nothing_runs(tmp_path, where):
    marker = tmp_path / "pwned"
    parts = sgraf_state_dicts()
    payload = {"epoch": 1, "model": parts, "opt": sgraf_opt(), "best_rsum": 0.0, "Eiters": 0}
    if where == "opt":
        payload["opt"] = RunsACommand(marker)
    else:
        payload["model"][0]["fc.weight"] = RunsACommand(marker)
    torch.save(payload, tmp_path / "evil.pth.tar")
    write_vocab(tmp_path / "vocab.json")
    with pytest.raises(CheckpointError, match="refused"):
        import_sgraf(tmp_path / "evil.pth.tar", tmp_path / "vocab.json", tmp_path / "ours.pt")
    with pytest.raises(CheckpointError, match="refused"):
        checkpoint.load(tmp_path / "evil.pth.tar")
    assert not marker.exists() and not (tmp_path / "ours.pt").exists()


def test_wrong_vocab_saf_and_foreign_keys_are_clear_errors(tmp_path):
    write_sgraf(tmp_path / "m.pth.tar")
    write_vocab(tmp_path / "small.json", size=12)
    with pytest.raises(CheckpointError, match="12 words, but .* embeds 30"):
        import_sgraf(tmp_path / "m.pth.tar", tmp_path / "small.json", tmp_path / "o.pt")
    write_vocab(tmp_path / "vocab.json")
    write_sgraf(tmp_path / "saf.pth.tar", opt=sgraf_opt(module_name="SAF"))
    with pytest.raises(CheckpointError, match="only SGR"):
        import_sgraf(tmp_path / "saf.pth.tar", tmp_path / "vocab.json", tmp_path / "o.pt")
    parts = sgraf_state_dicts()
    parts[2]["mystery.weight"] = torch.zeros(2)
    write_sgraf(tmp_path / "odd.pth.tar", parts)
    with pytest.raises(CheckpointError, match="sim_enc.mystery.weight"):
        import_sgraf(tmp_path / "odd.pth.tar", tmp_path / "vocab.json", tmp_path / "o.pt")
    torch.save({"state_dict": {}}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not an SGRAF checkpoint"):
        import_sgraf(tmp_path / "other.pt", tmp_path / "vocab.json", tmp_path / "o.pt")
    (tmp_path / "torn.pt").write_bytes(b"PK\x03\x04 not really")
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        import_sgraf(tmp_path / "torn.pt", tmp_path / "vocab.json", tmp_path / "o.pt")


def test_sgraf_shipped_vocabulary_layout_loads(tmp_path):
    """SGRAF's vocab JSON (idx2word keys as strings, word2idx, idx) loads and encodes with <start>/<end>."""
    from matching.data.text import Vocabulary

    write_vocab(tmp_path / "vocab.json")
    vocab = Vocabulary.load(tmp_path / "vocab.json")
    assert vocab.encode("w0 zebra w3") == [1, 4, 3, 7, 2]

