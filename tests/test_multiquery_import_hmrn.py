"""HMRN's own checkpoints (its train.py's model_best.pth.tar) in, HMRN's scores out; HMRN's evaluation protocol.

The reference below is written from HMRN's equations (LZH-053/HMRN, model.py and evaluation_individual.py) on
HMRN's own weight names, one (image, query set) pair at a time, and assembles the matrices in HMRN's orientation:
its i2t local matrix comes out as query sets × images, everything else as images × query sets. Every option it
uses is a literal of HMRN's opts.py, written into the checkpoint's `opt` here, so the imported model is checked
against HMRN's numbers and not against our config.
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

from matching import checkpoint
from matching.checkpoint import CheckpointError
from matching.importers.hmrn import import_hmrn
from matching.model.hmrn import score_rounds
from matching.retrieval.scoring import ImageArrays
from pipelines.cli import cli
from tests.published_weights import encoders_and_poolings, random_weights
from tests.test_multiquery_drilldown_vocab import write_drilldown_vocab

D, M, WORD, IMG, K, STEPS, TURNS = 8, 6, 5, 12, 36, 3, 10
WORDS = ["<pad>", "<start>", "<end>", "<unk>", *[f"w{i}" for i in range(4, 24)]]
VOCAB = len(WORDS)
# HMRN's opts.py, as literals: λ_i2t 5, λ_t2i 15, α 0.6, β 0.3, τ 40, 10 rounds, <end> = 2.
LAMBDA_I2T, LAMBDA_T2I, ALPHA, BETA, TAU = 5.0, 15.0, 0.6, 0.3, 40.0

runner = CliRunner()


def hmrn_state_dicts(seed: int = 0):
    """Random weights under the exact names and shapes of HMRN's img_enc, txt_enc and sim_enc."""
    g = torch.Generator().manual_seed(seed)
    w = random_weights(g)
    img, txt, sim = encoders_and_poolings(g, embed=D, img=IMG, vocab=VOCAB, word=WORD, regions=K, word_scale=1.0)
    for name, shape in (("sim_tranloc_w", (M, D)), ("sim_tranglo_w", (M, D)), ("sim_w", (1, M))):
        sim[f"{name}.weight"], sim[f"{name}.bias"] = w(*shape, scale=0.6), w(shape[0], scale=0.1)
    for step in range(STEPS):
        for name in ("graph_query_w", "graph_key_w", "sim_graph_w"):
            sim[f"ICR_module.{step}.{name}.weight"] = w(M, M, scale=0.6)
            sim[f"ICR_module.{step}.{name}.bias"] = w(M, scale=0.1)
    return [img, txt, sim]


def hmrn_opt(**overrides):
    """HMRN's opts.py defaults (sizes shrunk to the test's weights)."""
    opt = dict(data_path="./data", vocab_path="./data/caches", model_name="./runs/vg/checkpoint", batch_size=128,
               num_epochs=150, lr_update=75, learning_rate=4e-4, workers=4, log_step=50, val_step=10, grad_clip=2.0,
               margin=0.2, max_violation=True, negation=0, max_turns=TURNS, cross_attention_direction="I-T",
               img_dim=IMG, word_dim=WORD, embed_size=D, sim_dim=M, num_layers=1, bi_gru=True, no_imgnorm=False,
               no_txtnorm=False, icr_step=STEPS, EOS_idx=2, vocab_size=VOCAB, model_path=None,
               temperature_lambda_i2t=LAMBDA_I2T, temperature_lambda_t2i=LAMBDA_T2I, seed=0, alpha=ALPHA, beta=BETA,
               pin_memory=True, tau=TAU)
    opt.update(overrides)
    return argparse.Namespace(**opt)


def write_hmrn(path, parts=None, opt=None):
    torch.save({"epoch": 97, "model": parts or hmrn_state_dicts(), "best_rsum": 301.5, "opt": opt or hmrn_opt(),
                "Eiters": 123456}, path)
    return path


@pytest.fixture
def drilldown_vocab(tmp_path, monkeypatch):
    return write_drilldown_vocab(tmp_path / "vg_vocab_14284.pkl", monkeypatch, words=WORDS)


# --- HMRN's equations on HMRN's weight names ---------------------------------------------------------------------

def l2norm(x, dim=-1):
    return x / (x.pow(2).sum(dim, keepdim=True).sqrt() + 1e-8)


def lin(p, name, x):
    return F.linear(x, p[f"{name}.weight"], p[f"{name}.bias"])


