"""`tshsr-pipe run`: extract → vocab → train → evaluate, each stage skipped when its outputs are
complete and newer than its inputs, and resumable after a crash at any stage.

A pipeline is described by a YAML file (or the same fields as flags)::

    workdir: work/coco              # where vocab.json, runs/ and metrics.json go
    images: data/coco/images        # optional: raw images to extract (else `features` must exist)
    features: work/coco/features    # feature directory (written by the extract stage)
    captions: data/dataset_coco.json
    name: tshsr                     # run name under workdir/runs
    device: cuda
    extract: {weights: data/faster_rcnn_from_caffe_attr.pkl}   # options of `tshsr-pipe extract`
    vocab: {threshold: 4}
    model: {reasoning_steps: 3}     # any ModelConfig field
    train: {epochs: 20}             # any TrainConfig field; `preset: coco` and `variant: hsr` too
    evaluate: {split: test, protocol: all}
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipelines.errors import PipelineError

STAGES = ("extract", "vocab", "train", "evaluate")


@dataclass
class PipelineSpec:
    workdir: Path
    captions: Path
    features: Path
    images: Path | None = None
    name: str = "run"
    device: str = "cpu"
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
        return cls.from_dict(payload, base, **overrides)

    @classmethod
    def from_dict(cls, payload: dict[str, Any], base: Path = Path("."), **overrides: Any) -> PipelineSpec:
        payload = {**payload, **{k: v for k, v in overrides.items() if v is not None}}
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(payload) - known
        if unknown:
            raise PipelineError(f"unknown pipeline field(s): {', '.join(sorted(unknown))}; known: "
                                f"{', '.join(sorted(known))}")
        for required in ("captions",):
            if not payload.get(required):
                raise PipelineError(f"the pipeline needs '{required}'")
        workdir = base / payload.get("workdir", "tshsr-work")

        def resolve(value: Any) -> Path | None:
            return None if value in (None, "") else (base / str(value))

        features = resolve(payload.get("features")) or workdir / "features"
        for section in ("extract", "vocab", "model", "train", "evaluate"):
            if not isinstance(payload.get(section, {}), dict):
                raise PipelineError(f"pipeline field '{section}' must be a mapping")
        return cls(workdir=workdir, captions=resolve(payload["captions"]), features=features,  # type: ignore[arg-type]
                   images=resolve(payload.get("images")), name=str(payload.get("name", "run")),
                   device=str(payload.get("device", "cpu")), extract=dict(payload.get("extract", {})),
                   vocab=dict(payload.get("vocab", {})), model=dict(payload.get("model", {})),
                   train=dict(payload.get("train", {})), evaluate=dict(payload.get("evaluate", {})))


def _newest(path: Path) -> float:
    """The newest modification time of a file, or of any file under a directory."""
    if path.is_file():
        return path.stat().st_mtime
    times = [p.stat().st_mtime for p in path.rglob("*") if p.is_file()]
    return max(times, default=path.stat().st_mtime if path.exists() else 0.0)


def _fresh(output: Path, *inputs: Path | None) -> bool:
    """Output exists and is at least as new as every input."""
    if not output.exists():
        return False
    made = output.stat().st_mtime
    return all(made >= _newest(p) for p in inputs if p is not None and p.exists())


def train_finished(run_dir: Path) -> bool:
    """The run's checkpoint_last.pt records every epoch done."""
    from matching import checkpoint

    last = run_dir / "checkpoint_last.pt"
    if not last.exists() or not (run_dir / "model_best.pt").exists():
        return False
    state = checkpoint.load_payload(last)
    return int(state["progress"]["epoch"]) >= int(state["config"]["train"]["epochs"])


