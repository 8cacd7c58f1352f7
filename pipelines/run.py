"""`tshsr-pipe run`: extract → vocab → train → evaluate, each stage skipped when it is up to date,
and resumable after a crash at any stage.

A pipeline is described by a YAML file (or the same fields as flags)::

    workdir: work/coco              # where vocab.json, runs/ and the metrics go
    images: data/coco/images        # optional: raw images to extract (else `features` must exist)
    features: work/coco/features    # feature directory (written by the extract stage)
    captions: data/dataset_coco.json
    name: tshsr                     # run name under workdir/runs
    device: auto
    extract: {weights: data/faster_rcnn_from_caffe_attr.pkl}   # the options of `tshsr-pipe extract`
    vocab: {threshold: 4}           # and `splits`
    model: {reasoning_steps: 3}     # any ModelConfig field
    train: {epochs: 20}             # any TrainConfig field; `preset: coco` and `variant: hsr` too
    evaluate: {split: test, protocol: all}   # any EvaluationSettings field

Every section is checked before any stage runs (an unknown field or value is refused with the
known ones). A stage is up to date when its outputs exist and were made from the same resolved
settings and the same inputs (file sizes and times, the shards' checksums): the record of
each stage is kept in ``WORKDIR/.pipeline-state.json``. Editing the YAML (more epochs, another
embedding size, a vocabulary threshold) reruns the stage it concerns and the ones after it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from extract.safeio import write_json
from pipelines.errors import PipelineError, StageStopped

STAGES = ("extract", "vocab", "train", "evaluate")
STATE_FILE = ".pipeline-state.json"
VOCAB_OPTIONS = {"threshold": int, "splits": list}
TRAIN_CHOICES = ("preset", "variant", "train_split", "val_split")


@dataclass
class PipelineSpec:
    workdir: Path
    captions: Path
    features: Path
    images: Path | None = None
    name: str = "run"
    device: str = "auto"
    extract: dict[str, Any] = field(default_factory=dict)
    vocab: dict[str, Any] = field(default_factory=dict)
    model: dict[str, Any] = field(default_factory=dict)
    train: dict[str, Any] = field(default_factory=dict)
    evaluate: dict[str, Any] = field(default_factory=dict)

    @property
    def vocab_path(self) -> Path:
        return self.workdir / "vocab.json"

    @property
    def run_dir(self) -> Path:
        return self.workdir / "runs" / self.name

    @property
    def metrics_path(self) -> Path:
        return self.run_dir / "test_metrics.json"

    @classmethod
    def from_file(cls, path: str | os.PathLike, **overrides: Any) -> PipelineSpec:
        from matching.config import read_yaml_mapping

        payload = read_yaml_mapping(path, "pipeline file", "a mapping (workdir, captions, features, …)")
        base = Path(path).resolve().parent
        try:
            return cls.from_dict(payload, base, **overrides)
        except PipelineError as error:
            raise PipelineError(f"{path}: {error}") from None

    @classmethod
    def from_dict(cls, payload: dict[str, Any], base: Path = Path("."), **overrides: Any) -> PipelineSpec:
        payload = {**payload, **{k: v for k, v in overrides.items() if v is not None}}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(payload) - known
        if unknown:
            raise PipelineError(f"unknown pipeline field(s): {', '.join(sorted(unknown))}; known: "
                                f"{', '.join(sorted(known))}")
        if not payload.get("captions"):
            raise PipelineError("the pipeline needs 'captions'")
        workdir = base / payload.get("workdir", "tshsr-work")

        def resolve(value: Any) -> Path | None:
            return None if value in (None, "") else (base / str(value))

        features = resolve(payload.get("features")) or workdir / "features"
        for section in ("extract", "vocab", "model", "train", "evaluate"):
            if not isinstance(payload.get(section) or {}, dict):
                raise PipelineError(f"pipeline field '{section}' must be a mapping")
        extract = dict(payload.get("extract") or {})
        for key in ("weights", "list"):  # paths, like the top-level ones, relative to the pipeline file
            if extract.get(key):
                extract[key] = str(resolve(extract[key]))
        spec = cls(workdir=workdir, captions=resolve(payload["captions"]), features=features,  # type: ignore[arg-type]
                   images=resolve(payload.get("images")), name=str(payload.get("name", "run")),
                   device=str(payload.get("device", "auto")), extract=extract,
                   vocab=dict(payload.get("vocab") or {}), model=dict(payload.get("model") or {}),
                   train=dict(payload.get("train") or {}), evaluate=dict(payload.get("evaluate") or {}))
        spec.check()
        return spec

    # ------------------------------------------------------------------ resolved settings

    def check(self) -> None:
        """Resolve every section now, so a typo is refused before any stage runs."""
        if self.images is not None:
            from pipelines.extract_stage import extract_config

            extract_config(self.extract, self.device)
        self.vocab_settings()
        self.train_config()
        self.evaluate_settings()

    def vocab_settings(self) -> dict[str, Any]:
        _known(self.vocab, VOCAB_OPTIONS, "vocab")
        threshold = self.vocab.get("threshold", 4)
        if isinstance(threshold, bool) or not isinstance(threshold, int) or threshold < 1:
            raise PipelineError(f"vocab.threshold must be a whole number of at least 1, not {threshold!r}")
        splits = self.vocab.get("splits", ["train", "val"])
        splits = [splits] if isinstance(splits, str) else splits
        if not isinstance(splits, list) or not splits or not all(isinstance(s, str) and s for s in splits):
            raise PipelineError(f"vocab.splits must be a list of split names, not {splits!r}")
        return {"threshold": threshold, "splits": splits}

    def train_config(self) -> Any:
        """The run's resolved `matching.config.Config`; PipelineError on an unknown field or value."""
        from matching.config import ConfigError, resolve_config

        options = {k: v for k, v in self.train.items() if k not in TRAIN_CHOICES}
        try:
            return resolve_config(preset=self.train.get("preset"), variant=self.train.get("variant"), overrides={
                **{f"model.{k}": v for k, v in self.model.items()}, **{f"train.{k}": v for k, v in options.items()}})
        except ConfigError as error:
            raise PipelineError(str(error)) from None

    def train_splits(self) -> tuple[str, str | None]:
        return str(self.train.get("train_split", "train")), (self.train.get("val_split", "val") or None)

    def evaluate_settings(self) -> Any:
        """The evaluate section as `matching.config.EvaluationSettings`; PipelineError on an unknown field or value."""
        from matching.config import ConfigError, EvaluationSettings

        try:
            return EvaluationSettings.from_dict(dict(self.evaluate))
        except ConfigError as error:
            raise PipelineError(str(error)) from None