def bn_eval(p, name, x):
    return F.batch_norm(x, p[f"{name}.running_mean"], p[f"{name}.running_var"], p[f"{name}.weight"],
                        p[f"{name}.bias"], training=False)


class HMRNReference:
    """HMRN's EncoderImage, EncoderText (each query alone), VisualSA / TextSA, its local levels, SCAN_attention
    and the inter-correlation reasoning, in float64 and eval mode, one pair at a time."""

    def __init__(self, parts, features, query_sets):
        self.img, self.txt, self.sim = ({k: v.double() if v.is_floating_point() else v for k, v in part.items()}
                                        for part in parts)
        img, sim = self.img, self.sim
        with torch.no_grad():
            self.regions = l2norm(lin(img, "fc", torch.as_tensor(features).double()))  # (N, 36, d)
            l_emb = torch.tanh(bn_eval(sim, "v_global_w.embedding_local.1",
                                       lin(sim, "v_global_w.embedding_local.0", self.regions)))
            g_emb = torch.tanh(bn_eval(sim, "v_global_w.embedding_global.1",
                                       lin(sim, "v_global_w.embedding_global.0", self.regions.mean(1))))
            weights = torch.softmax(lin(sim, "v_global_w.embedding_common.0", l_emb * g_emb[:, None])[..., 0], 1)
            self.img_glo = l2norm((weights[..., None] * self.regions).sum(1))
            gru = torch.nn.GRU(WORD, D, 1, batch_first=True, bidirectional=True).double()
            gru.load_state_dict({k[len("cap_rnn."):]: v for k, v in self.txt.items() if k.startswith("cap_rnn.")})
            self.queries = []
            for queries in query_sets:
                vectors = []
                for tokens in queries:  # HMRN: the word ids, then EOS_idx
                    out, _ = gru(self.txt["embed.weight"][torch.tensor(tokens)][None])
                    vectors.append(l2norm((out[..., :D] + out[..., D:]) / 2)[0, -1])  # at the last token
                self.queries.append(torch.stack(vectors))

    def pair(self, i: int, s: int, r: int, direction: str) -> tuple[float, float, float]:
        """(local, global, reasoning) of image i and the first r queries of set s."""
        sim = self.sim
        V, U = self.regions[i], self.queries[s][:r]
        c = F.leaky_relu(V @ U.T, 0.1)  # (36, r)
        if direction == "I-T":  # each region attends over the queries; mean over regions
            local = (torch.softmax(LAMBDA_I2T * c, 1) * c).sum(1).mean(0)
        else:  # each query attends over the regions; mean over the queries so far
            local = (torch.softmax(LAMBDA_T2I * c, 0) * c).sum(0).mean(0)
        l_t = torch.tanh(lin(sim, "t_global_w.embedding_local.0", U))
        g_t = torch.tanh(lin(sim, "t_global_w.embedding_global.0", U.mean(0)))
        w_t = torch.softmax(lin(sim, "t_global_w.embedding_common.0", l_t * g_t)[:, 0], 0)
        cap_glo = l2norm((w_t[:, None] * U).sum(0))
        glob = self.img_glo[i] @ cap_glo
        attn = torch.softmax(LAMBDA_T2I * l2norm(c, 1).T, 1)  # SCAN_attention: normalised over the queries
        context = l2norm(attn @ V)  # (r, d)
        nodes = torch.cat([l2norm(lin(sim, "sim_tranglo_w", (self.img_glo[i] - cap_glo) ** 2))[None],
                           l2norm(lin(sim, "sim_tranloc_w", (context - U) ** 2))])
        for step in range(STEPS):
            q = lin(sim, f"ICR_module.{step}.graph_query_w", nodes)
            k = lin(sim, f"ICR_module.{step}.graph_key_w", nodes)
            nodes = torch.relu(lin(sim, f"ICR_module.{step}.sim_graph_w", torch.softmax(q @ k.T, -1) @ nodes))
        reasoning = torch.sigmoid(lin(sim, "sim_w", nodes[0]))[0]
        return float(local), float(glob), float(reasoning)

    def block(self, images, sets, r, direction):
        """HMRN's forward_sim on a square block: (sim_lm, sim_gm, sim_vr) in its orientation — sim_lm is
        sets × images for I-T and images × sets for T-I; sim_gm and sim_vr are images × sets."""
        levels = [[self.pair(i, s, r, direction) for s in sets] for i in images]  # [image][set]
        lm = np.array([[lv[0] for lv in row] for row in levels])
        gm = np.array([[lv[1] for lv in row] for row in levels])
        vr = np.array([[lv[2] for lv in row] for row in levels])
        return (lm.T if direction == "I-T" else lm), gm, vr


