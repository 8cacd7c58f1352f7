"""Typed configuration: the paper's hyper-parameters as defaults (TSHSR §IV-A; docs/decisions.md).

One `Config` holds the task's model config (`ModelConfig` for TSHSR, `MultiQueryConfig` for
HMRN: everything needed to rebuild the network), a `TrainConfig` (the recipe) and the task's
name (`matching.tasks`). It is saved as plain data with every checkpoint and as YAML beside
every run. `EvaluationSettings` says how a test split is scored.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, get_type_hints

REASONING = ("hsr", "sgr")
STREAMS = ("i2t", "t2i", "both")
ATTENTION_CLIPS = ("leaky_relu", "relu")
RELATION_NORMS = ("softmax", "none")
FIRST_STAGE_POOLINGS = ("attention+max", "attention")  # `matching.model.first_stage.AttentionProjection`


class ConfigError(ValueError):
    """A configuration value is out of range or unknown; the message names the field."""


@dataclass
class ModelConfig:
    """The network. Defaults are the paper's; `sgraf_sgr()` gives SGRAF's SGR."""

    vocab_size: int = 0  # rows of the word embedding; set from the vocabulary
    img_dim: int = 2048  # width of the region features
    num_regions: int = 36  # K: most boxes an image has (the image self-attention normalises per region)
    word_dim: int = 300  # word embedding size
    embed_size: int = 1024  # d: joint embedding size (GRU hidden size)
    sim_dim: int = 256  # m: similarity vector size
    gru_layers: int = 1  # stacked GRU layers
    bidirectional: bool = True  # BiGRU; the two directions are averaged
    dropout: float = 0.4  # on word embeddings and in the self-attention pooling
    normalize_images: bool = True  # l2-normalise region embeddings
    normalize_text: bool = True  # l2-normalise word embeddings
    lambda_i2t: float = 9.0  # λ of the softmax over regions (words attend to regions, Eq. 2)
    lambda_t2i: float = 9.0  # λ of the softmax over words (regions attend to words, Eq. 3)
    attention_clip: str = "leaky_relu"  # [c]+ of Eq. 2/3: leaky_relu(0.1) as the reference code, or relu
    reasoning: str = "hsr"  # hsr (Eq. 4-6) or sgr (SGRAF's graph reasoning), Table IV
    reasoning_steps: int = 3  # M, Table III (0 = no reasoning)
    reasoning_stream: str = "i2t"  # the stream that reasons, Table V
    streams: str = "both"  # i2t ("HSR"), t2i, or both ("TSHSR"), Table I
    relation_norm: str = "softmax"  # HSR relation matrix: softmax rows, or none (the paper's literal Eq. 4)
    # Size of the shortlist's vectors (`matching.model.first_stage`: a head trained beside the model on detached
    # inputs, used only by two-stage retrieval); 0 = no head.
    first_stage_dim: int = 256
    # How the head pools a set of local vectors: attention pooling beside the element-wise max ("attention+max"),
    # or attention pooling alone ("attention", the first heads'); docs/decisions.md, "The first stage".
    first_stage_pooling: str = "attention+max"

    def validate(self) -> ModelConfig:
        """Raise ConfigError on a value no model can be built from; returns self."""
        choices = {"reasoning": REASONING, "streams": STREAMS, "reasoning_stream": ("i2t", "t2i"),
                   "attention_clip": ATTENTION_CLIPS, "relation_norm": RELATION_NORMS,
                   "first_stage_pooling": FIRST_STAGE_POOLINGS}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(f"model.{name} = {getattr(self, name)!r}; choose one of {', '.join(allowed)}")
        for name in ("img_dim", "num_regions", "word_dim", "embed_size", "sim_dim", "gru_layers"):
            if getattr(self, name) < 1:
                raise ConfigError(f"model.{name} must be at least 1, not {getattr(self, name)}")
        if self.reasoning_steps < 0:
            raise ConfigError(f"model.reasoning_steps must be 0 or more, not {self.reasoning_steps}")
        if self.first_stage_dim < 0:
            raise ConfigError(f"model.first_stage_dim must be 0 (no first stage) or more, not {self.first_stage_dim}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"model.dropout must be in [0, 1), not {self.dropout}")
        if self.reasoning_steps > 0 and self.streams not in ("both", self.reasoning_stream):
            raise ConfigError(f"model.reasoning_stream = {self.reasoning_stream!r} but model.streams = "
                              f"{self.streams!r}: the reasoning stream must be computed")
        return self

    @classmethod
    def variant(cls, name: str, **overrides: Any) -> ModelConfig:
        """The config of a named variant (`VARIANTS`) with further field overrides."""
        if name not in VARIANTS:
            raise ConfigError(f"unknown variant {name!r}; choose one of {', '.join(VARIANTS)}")
        return cls(**{**VARIANTS[name], **overrides})

    @classmethod
    def sgraf_sgr(cls, **overrides: Any) -> ModelConfig:
        """SGRAF's SGR model: graph reasoning on the image-to-text stream only, M = 3."""
        return cls.variant("sgr", **{"reasoning_steps": 3, **overrides})