def _known(options: dict[str, Any], allowed: dict[str, type], section: str) -> None:
    unknown = set(options) - set(allowed)
    if unknown:
        raise PipelineError(f"unknown {section} option(s): {', '.join(sorted(unknown))}; known: "
                            f"{', '.join(sorted(allowed))}")


# --------------------------------------------------------------------------- up-to-date records


def _file(path: Path) -> list[Any]:
    """A file's identity for the up-to-date check: size and modification time (ns)."""
    stat = path.stat()
    return [stat.st_size, stat.st_mtime_ns]


def _features(path: Path) -> list[str]:
    """A feature directory's identity: its shards' checksums, from the manifest."""
    from extract.shards import read_manifest

    return [entry.sha256 for entry in read_manifest(path).shards]


class StageRecords:
    """What each stage's outputs were made from, in WORKDIR/.pipeline-state.json."""

    def __init__(self, workdir: Path) -> None:
        self.path = workdir / STATE_FILE
        try:
            self.records: dict[str, Any] = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            self.records = {}

    @staticmethod
    def make(settings: Any, inputs: Any) -> dict[str, Any]:
        text = json.dumps({"settings": settings, "inputs": inputs}, sort_keys=True, default=str)
        return {"settings": settings, "inputs": inputs, "digest": hashlib.sha256(text.encode()).hexdigest()}

    def matches(self, stage: str, record: dict[str, Any]) -> bool:
        return self.records.get(stage, {}).get("digest") == record["digest"]

    def changes(self, stage: str, record: dict[str, Any]) -> str:
        """What differs from the stage's last record, for the log."""
        old = self.records.get(stage)
        if old is None:
            return "no record of the settings it was made with"
        before = _flat(old["settings"])
        changed = [f"{k} {before.get(k)!r} → {v!r}" for k, v in _flat(record["settings"]).items()
                   if before.get(k) != v]
        parts = [f"settings changed ({'; '.join(changed[:4])}{'; …' if len(changed) > 4 else ''})"] if changed else []
        if old.get("inputs") != record["inputs"]:
            parts.append("inputs changed")
        return ", ".join(parts) or "settings changed"

    def save(self, stage: str, record: dict[str, Any]) -> None:
        self.records[stage] = record
        write_json(self.path, self.records)