def triangular(r):
    return (r * (r + 1) / 2) / (TURNS * (TURNS + 1) / 2)


def script_weight(r):
    return round(sum(range(1, r + 1)) / (1 + 2 + 3 + 4 + 5 + 6 + 7 + 8 + 9 + 10), 2)  # shard_attn_scores_test


def random_sets(n, seed):
    rng = np.random.default_rng(seed)
    return [[" ".join(WORDS[j] for j in rng.integers(4, VOCAB, size=rng.integers(1, 5))) for _ in range(TURNS)]
            for _ in range(n)]


def token_ids(text):
    return [WORDS.index(word) for word in text.split()] + [2]  # HMRN's data loader: words, then <end>


# --- the import ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("direction", ["I-T", "T-I"])
def test_imported_scores_equal_hmrns_equations_in_the_right_orientation(tmp_path, drilldown_vocab, direction):
    parts = hmrn_state_dicts(seed=1)
    path = write_hmrn(tmp_path / "model_best.pth.tar", parts, hmrn_opt(cross_attention_direction=direction))
    out, config = import_hmrn(path, drilldown_vocab, tmp_path / "ours.pt")
    model, loaded, vocab = checkpoint.load(out)
    assert loaded.task == "multi-query" and loaded.model.direction == {"I-T": "i2t", "T-I": "t2i"}[direction]
    assert loaded.model.query_wrap == "end" and vocab.words == WORDS
    assert (loaded.model.lambda_i2t, loaded.model.lambda_t2i, loaded.model.lambda_reasoning) == (5.0, 15.0, 15.0)
    assert (loaded.model.local_weight, loaded.model.reasoning_weight, loaded.model.tau) == (0.6, 0.3, 40.0)
    assert (loaded.train.learning_rate, loaded.train.epochs, loaded.train.lr_decay_epoch) == (4e-4, 150, 75)
    rng = np.random.default_rng(0)
    n = 4
    features = np.abs(rng.normal(size=(n, K, IMG))).astype(np.float32)
    texts = random_sets(n, seed=2)
    tokens = [[vocab.encode(q, loaded.model.query_wrap) for q in queries] for queries in texts]
    assert tokens == [[token_ids(q) for q in queries] for queries in texts]
    ours = score_rounds(model, ImageArrays(features, np.full(n, K)), tokens)  # (R, sets, images)
    reference = HMRNReference(parts, features, tokens)
    for r in (1, 2, 5, 10):
        lm, gm, vr = reference.block(range(n), range(n), r, direction)
        local = lm.T if direction == "I-T" else lm  # images × sets: HMRN's i2t matrix turned the right way
        expected = ALPHA * local + BETA * triangular(r) * vr + (1 - ALPHA - BETA) * gm  # images × sets
        np.testing.assert_allclose(ours[r - 1], expected.T, atol=2e-5, err_msg=f"round {r}")


def write_split(tmp_path, ids, features):
    from extract.shards import RegionRecord, ShardWriter

    writer = ShardWriter(tmp_path / "features", max_boxes=K, feature_dim=IMG, dtype="float32")
    for image_id, feats in zip(ids, features, strict=True):
        writer.add(RegionRecord(image_id, feats, np.tile(np.array([0, 0, 10, 10], np.float32), (K, 1)), (20, 30)))
    writer.commit()
    texts = random_sets(len(ids), seed=5)
    with open(tmp_path / "queries.jsonl", "w", encoding="utf-8") as handle:
        for image_id, queries in zip(ids, texts, strict=True):
            handle.write(json.dumps({"image_id": image_id, "split": "test", "queries": queries}) + "\n")
    return tmp_path / "features", tmp_path / "queries.jsonl", dict(zip(ids, texts, strict=True))


def script_ranks(sims):
    """evaluation_individual.eval_test on images × sets: 0-based rank of each set's image in argsort, reversed."""
    sims = sims.T
    return np.array([np.where(np.argsort(sims[index])[::-1] == index)[0][0] for index in range(len(sims))])