# How a text's token ids are wrapped: start-end = [<start>, words…, <end>] (SGRAF's captions), end = [words…, <end>]
# (HMRN's queries; its data loader appends only <end>).
TEXT_WRAPS = ("start-end", "end")
DIRECTIONS = ("i2t", "t2i")
QUERY_READOUTS = ("last", "ends")
ROUND_WEIGHTS = ("triangular", "rounded", "constant")



@dataclass
class MultiQueryConfig:
    """The HMRN network and its loss; defaults are HMRN's (opts.py of LZH-053/HMRN)."""

    vocab_size: int = 0  # rows of the word embedding; set from the vocabulary
    img_dim: int = 2048  # width of the region features
    num_regions: int = 36  # K: most boxes an image has (the image self-attention normalises per region)
    word_dim: int = 300  # word embedding size
    embed_size: int = 256  # d: joint embedding size (GRU hidden size); HMRN uses 256, not TSHSR's 1024
    sim_dim: int = 256  # m: similarity vector size of the reasoning nodes
    gru_layers: int = 1  # stacked GRU layers
    bidirectional: bool = True  # BiGRU; the two directions are averaged
    dropout: float = 0.4  # on word embeddings and in the self-attention poolings
    normalize_images: bool = True  # l2-normalise region embeddings
    normalize_text: bool = True  # l2-normalise query vectors
    query_readout: str = "last"  # last: both directions at the last token (HMRN); ends: backward at the first
    max_turns: int = 10  # T: queries per image in training, rounds in evaluation
    direction: str = "i2t"  # local-level attention: i2t (regions attend to queries) or t2i (queries to regions)
    lambda_i2t: float = 5.0  # softmax temperature over queries of the i2t local level
    lambda_t2i: float = 15.0  # softmax temperature over regions of the t2i local level
    lambda_reasoning: float = 15.0  # temperature of the reasoning's query → region attention (HMRN: its t2i one)
    reasoning_steps: int = 3  # SGR steps of the vector-based reasoning
    local_weight: float = 0.6  # α: weight of the local level in the loss and the score
    reasoning_weight: float = 0.3  # β: weight of the reasoning; the global level gets 1 − α − β
    tau: float = 40.0  # InfoNCE temperature (logits = τ · similarity)
    round_weight: str = "triangular"  # w_r of the reasoning at round r: triangular, rounded (HMRN's code), constant
    query_wrap: str = "end"  # a query's tokens: end = words… <end> (HMRN), start-end = <start> words… <end> (captions)

    @property
    def global_weight(self) -> float:
        return 1.0 - self.local_weight - self.reasoning_weight

    def validate(self) -> MultiQueryConfig:
        """Raise ConfigError on a value no model can be built from; returns self."""
        choices = {"direction": DIRECTIONS, "query_readout": QUERY_READOUTS, "round_weight": ROUND_WEIGHTS,
                   "query_wrap": TEXT_WRAPS}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(f"model.{name} = {getattr(self, name)!r}; choose one of {', '.join(allowed)}")
        for name in ("img_dim", "num_regions", "word_dim", "embed_size", "sim_dim", "gru_layers", "max_turns"):
            if getattr(self, name) < 1:
                raise ConfigError(f"model.{name} must be at least 1, not {getattr(self, name)}")
        if self.reasoning_steps < 0:
            raise ConfigError(f"model.reasoning_steps must be 0 or more, not {self.reasoning_steps}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"model.dropout must be in [0, 1), not {self.dropout}")
        for name in ("lambda_i2t", "lambda_t2i", "lambda_reasoning", "tau"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"model.{name} must be positive, not {getattr(self, name)}")
        if min(self.local_weight, self.reasoning_weight) < 0 or self.global_weight < -1e-9:
            raise ConfigError(f"model.local_weight ({self.local_weight}) and model.reasoning_weight "
                              f"({self.reasoning_weight}) must be non-negative and sum to at most 1")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, payload: dict[str, Any]) -> MultiQueryConfig:
        """Build from plain data (a checkpoint or YAML), checking names and types."""
        return _build(cls, payload, "model").validate()