def run_pipeline(spec: PipelineSpec, *, force: tuple[str, ...] = (), log: Callable[[str], None] = print,
                 progress: bool = True) -> dict[str, Any]:
    """Run the stages in order; returns the evaluation results ({protocol: metrics})."""
    from matching.config import resolve_config

    for stage in force:
        if stage not in STAGES:
            raise PipelineError(f"unknown stage {stage!r}; stages: {', '.join(STAGES)}")
    forced = set(force)
    # Forcing a stage forces the ones after it: their inputs change.
    for index, stage in enumerate(STAGES):
        if stage in forced:
            forced.update(STAGES[index:])
    spec.workdir.mkdir(parents=True, exist_ok=True)

    # 1. extract
    if spec.images is not None:
        from pipelines.extract_stage import extract_stage

        if "extract" in forced and spec.features.exists():
            log(f"extract: --force: re-extracting into {spec.features}")
        extract_stage(spec.images, spec.features, dict(spec.extract), device=spec.device, log=log,
                      progress=progress, force="extract" in forced)
    elif not (spec.features / "manifest.json").exists():
        raise PipelineError(f"{spec.features}: no features and no 'images' to extract them from")
    else:
        log(f"extract: skipped (features given: {spec.features})")

    # 2. vocab
    manifest = spec.features / "manifest.json"
    if "vocab" not in forced and _fresh(spec.vocab_path, spec.captions):
        log(f"vocab: up to date ({spec.vocab_path})")
    else:
        from matching.captions import read_captions
        from matching.text import Vocabulary

        threshold = int(spec.vocab.get("threshold", 4))
        splits = spec.vocab.get("splits", ["train", "val"])
        built = Vocabulary.build((c.text for c in read_captions(spec.captions, splits)), threshold)
        built.save(spec.vocab_path)
        log(f"vocab: {len(built)} words (threshold {threshold}) → {spec.vocab_path}")

    # 3. train
    from matching.training import train

    run_dir = spec.run_dir
    stale = not _fresh(run_dir / "model_best.pt", spec.vocab_path, manifest, spec.captions)
    if "train" in forced or (stale and (run_dir / "checkpoint_last.pt").exists() and train_finished(run_dir)):
        if (run_dir / "checkpoint_last.pt").exists():
            log(f"train: {'--force' if 'train' in forced else 'inputs changed since the run'}: "
                f"starting {run_dir} again")
            _clear_run(run_dir)
    if train_finished(run_dir):
        log(f"train: up to date ({run_dir / 'model_best.pt'})")
    else:
        train_options = dict(spec.train)
        preset, variant = train_options.pop("preset", None), train_options.pop("variant", None)
        config = resolve_config(preset=preset, variant=variant, overrides={
            **{f"model.{k}": v for k, v in spec.model.items()}, **{f"train.{k}": v for k, v in train_options.items()}})
        resume = (run_dir / "checkpoint_last.pt").exists()
        log(f"train: {'resuming' if resume else 'training'} {run_dir}")
        result = train(config, features=spec.features, captions=spec.captions, vocab_path=spec.vocab_path,
                       run_dir=run_dir, resume=resume, device=spec.device, progress=progress, log=log)
        if result.interrupted:
            raise PipelineError(f"training stopped at step {result.global_step}; run the pipeline again to resume")

    # 4. evaluate
    if "evaluate" not in forced and _fresh(spec.metrics_path, run_dir / "model_best.pt", spec.captions, manifest):
        log(f"evaluate: up to date ({spec.metrics_path})")
        return json.loads(spec.metrics_path.read_text(encoding="utf-8"))["results"]
    from matching.inference import evaluate_checkpoint

    split = spec.evaluate.get("split", "test")
    outcome = evaluate_checkpoint(run_dir / "model_best.pt", spec.features, spec.captions, split=split,
                                  protocol=spec.evaluate.get("protocol", "all"), device=spec.device,
                                  captions_per_image=int(spec.evaluate.get("captions_per_image", 5)))
    tmp = spec.metrics_path.with_name(f".{spec.metrics_path.name}.tmp")
    tmp.write_text(json.dumps({"split": split, "num_images": len(outcome.image_ids),
                               "results": outcome.results}, indent=2), encoding="utf-8")
    tmp.replace(spec.metrics_path)
    log(f"evaluate: {len(outcome.image_ids)} {split} images → {spec.metrics_path}")
    return outcome.results


def _clear_run(run_dir: Path) -> None:
    for path in run_dir.iterdir():
        if path.is_file():
            path.unlink()