def _flat(settings: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(settings, dict):
        return {prefix.rstrip("."): settings}
    flat: dict[str, Any] = {}
    for key, value in settings.items():
        flat.update(_flat(value, f"{prefix}{key}."))
    return flat


# --------------------------------------------------------------------------- the pipeline


def run_pipeline(spec: PipelineSpec, *, force: tuple[str, ...] = (), log: Callable[[str], None] = print,
                 progress: bool = True) -> dict[str, Any]:
    """Run the stages in order; returns the evaluation results ({protocol: metrics})."""
    for stage in force:
        if stage not in STAGES:
            raise PipelineError(f"unknown stage {stage!r}; stages: {', '.join(STAGES)}")
    spec.check()
    forced = set(force)
    # Forcing a stage forces the ones after it: their inputs change.
    for index, stage in enumerate(STAGES):
        if stage in forced:
            forced.update(STAGES[index:])
    spec.workdir.mkdir(parents=True, exist_ok=True)
    records = StageRecords(spec.workdir)
    _extract(spec, forced, log, progress)
    _vocab(spec, records, forced, log)
    _train(spec, records, forced, log, progress)
    return _evaluate(spec, records, forced, log)


def _extract(spec: PipelineSpec, forced: set[str], log: Callable[[str], None], progress: bool) -> None:
    if spec.images is not None:
        from pipelines.extract_stage import extract_stage

        if "extract" in forced and spec.features.exists():
            log(f"extract: --force: re-extracting into {spec.features}")
        # Extraction is incremental by itself and refuses other output settings on resume.
        extract_stage(spec.images, spec.features, dict(spec.extract), device=spec.device, log=log,
                      progress=progress, force="extract" in forced)
    elif not (spec.features / "manifest.json").exists():
        raise PipelineError(f"{spec.features}: no features and no 'images' to extract them from")
    else:
        log(f"extract: skipped (features given: {spec.features})")


def _vocab(spec: PipelineSpec, records: StageRecords, forced: set[str], log: Callable[[str], None]) -> None:
    from matching.data.vocabulary import build_vocabulary

    settings = spec.vocab_settings()
    record = StageRecords.make(settings, {"captions": _file(spec.captions)})
    if "vocab" not in forced and spec.vocab_path.exists() and records.matches("vocab", record):
        log(f"vocab: up to date ({spec.vocab_path})")
        return
    built, counted = build_vocabulary(spec.captions, spec.vocab_path, splits=settings["splits"],
                                      threshold=settings["threshold"])
    records.save("vocab", record)
    log(f"vocab: {len(built)} words (threshold {settings['threshold']}, {counted} captions) → {spec.vocab_path}")


def _train(spec: PipelineSpec, records: StageRecords, forced: set[str], log: Callable[[str], None],
           progress: bool) -> None:
    from matching.training.loop import train
    from matching.training.rundir import RunDirectory, run_finished

    config = spec.train_config()
    train_split, val_split = spec.train_splits()
    record = StageRecords.make({"config": config.to_dict(), "train_split": train_split, "val_split": val_split},
                               {"vocab": _file(spec.vocab_path), "captions": _file(spec.captions),
                                "features": _features(spec.features)})
    run = RunDirectory(spec.run_dir)
    same = "train" not in forced and records.matches("train", record)
    if same and run_finished(run.path):
        log(f"train: up to date ({run.best})")
        return
    resume = same and run.last.exists()
    if not resume and run.run_files():
        why = "--force" if "train" in forced else records.changes("train", record)
        log(f"train: {why}: starting {run.path} again")
    records.save("train", record)  # before training: a crash is resumed only with these settings
    log(f"train: {'resuming' if resume else 'training'} {run.path}")
    result = train(config, features=spec.features, captions=spec.captions, vocab_path=spec.vocab_path,
                   run_dir=run.path, resume=resume, overwrite=not resume, device=spec.device,
                   train_split=train_split, val_split=val_split, progress=progress, log=log)
    if result.interrupted:
        message = f"training stopped at step {result.global_step}; run the pipeline again to resume"
        if result.stopped_by is not None:
            raise StageStopped(message, result.stopped_by)
        raise PipelineError(message)


def _evaluate(spec: PipelineSpec, records: StageRecords, forced: set[str],
              log: Callable[[str], None]) -> dict[str, Any]:
    from matching.retrieval.evaluate import evaluate_checkpoint, write_metrics
    from matching.training.rundir import RunDirectory

    settings = spec.evaluate_settings()
    best = RunDirectory(spec.run_dir).best
    record = StageRecords.make(dataclasses.asdict(settings), {"model": _file(best), "captions": _file(spec.captions),
                                                              "features": _features(spec.features)})
    if "evaluate" not in forced and spec.metrics_path.exists() and records.matches("evaluate", record):
        log(f"evaluate: up to date ({spec.metrics_path})")
        return json.loads(spec.metrics_path.read_text(encoding="utf-8"))["results"]
    outcome = evaluate_checkpoint(best, spec.features, spec.captions, settings=settings, device=spec.device)
    write_metrics(spec.metrics_path, outcome, checkpoint=str(best), features=str(spec.features),
                  captions=str(spec.captions))
    records.save("evaluate", record)
    log(f"evaluate: {len(outcome.image_ids)} {settings.split} images → {spec.metrics_path}")
    return outcome.results