@dataclass
class TrainConfig:
    """The training recipe (§IV-A); COCO/Flickr30K presets in `PRESETS`."""

    margin: float = 0.2  # α of the triplet loss (Eq. 9)
    hardest_negatives: bool = True  # max over negatives (VSE++); False sums all negatives
    warmup_epochs: int = 0  # epochs that sum all negatives before switching to the hardest
    # Weight of the same hinge on the model's global vectors' cosines cos(v̄, t̄), added to the paper's loss.
    # Off by default: it shares the encoders and costs the paper's model what pooled vectors cannot separate
    # (docs/decisions.md); the shortlist has its own head (model.first_stage_dim).
    global_loss_weight: float = 0.0
    first_stage_temperature: float = 0.05  # InfoNCE temperature of the first-stage head's own loss
    learning_rate: float = 2e-4  # Adam
    lr_decay_epoch: int = 10  # epoch at which the learning rate is multiplied by lr_decay
    lr_decay: float = 0.1
    epochs: int = 20
    batch_size: int = 128
    grad_clip: float = 2.0  # max gradient norm (0 = off)
    seed: int = 0
    workers: int = 2  # DataLoader worker processes
    features_in_memory: bool = False  # keep all region features in RAM
    mixed_precision: bool = False  # autocast to bfloat16 on GPU
    allow_tf32: bool = False  # TF32 matmuls on Ampere+ GPUs
    length_buckets: bool = False  # batches of similar-length captions (less padding; the paper shuffles uniformly)
    captions_per_image: int = 5  # captions per validation image
    val_images: int = 1000  # validate on the first N images of the val split (0 = all), as SGRAF does
    checkpoint_every: int = 500  # steps between mid-epoch checkpoints (0 = only at epoch ends)
    log_every: int = 50  # steps between log lines

    def validate(self) -> TrainConfig:
        """Raise ConfigError on a value no run can use; returns self."""
        positive = ("learning_rate", "epochs", "batch_size", "captions_per_image", "first_stage_temperature")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ConfigError(f"train.{name} must be positive, not {getattr(self, name)}")
        if self.batch_size < 2:
            raise ConfigError("train.batch_size must be at least 2: the loss needs negatives in the batch")
        for name in ("margin", "global_loss_weight", "warmup_epochs", "lr_decay_epoch", "lr_decay", "grad_clip",
                     "workers", "val_images", "checkpoint_every", "log_every"):
            if getattr(self, name) < 0:
                raise ConfigError(f"train.{name} must not be negative, not {getattr(self, name)}")
        return self