@pytest.mark.parametrize("direction", ["I-T", "T-I"])
def test_protocol_hmrn_scores_and_ranks_as_hmrns_script(tmp_path, drilldown_vocab, monkeypatch, direction):
    """Tiles of 3 stand in for HMRN's 700 (so 7 test images keep 6, as 9,896 keep 9,800); ids out of order in the
    file are ranked in image-id order; the i2t local matrix is added untransposed inside each tile."""
    monkeypatch.setattr("matching.tasks.multiquery.HMRN_TILE", 3)
    parts = hmrn_state_dicts(seed=3)
    write_hmrn(tmp_path / "m.pth.tar", parts, hmrn_opt(cross_attention_direction=direction))
    converted = runner.invoke(cli, ["import-hmrn", str(tmp_path / "m.pth.tar"), "--vocab", str(drilldown_vocab),
                                    "--out", str(tmp_path / "ours.pt")])
    assert converted.exit_code == 0, converted.output
    assert f"HMRN {'i2t' if direction == 'I-T' else 't2i'}" in converted.output and "λ_i2t=5" in converted.output
    ids = ["40", "7", "105", "12", "9", "300", "8"]
    rng = np.random.default_rng(4)
    features = np.abs(rng.normal(size=(len(ids), K, IMG))).astype(np.float32)
    feature_dir, queries, texts = write_split(tmp_path, ids, features)
    result = runner.invoke(cli, ["evaluate", "--checkpoint", str(tmp_path / "ours.pt"), "--features",
                                 str(feature_dir), "--captions", str(queries), "--protocol", "hmrn", "--device", "cpu",
                                 "--save-sims", str(tmp_path / "s.npy"), "--json", str(tmp_path / "m.json")])
    assert result.exit_code == 0, result.output
    assert "protocol hmrn (HMRN's evaluation script): the first 6 of 7 query sets" in result.output
    assert "6 images, 6 query sets" in result.output
    order = sorted(ids, key=int)[:6]  # HMRN's test loader sorts by image id; the script scores whole tiles
    kept = [features[ids.index(i)] for i in order]
    tokens = [[token_ids(q) for q in texts[i]] for i in order]
    reference = HMRNReference(parts, np.stack(kept), tokens)
    saved = np.load(tmp_path / "s.npy")  # (R, sets, images)
    payload = json.loads((tmp_path / "m.json").read_text())["results"]
    assert payload["protocol"] == "hmrn" and payload["left_out"] == 1 and payload["round_weight"] == "rounded"
    for r in range(1, TURNS + 1):
        sims = np.zeros((6, 6))  # shard_attn_scores_test: images × sets, tile by tile, added as they come out
        for i0 in (0, 3):
            for c0 in (0, 3):
                lm, gm, vr = reference.block(range(i0, i0 + 3), range(c0, c0 + 3), r, direction)
                sims[i0:i0 + 3, c0:c0 + 3] = ALPHA * lm + BETA * script_weight(r) * vr + (1 - ALPHA - BETA) * gm
        np.testing.assert_allclose(saved[r - 1], sims.T, atol=2e-5, err_msg=f"round {r}")
        ranks = script_ranks(sims)
        row = payload["rounds"][r - 1]
        assert row["round"] == r and row["meanr"] == pytest.approx(ranks.mean() + 1)
        for k in (1, 5, 10):
            assert row[f"r{k}"] == pytest.approx(100.0 * len(np.where(ranks < k)[0]) / len(ranks))
    if direction == "I-T":  # ours adds the local level turned the right way, so the two protocols differ
        full = runner.invoke(cli, ["evaluate", "--checkpoint", str(tmp_path / "ours.pt"), "--features",
                                   str(feature_dir), "--captions", str(queries), "--device", "cpu", "--json",
                                   str(tmp_path / "f.json")])
        assert full.exit_code == 0 and "protocol full (ours): all 7 images" in full.output
        assert json.loads((tmp_path / "f.json").read_text())["results"]["protocol"] == "full"


def test_protocol_hmrn_needs_a_whole_tile_one_process_and_a_multi_query_model(tmp_path, drilldown_vocab):
    from matching.config import EvaluationSettings
    from matching.retrieval.metrics import MetricsError
    from matching.tasks import get_task

    write_hmrn(tmp_path / "m.pth.tar")
    import_hmrn(tmp_path / "m.pth.tar", drilldown_vocab, tmp_path / "ours.pt")
    feature_dir, queries, _ = write_split(tmp_path, ["1", "2", "3"], np.ones((3, K, IMG), np.float32))
    result = runner.invoke(cli, ["evaluate", "--checkpoint", str(tmp_path / "ours.pt"), "--features",
                                 str(feature_dir), "--captions", str(queries), "--protocol", "hmrn"])
    assert result.exit_code == 2 and "whole tiles of 700 query sets" in result.output and "has 3" in result.output
    coco = runner.invoke(cli, ["evaluate", "--checkpoint", str(tmp_path / "ours.pt"), "--features",
                               str(feature_dir), "--captions", str(queries), "--protocol", "coco5k"])
    assert coco.exit_code == 2 and "a multi-query evaluation takes full" in coco.output
    with pytest.raises(MetricsError, match="does not apply to a matching evaluation"):
        get_task("matching").metrics(np.zeros((3, 15)), None, EvaluationSettings(protocol="hmrn"))


