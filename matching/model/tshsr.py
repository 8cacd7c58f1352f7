"""The TSHSR network: encoders + similarity head, built from a `ModelConfig`."""

from __future__ import annotations

from torch import Tensor, nn

from matching.config import ConfigError, ModelConfig, MultiQueryConfig
from matching.model.encoders import Embedded, ImageEncoder, TextEncoder
from matching.model.first_stage import FirstStageHead
from matching.model.reasoning import build_reasoning
from matching.model.similarity import SimilarityHead


class TSHSR(nn.Module):
    """Two-stream hierarchical similarity reasoning (and, by configuration, HSR and SGRAF's SGR).

    Images and captions are encoded once (`encode_images`, `encode_captions`);
    `pair_scores` scores every image against every caption of two encoded
    blocks. `forward` does all three for a training batch. `first_stage`, when
    given, is the shortlist's head (`matching.model.first_stage`): outside the paper's
    model, it reads the encoders' outputs and gives them nothing back.
    """

    def __init__(self, *, image_encoder: ImageEncoder, text_encoder: TextEncoder,
                 head: SimilarityHead, first_stage: FirstStageHead | None = None) -> None:
        super().__init__()
        self.image_encoder = image_encoder
        self.text_encoder = text_encoder
        self.head = head
        self.first_stage = first_stage

    def paper_parameters(self) -> list[nn.Parameter]:
        """The paper model's parameters: everything but the first-stage head's."""
        own = {id(p) for p in self.first_stage.parameters()} if self.first_stage is not None else set()
        return [p for p in self.parameters() if id(p) not in own]

    def image_vectors(self, images: Embedded) -> Tensor:
        """The shortlist's vector of each encoded image, (B, e) unit length: the first-stage head's, or
        v̄ for a model without one (trained with the global loss, or not trained for a shortlist at all)."""
        return self.first_stage.image_vectors(images) if self.first_stage is not None else images.glob

    def caption_vectors(self, captions: Embedded) -> Tensor:
        """The shortlist's vector of each encoded caption, (B, e): the first-stage head's, or t̄."""
        return self.first_stage.caption_vectors(captions) if self.first_stage is not None else captions.glob

    def encode_images(self, features: Tensor, num_boxes: Tensor) -> Embedded:
        """features (B, K, img_dim), num_boxes (B,) → Embedded (B, num_regions, d)."""
        return self.image_encoder(features, num_boxes)

    def encode_captions(self, tokens: Tensor, lengths: Tensor) -> Embedded:
        """tokens (B, L), lengths (B,) → Embedded (B, L, d)."""
        return self.text_encoder(tokens, lengths)

    def pair_scores(self, images: Embedded, captions: Embedded, *, chunk_rows: int | None = None) -> Tensor:
        """Scores of every (image, caption) pair: (Bi, Bc). `chunk_rows`: see `SimilarityHead`."""
        return self.head(images, captions, chunk_rows=chunk_rows)

    @staticmethod
    def global_scores(images: Embedded, captions: Embedded) -> Tensor:
        """cos(v̄, t̄) of every (image, caption) pair: (Bi, Bc), float32. The global vectors are unit
        length, so this is their inner product: the first stage of two-stage retrieval."""
        return images.glob.float() @ captions.glob.float().t()

    def forward(self, features: Tensor, num_boxes: Tensor, tokens: Tensor, lengths: Tensor) -> Tensor:
        """A batch's full score matrix (B_images, B_captions); the diagonal holds the positives."""
        return self.pair_scores(self.encode_images(features, num_boxes),
                                self.encode_captions(tokens, lengths))


def build_encoders(config: ModelConfig | MultiQueryConfig) -> tuple[ImageEncoder, TextEncoder]:
    """The region and text encoders of a config (both tasks' models share them), validated first."""
    config.validate()
    if config.vocab_size < 4:
        raise ConfigError(f"model.vocab_size is {config.vocab_size}; set it from the vocabulary")
    image_encoder = ImageEncoder(img_dim=config.img_dim, embed_size=config.embed_size,
                                 num_regions=config.num_regions, dropout=config.dropout,
                                 normalize=config.normalize_images)
    text_encoder = TextEncoder(vocab_size=config.vocab_size, word_dim=config.word_dim,
                               embed_size=config.embed_size, num_layers=config.gru_layers,
                               bidirectional=config.bidirectional, dropout=config.dropout,
                               normalize=config.normalize_text)
    return image_encoder, text_encoder


def build_model(config: ModelConfig) -> TSHSR:
    """A freshly initialised network for `config` (validated first)."""
    image_encoder, text_encoder = build_encoders(config)
    reasoning = build_reasoning(config.reasoning, config.sim_dim, config.reasoning_steps,
                                config.relation_norm)
    head = SimilarityHead(embed_size=config.embed_size, sim_dim=config.sim_dim, streams=config.streams,
                          reasoning=reasoning, reasoning_stream=config.reasoning_stream,
                          lambda_i2t=config.lambda_i2t, lambda_t2i=config.lambda_t2i,
                          attention_clip=config.attention_clip)
    first_stage = (FirstStageHead(config.embed_size, config.first_stage_dim, config.first_stage_pooling)
                   if config.first_stage_dim else None)
    return TSHSR(image_encoder=image_encoder, text_encoder=text_encoder, head=head, first_stage=first_stage)