# Named models of the paper's tables (README "Variants"); each is a set of ModelConfig overrides.
VARIANTS: dict[str, dict[str, Any]] = {
    "tshsr": {},  # Table I "Ours (TSHSR)": HSR on the i2t stream + the averaged t2i stream
    "hsr": {"streams": "i2t"},  # Table I "Ours (HSR)"; Tables III-V vary its M and stream
    "hsr-t2i": {"streams": "t2i", "reasoning_stream": "t2i"},  # Table V "T2I"
    "sgr": {"reasoning": "sgr", "streams": "i2t"},  # SGRAF's SGR, Table IV config 0
}

PRESETS: dict[str, dict[str, Any]] = {
    "coco": {"epochs": 20, "lr_decay_epoch": 10},
    "f30k": {"epochs": 40, "lr_decay_epoch": 30},
    # HMRN's recipe (its opts.py): Adam 4e-4, batch 128, gradient clipping 2, 150 epochs with lr × 0.1
    # from epoch 75, validation on all val images. The default of the multi-query task.
    "hmrn": {"learning_rate": 4e-4, "batch_size": 128, "grad_clip": 2.0, "epochs": 150, "lr_decay_epoch": 75,
             "lr_decay": 0.1, "val_images": 0, "global_loss_weight": 0.0},  # HMRN's loss has its own global term
}


def _task(name: str) -> Any:
    """The registered task `name`; ConfigError naming the choices otherwise."""
    from matching.tasks import UnknownTaskError, get_task

    try:
        return get_task(name)
    except UnknownTaskError as error:
        raise ConfigError(str(error)) from None


@dataclass
class Config:
    """The network (`model`: the task's model config, e.g. a ModelConfig or a MultiQueryConfig) and the recipe."""

    model: Any = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    task: str = "matching"  # a task of matching.tasks.REGISTRY; saved with every run and checkpoint

    @classmethod
    def default(cls, task: str = "matching") -> Config:
        """The defaults of a task: its model's, and its recipe (the paper's, or HMRN's for multi-query)."""
        spec = _task(task)
        return cls(model=spec.model_config(), train=TrainConfig(**spec.recipe), task=task)

    def to_dict(self) -> dict[str, Any]:
        return {"task": self.task, "model": dataclasses.asdict(self.model), "train": dataclasses.asdict(self.train)}

    @classmethod
    def from_dict(cls, payload: dict[str, Any]) -> Config:
        unknown = set(payload) - {"model", "train", "task"}
        if unknown:
            raise ConfigError(f"unknown config section(s): {', '.join(sorted(unknown))}; expected model, train, task")
        from matching.tasks import DEFAULT_TASK

        task = payload.get("task", DEFAULT_TASK)  # checkpoints before the multi-query task have no task
        return cls(model=_build(_task(task).model_config, payload.get("model", {}), "model").validate(),
                   train=_build(TrainConfig, payload.get("train", {}), "train").validate(), task=task)

    @classmethod
    def from_checkpoint(cls, payload: dict[str, Any]) -> Config:
        """The config saved in a checkpoint, read as the run that wrote it trained.

        Fields added since keep the meaning they had then, not today's default: the task's
        `legacy_fields` (a matching checkpoint saved before `train.global_loss_weight` existed was
        trained without the global loss, one saved before `model.first_stage_dim` has no head).
        """
        from matching.tasks import DEFAULT_TASK

        if not isinstance(payload, dict):
            return cls.from_dict(payload)
        sections = {name: dict(payload.get(name) or {}) for name in ("model", "train")}
        for key, value in _task(payload.get("task", DEFAULT_TASK)).legacy_fields.items():
            section, _, name = key.partition(".")
            if sections[section] and name not in sections[section]:
                sections[section][name] = value
        return cls.from_dict({**payload, **{k: v for k, v in sections.items() if k in payload}})

    def updated(self, model: dict[str, Any] | None = None, train: dict[str, Any] | None = None) -> Config:
        """A copy with some fields replaced (checked like a config file)."""
        payload = self.to_dict()
        payload["model"].update(model or {})
        payload["train"].update(train or {})
        return Config.from_dict(payload)


