"""Random weights under the key names SGRAF's and HMRN's code share: encoders and the two poolings.

Both papers' `img_enc`, `txt_enc` and the `v_global_w` / `t_global_w` poolings of `sim_enc` have the same
names and shapes (`matching.importers.published` reads them for either); each test adds its own similarity
and reasoning keys with `random_weights` and `batch_norm` from the same generator.
"""

from __future__ import annotations

import torch


def random_weights(g: torch.Generator):
    """w(*shape, scale=0.3): normal weights from `g`."""

    def w(*shape, scale=0.3):
        return torch.randn(*shape, generator=g) * scale

    return w


def batch_norm(g: torch.Generator, n: int) -> dict[str, torch.Tensor]:
    """A BatchNorm's parameters and running statistics, none of them trivial."""
    w = random_weights(g)
    return {"weight": torch.rand(n, generator=g) + 0.5, "bias": w(n, scale=0.1),
            "running_mean": w(n, scale=0.2), "running_var": torch.rand(n, generator=g) + 0.5,
            "num_batches_tracked": torch.tensor(100)}


def encoders_and_poolings(g: torch.Generator, *, embed: int, img: int, vocab: int, word: int, regions: int,
                          word_scale: float = 0.3) -> tuple[dict, dict, dict]:
    """(img_enc, txt_enc, sim_enc's pooling keys) state dicts: the fc, the word embedding and bi-GRU, and the
    local / global / common layers of v_global_w (with batch norms) and t_global_w."""
    w = random_weights(g)
    image = {"fc.weight": w(embed, img), "fc.bias": w(embed, scale=0.05)}
    text = {"embed.weight": w(vocab, word, scale=word_scale)}
    for suffix in ("", "_reverse"):
        text[f"cap_rnn.weight_ih_l0{suffix}"] = w(3 * embed, word)
        text[f"cap_rnn.weight_hh_l0{suffix}"] = w(3 * embed, embed)
        text[f"cap_rnn.bias_ih_l0{suffix}"] = w(3 * embed, scale=0.1)
        text[f"cap_rnn.bias_hh_l0{suffix}"] = w(3 * embed, scale=0.1)
    sim = {}
    for prefix, norms in (("v_global_w", True), ("t_global_w", False)):
        sim[f"{prefix}.embedding_local.0.weight"], sim[f"{prefix}.embedding_local.0.bias"] = w(embed, embed), w(embed)
        sim[f"{prefix}.embedding_global.0.weight"], sim[f"{prefix}.embedding_global.0.bias"] = (w(embed, embed),
                                                                                              w(embed))
        sim[f"{prefix}.embedding_common.0.weight"], sim[f"{prefix}.embedding_common.0.bias"] = w(1, embed), w(1)
        if norms:
            sim.update({f"{prefix}.embedding_local.1.{k}": v for k, v in batch_norm(g, regions).items()})
            sim.update({f"{prefix}.embedding_global.1.{k}": v for k, v in batch_norm(g, embed).items()})
    return image, text, sim