class RunsACommand:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("where", ["opt", "model"])
def test_a_hostile_hmrn_file_is_refused_before_anything_runs(tmp_path, drilldown_vocab, where):
    marker = tmp_path / "pwned"
    payload = {"epoch": 1, "model": hmrn_state_dicts(), "opt": hmrn_opt(), "best_rsum": 0.0, "Eiters": 0}
    if where == "opt":
        payload["opt"] = RunsACommand(marker)
    else:
        payload["model"][2]["sim_w.weight"] = RunsACommand(marker)
    torch.save(payload, tmp_path / "evil.pth.tar")
    with pytest.raises(CheckpointError, match="refused: its pickle names objects an HMRN checkpoint"):
        import_hmrn(tmp_path / "evil.pth.tar", drilldown_vocab, tmp_path / "ours.pt")
    result = runner.invoke(cli, ["import-hmrn", str(tmp_path / "evil.pth.tar"), "--vocab", str(drilldown_vocab),
                                 "--out", str(tmp_path / "ours.pt")])
    assert result.exit_code == 2 and "refused" in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not marker.exists() and not (tmp_path / "ours.pt").exists()


def test_other_layouts_options_and_vocabularies_are_named(tmp_path, drilldown_vocab):
    from tests.test_sgraf import sgraf_opt, sgraf_state_dicts

    def refused(parts=None, opt=None, vocab=drilldown_vocab):
        write_hmrn(tmp_path / "m.pth.tar", parts, opt)
        with pytest.raises(CheckpointError) as error:
            import_hmrn(tmp_path / "m.pth.tar", vocab, tmp_path / "o.pt")
        assert not (tmp_path / "o.pt").exists()
        return str(error.value)

    sgraf = refused(sgraf_state_dicts(), sgraf_opt())
    assert "keys not in HMRN's model: sim_enc.sim_eval_w.weight" in sgraf and "import-sgraf" in sgraf
    parts = hmrn_state_dicts()
    del parts[2]["sim_tranloc_w.weight"], parts[2]["sim_tranloc_w.bias"]
    assert "not HMRN's layout: no sim_enc.sim_tranloc_w.weight" in refused(parts)
    parts = hmrn_state_dicts()
    parts[2]["mystery.weight"] = torch.zeros(2)
    assert "keys not in HMRN's model: sim_enc.mystery.weight" in refused(parts)
    assert "cross_attention_direction = 'both'" in refused(opt=hmrn_opt(cross_attention_direction="both"))
    assert "opt.EOS_idx = 1" in refused(opt=hmrn_opt(EOS_idx=1))
    assert "opt.alpha = 'lots' is not a float" in refused(opt=hmrn_opt(alpha="lots"))
    small = tmp_path / "small.json"
    from matching.data.text import Vocabulary

    Vocabulary(WORDS[:10]).save(small)
    assert f"10 words, but {tmp_path / 'm.pth.tar'} embeds {VOCAB}" in refused(vocab=small)
    # Our own loader points at the importers instead of refusing silently.
    write_hmrn(tmp_path / "m.pth.tar")
    with pytest.raises(CheckpointError, match="convert it with `tshsr-pipe import-sgraf` or `tshsr-pipe import-hmrn`"):
        checkpoint.load(tmp_path / "m.pth.tar")
    # The vocabulary JSON that `vocab --from-drilldown` writes does as well as the pickle.
    Vocabulary(WORDS).save(tmp_path / "v.json")
    path, _ = import_hmrn(tmp_path / "m.pth.tar", tmp_path / "v.json", tmp_path / "o.pt")
    assert checkpoint.load(path)[2].words == WORDS
    assert checkpoint.load_payload(path)["imported_from"] == {"kind": "hmrn", "file": "m.pth.tar", "direction": "I-T",
                                                              "epoch": 97, "best_rsum": 301.5}