# import-vg's cleaning of Visual Genome's region phrases (`matching.data.queries.clean_phrase`): strict = lower-cased,
# stripped, blank phrases dropped (ours); hmrn = lower-cased only, blanks kept as they are (HMRN's vg.py).
PHRASE_CLEANINGS = ("strict", "hmrn")

# faiss indexes of two-stage retrieval's first stage (`matching.retrieval.shortlist`): exact, inverted file, HNSW graph.
INDEX_KINDS = ("flat", "ivf", "hnsw")
PRECISIONS = ("float32", "tf32", "bf16")  # the scorers' arithmetic (matching.retrieval.scoring.matmul_precision)
# An encoded gallery's "auto" first stage: flat (exact) up to this many images, HNSW beyond. Measured at MSCOCO size
# (docs/performance.md, "Scale"): flat answers a query in under a millisecond over 123,287 vectors, where HNSW and IVF
# found a fifth and a hundredth of flat's top 200; an approximate index pays only past a million images.
FLAT_UP_TO = 1_000_000
GALLERY_DTYPES = ("float16", "float32")  # how an encoded gallery stores its region embeddings
SEARCH_SHORTLIST = 200  # images a search query re-ranks with the full model (two-stage search's default)



@dataclass
class EvaluationSettings:
    """How a test split is scored: read by `evaluate`, the pipeline's evaluate section and the search service."""

    split: str | None = "test"  # the split scored (None: every caption or query set of the file; a gallery: all)
    protocol: str = "all"  # coco1k, coco5k, f30k, full, all that fit, hmrn (matching.retrieval.metrics.PROTOCOLS)
    captions_per_image: int = 5  # captions of each test image ranked (the first ones)
    batch_size: int = 128  # images or captions per encoder batch
    memory_budget: float | None = None  # GiB of working memory for scoring blocks (None: half the free GPU memory,
    # 2 GiB on a CPU)
    shortlist: int | None = None  # two-stage: images each query re-ranks (None: evaluate scores every pair,
    # search and serve take SEARCH_SHORTLIST for a model with a first stage; 0: every pair)
    shortlist_index: str = "flat"  # faiss index of the first stage (INDEX_KINDS)
    precision: str = "float32"  # the scorers' arithmetic: float32, bf16 (bfloat16 autocast, CPU or GPU) or tf32 (CUDA)

    def validate(self) -> EvaluationSettings:
        """Raise ConfigError on a value no evaluation can use; returns self."""
        from matching.retrieval.metrics import PROTOCOLS

        if self.protocol not in PROTOCOLS:
            raise ConfigError(f"evaluate.protocol = {self.protocol!r}; choose one of {', '.join(PROTOCOLS)}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"evaluate.precision = {self.precision!r}; choose one of {', '.join(PRECISIONS)}")
        if self.shortlist_index not in INDEX_KINDS:
            raise ConfigError(f"evaluate.shortlist_index = {self.shortlist_index!r}; choose one of "
                              f"{', '.join(INDEX_KINDS)}")
        for name in ("captions_per_image", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"evaluate.{name} must be at least 1, not {getattr(self, name)}")
        if self.shortlist is not None and self.shortlist < 0:
            raise ConfigError(f"evaluate.shortlist must be 0 or more, not {self.shortlist}")
        if self.memory_budget is not None and self.memory_budget <= 0:
            raise ConfigError(f"evaluate.memory_budget must be positive GiB, not {self.memory_budget}")
        return self

    @property
    def memory_budget_bytes(self) -> int | None:
        return int(self.memory_budget * 2**30) if self.memory_budget else None

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> EvaluationSettings:
        """From plain data (a pipeline file's evaluate section), checking names and types."""
        return _build(cls, values, "evaluate").validate()


def _build(kind: type, values: dict[str, Any], section: str) -> Any:
    """Build a dataclass from plain data, checking names and coercing types (YAML gives strings for 2e-4)."""
    if not isinstance(values, dict):
        raise ConfigError(f"config section {section!r} must be a mapping, not {type(values).__name__}")
    raw = get_type_hints(kind)
    hints = {name: _concrete(hint) for name, hint in raw.items()}
    known = {f.name for f in dataclasses.fields(kind)}
    unknown = set(values) - known
    if unknown:
        raise ConfigError(f"unknown field(s) {section}.{', '.join(sorted(unknown))}; "
                          f"known: {', '.join(sorted(known))}")
    coerced = {}
    for name, value in values.items():
        target = hints[name]
        if value is None and hints[name] is not raw[name]:  # an optional field (X | None) left unset
            coerced[name] = None
            continue
        try:
            if target is bool:
                if isinstance(value, str):
                    if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                        raise ValueError(value)
                    value = value.lower() in ("true", "1", "yes")
                coerced[name] = bool(value)
            elif target in (int, float):
                if isinstance(value, bool) or (target is int and isinstance(value, float)
                                               and not value.is_integer()):
                    raise ValueError(value)
                coerced[name] = target(value)
            else:
                coerced[name] = target(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{section}.{name} = {value!r} is not a valid {target.__name__}") from None
    return kind(**coerced)


def _concrete(hint: Any) -> Any:
    """`X | None` → X (a None value is kept as None by `_build`); other hints as they are."""
    import types

    if isinstance(hint, types.UnionType):
        options = [h for h in hint.__args__ if h is not type(None)]
        return options[0] if len(options) == 1 else hint
    return hint


def read_yaml_mapping(path: str | os.PathLike, what: str, expected: str) -> dict[str, Any]:
    """A YAML (or JSON) file that must hold a mapping; ConfigError naming the file otherwise."""
    import yaml

    try:
        with open(path, encoding="utf-8") as handle:
            payload = yaml.safe_load(handle) or {}
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such {what}") from None
    except (OSError, yaml.YAMLError) as error:
        raise ConfigError(f"{path}: unreadable {what} ({str(error).splitlines()[0]})") from None
    if not isinstance(payload, dict):
        raise ConfigError(f"{path}: a {what} is {expected}")
    return payload


def load_config_file(path: str) -> dict[str, Any]:
    """A config file as plain data: {"model": {...}, "train": {...}}, either section optional."""
    return read_yaml_mapping(path, "config file", "a mapping with 'model' and/or 'train' sections")


# Fields a resumed run may change: they alter neither the saved weights' meaning nor the data order.
RESUMABLE = frozenset({"train.epochs", "train.lr_decay_epoch", "train.workers", "train.features_in_memory",
                       "train.checkpoint_every", "train.log_every"})


def requested_settings(*, preset: str | None = None, config_file: str | None = None, variant: str | None = None,
                       overrides: dict[str, Any] | None = None,
                       sets: list[str] | tuple[str, ...] = ()) -> dict[str, Any]:
    """What a user asked for, as ``{"section.field": value}``, in precedence order.

    Defaults < preset < config file < variant < overrides (None values ignored) < ``--set
    section.key=value``; a later layer replaces an earlier one. Only the fields named somewhere
    appear, so a resumed run can tell what the user asked to change.
    """
    dotted: dict[str, Any] = {}
    if preset:
        if preset not in PRESETS:
            raise ConfigError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
        dotted.update({f"train.{k}": v for k, v in PRESETS[preset].items()})
    if config_file:
        loaded = load_config_file(config_file)
        unknown = set(loaded) - {"model", "train"}
        if unknown:
            raise ConfigError(f"{config_file}: unknown section(s) {', '.join(sorted(unknown))}; expected model, train")
        for section in ("model", "train"):
            if not isinstance(loaded.get(section) or {}, dict):
                raise ConfigError(f"{config_file}: section {section!r} must be a mapping")
            dotted.update({f"{section}.{k}": v for k, v in (loaded.get(section) or {}).items()})
    if variant:
        if variant not in VARIANTS:
            raise ConfigError(f"unknown variant {variant!r}; choose one of {', '.join(VARIANTS)}")
        dotted.update({f"model.{k}": v for k, v in VARIANTS[variant].items()})
    dotted.update({k: v for k, v in (overrides or {}).items() if v is not None})
    for item in sets:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected section.field=value, e.g. model.lambda_i2t=4")
        key, value = item.split("=", 1)
        dotted[key.strip()] = value.strip()
    for key in dotted:
        section, _, name = key.partition(".")
        if section not in ("model", "train") or not name:
            raise ConfigError(f"{key!r}: expected model.<field> or train.<field>")
    return dotted


def apply_settings(config: Config, dotted: dict[str, Any]) -> Config:
    """A copy of `config` with ``{"section.field": value}`` applied and checked."""
    payload = config.to_dict()
    for key, value in dotted.items():
        if key == "task":  # the task is chosen when the config is made (Config.default), not changed
            continue
        section, _, name = key.partition(".")
        payload[section][name] = value
    return Config.from_dict(payload)


# The `train` command's direct flags and the config field each sets.
TRAIN_FLAGS: dict[str, str] = {
    "epochs": "train.epochs", "batch_size": "train.batch_size", "lr": "train.learning_rate",
    "embed_size": "model.embed_size", "sim_dim": "model.sim_dim", "word_dim": "model.word_dim",
    "steps": "model.reasoning_steps", "warmup_epochs": "train.warmup_epochs",
    "global_loss_weight": "train.global_loss_weight", "length_buckets": "train.length_buckets", "seed": "train.seed",
    "workers": "train.workers", "log_every": "train.log_every", "in_memory": "train.features_in_memory",
    "mixed_precision": "train.mixed_precision", "tf32": "train.allow_tf32",
}


def plan_run(*, task: str | None = None, preset: str | None = None, config_file: str | None = None,
             variant: str | None = None, flags: dict[str, Any] | None = None,
             sets: list[str] | tuple[str, ...] = ()) -> tuple[Config, dict[str, Any]]:
    """A new run's Config from a user's choices, and the settings they asked for explicitly.

    The config: the task's defaults < preset < config file < variant < direct flags (`TRAIN_FLAGS`
    names; None values ignored) < ``--set section.key=value``. The requested settings (with
    "task" when one is named) are what a resumed run compares with its saved config.
    """
    flags = flags or {}
    unknown = set(flags) - set(TRAIN_FLAGS)
    if unknown:
        raise ConfigError(f"unknown train flag(s) {', '.join(sorted(unknown))}; known: {', '.join(TRAIN_FLAGS)}")
    overrides = {TRAIN_FLAGS[name]: value for name, value in flags.items()}
    config = resolve_config(preset=preset, config_file=config_file, variant=variant, overrides=overrides, sets=sets,
                            task=task or "matching")
    requested = requested_settings(preset=preset, config_file=config_file, variant=variant, overrides=overrides,
                                   sets=sets)
    if task:
        requested["task"] = task  # a resumed run of another task is refused
    return config, requested


def resolve_config(*, preset: str | None = None, config_file: str | None = None, variant: str | None = None,
                   overrides: dict[str, Any] | None = None, sets: list[str] | tuple[str, ...] = (),
                   task: str = "matching") -> Config:
    """Build the run's Config: the task's defaults < preset < config file < variant < overrides
    < ``--set section.key=value``.

    `overrides` maps "model.embed_size"-style names to values (None values are ignored).
    """
    if variant and variant not in _task(task).variants:
        raise ConfigError(f"--variant {variant} names a model of another task; the {task} task's models are set "
                          "with --set model.FIELD=VALUE")
    return apply_settings(Config.default(task), requested_settings(preset=preset, config_file=config_file,
                                                                   variant=variant, overrides=overrides, sets=sets))


def settings_differences(config: Config, dotted: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """{"section.field": (value in config, value asked for)} for the requested fields that differ."""
    changed = apply_settings(config, dotted).to_dict()
    current = config.to_dict()
    differences = {}
    for key in dotted:
        if key == "task":
            if dotted[key] != config.task:
                differences[key] = (config.task, dotted[key])
            continue
        section, _, name = key.partition(".")
        if changed[section][name] != current[section][name]:
            differences[key] = (current[section][name], changed[section][name])
    return differences
