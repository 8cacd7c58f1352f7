"""`tshsr-pipe`: extract → vocab → train → evaluate → search, one command each.

Every command parses its options, calls one library function and reports. Defaults and
choices come from the library's dataclasses and constants, so `--help` says what the code
does. Heavy imports (torch, the model) happen inside the commands so that
``tshsr-pipe --help`` answers at once.
"""

from __future__ import annotations

from pathlib import Path

import click

from extract.runtime import DEVICE_CHOICES
from matching.config import (
    FLAT_UP_TO,
    GALLERY_DTYPES,
    INDEX_KINDS,
    PHRASE_CLEANINGS,
    PRECISIONS,
    PRESETS,
    SEARCH_SHORTLIST,
    VARIANTS,
    EvaluationSettings,
    ModelConfig,
    MultiQueryConfig,
    TrainConfig,
)
from matching.importers.precomp import SPLITS as PRECOMP_SPLITS
from matching.retrieval.metrics import PROTOCOLS
from matching.tasks import task_names
from pipelines.errors import UserError, user_errors

EXISTING_FILE = click.Path(exists=True, dir_okay=False, path_type=Path)
EXISTING_DIR = click.Path(exists=True, file_okay=False, path_type=Path)
MODEL, TRAIN, EVALUATE = ModelConfig(), TrainConfig(), EvaluationSettings()


def device_option(command):  # noqa: ANN001, ANN201 - a click decorator
    return click.option("--device", default="auto", show_default=True,
                        help=f"{DEVICE_CHOICES}; auto takes the GPU when there is one.")(command)


def precision_option(command):  # noqa: ANN001, ANN201 - a click decorator (evaluate, search and serve)
    return click.option("--precision", type=click.Choice(PRECISIONS), default=EVALUATE.precision, show_default=True,
                        help="The scorers' arithmetic: float32, bf16 (bfloat16 matrix products, on a GPU or a CPU "
                             "with bfloat16 instructions; faster, rankings measured in docs/evaluation.md) or "
                             "tf32 (CUDA tensor cores).")(command)


def shortlist_option(command):  # noqa: ANN001, ANN201 - a click decorator (search and serve)
    return click.option("--shortlist", type=click.IntRange(min=0), metavar="K",
                        help="Two-stage search: the full model re-ranks only the K images nearest to the "
                             "query by first-stage cosine; 0 scores every image [default: "
                             f"{SEARCH_SHORTLIST} for a model with a trained first stage, else 0].")(command)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="tshsr-pipe")
def cli() -> None:
    """Image-text retrieval with region features and the TSHSR matching model.

    \b
    Typical flow:
      tshsr-pipe extract images/ --out features/ --weights faster_rcnn_attr.pkl
      tshsr-pipe vocab captions.json --out vocab.json
      tshsr-pipe train --features features/ --captions captions.json --vocab vocab.json
      tshsr-pipe evaluate --checkpoint runs/NAME/model_best.pt --features features/ --captions captions.json
    """


@cli.command()
@click.option("--checkpoint", "--ensemble", "checkpoints", type=EXISTING_FILE, multiple=True,
              help="A tshsr-pipe checkpoint (from train or import-sgraf); repeat it to ensemble several "
                   "(their score matrices are averaged), e.g. HMRN's i2t and t2i models.")
@click.option("--sims", "sims_files", type=EXISTING_FILE, multiple=True,
              help="A score matrix saved by --save-sims for the same split, averaged with the others "
                   "(e.g. SGRAF's SAF+SGR ensemble); repeat for several.")
@click.option("--features", type=EXISTING_DIR, required=True, help="Feature directory (shards + manifest.json).")
@click.option("--captions", type=EXISTING_FILE, required=True,
              help="Captions: Karpathy split JSON, TSV (image_id<TAB>caption[<TAB>split]) or JSONL; for a "
                   "multi-query checkpoint the multi-query JSONL (per-round metrics).")
@click.option("--split", default=EVALUATE.split, show_default=True,
              help="Split to evaluate; captions without a split always count.")
@click.option("--protocol", type=click.Choice(PROTOCOLS), default=EVALUATE.protocol, show_default=True,
              help="coco1k: mean of 5 folds of 1000 images; coco5k: all 5000; f30k: 1000 images; "
                   "full: all images of the split; all: every protocol the split fits (a multi-query split: "
                   "full); hmrn: HMRN's evaluation script for multi-query models (its first 9,800 of 9,896 test "
                   "images, rounded w_r, its rank conventions; docs/multi-query.md).")
@click.option("--captions-per-image", default=EVALUATE.captions_per_image, show_default=True,
              type=click.IntRange(min=1), help="Captions per image used for evaluation (the first ones of each image).")
@click.option("--vocab", "vocab_path", type=EXISTING_FILE,
              help="Check that this vocabulary is the checkpoint's own.")
@device_option
@click.option("--batch-size", default=EVALUATE.batch_size, show_default=True, type=click.IntRange(min=1),
              help="Images or captions per encoder batch.")
@click.option("--memory-budget", type=click.FloatRange(min=0.01),
              help="GiB of working memory for scoring blocks [default: half the free GPU memory, 2 GiB on CPU].")
@click.option("--shortlist", type=click.IntRange(min=1), metavar="K",
              help="Two-stage retrieval: each caption re-ranks only its K best images by first-stage cosine "
                   "with the full model, each image its captions-per-image × K best captions (a fraction of "
                   "the pairs; prints how often the ground truth was in the shortlist).")
@click.option("--shortlist-index", type=click.Choice(INDEX_KINDS), default=EVALUATE.shortlist_index, show_default=True,
              help="faiss index of the first stage: flat (exact), ivf or hnsw (approximate, for huge galleries).")
@precision_option
@click.option("--save-sims", type=click.Path(dir_okay=False, path_type=Path),
              help="Write the (images × captions) score matrix as .npy.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path),
              help="Write the metrics as JSON.")
@user_errors
def evaluate(checkpoints: tuple[Path, ...], sims_files: tuple[Path, ...], features: Path, captions: Path, split: str,
             protocol: str, captions_per_image: int, vocab_path: Path | None, device: str, batch_size: int,
             memory_budget: float | None, shortlist: int | None, shortlist_index: str, precision: str,
             save_sims: Path | None, json_path: Path | None) -> None:
    """Retrieval metrics of a checkpoint (or an ensemble) on a split.

    Matching models: R@1/5/10, medr, meanr and rsum both ways under the standard protocols
    (every pair scored, or with --shortlist only the shortlisted ones). Multi-query models:
    R@1/5/10 and mean rank of the target image after each round, on every image of the split
    (--protocol full) or as HMRN's evaluation script computes them (--protocol hmrn); the table
    says which. Long runs print the pairs scored, the rate and the ETA.
    """
    from extract.runtime import Launch
    from matching.retrieval.evaluate import evaluate_checkpoint, write_metrics, write_sims

    if not checkpoints and not sims_files:
        raise UserError("give --checkpoint (repeat it for an ensemble) or --sims")
    if shortlist and save_sims:
        raise UserError("--save-sims needs every pair scored; leave out --shortlist to save the score matrix")
    settings = EvaluationSettings(split=split or None, protocol=protocol, captions_per_image=captions_per_image,
                                  batch_size=batch_size, memory_budget=memory_budget, shortlist=shortlist,
                                  shortlist_index=shortlist_index, precision=precision)
    outcome = evaluate_checkpoint(checkpoints, features, captions, settings=settings, sims_files=sims_files,
                                  vocab_path=vocab_path, device=device, progress=True, log=click.echo)
    if not Launch.from_env().is_main:  # under torchrun, rank 0 reports
        return
    sources = len(outcome.sources)
    click.echo(f"{len(outcome.image_ids)} images, {outcome.num_captions} {outcome.unit} ({split} split)"
               + (f"; the mean of {sources} score matrices" if sources > 1 else ""))
    click.echo(outcome.table())
    if save_sims:
        click.echo(f"scores written to {write_sims(save_sims, outcome.sims)}")
    if json_path:
        write_metrics(json_path, outcome, features=str(features), captions=str(captions))
        click.echo(f"metrics written to {json_path}")


@cli.command("import-sgraf")
@click.argument("sgraf_checkpoint", type=EXISTING_FILE)
@click.option("--vocab", "vocab_path", type=EXISTING_FILE, required=True,
              help="The SGRAF vocabulary JSON the model was trained with (e.g. coco_precomp_vocab.json).")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="Where to write the tshsr-pipe checkpoint.")
@user_errors
def import_sgraf(sgraf_checkpoint: Path, vocab_path: Path, out: Path) -> None:
    """Convert a published SGRAF SGR checkpoint (SGRAF_CHECKPOINT: model_best.pth.tar) into a tshsr-pipe checkpoint.

    The file is read with a restricted unpickler: only tensors, plain data and
    argparse.Namespace are admitted, so a tampered file cannot run code.
    """
    from matching.importers.sgraf import import_sgraf as convert

    path, config = convert(sgraf_checkpoint, vocab_path, out)
    m = config.model
    click.echo(f"wrote {path}: SGR, M={m.reasoning_steps}, d={m.embed_size}, m={m.sim_dim}, "
               f"vocabulary {m.vocab_size} words, {m.num_regions} regions")


@cli.command("import-hmrn")
@click.argument("hmrn_checkpoint", type=EXISTING_FILE)
@click.option("--vocab", "vocab_path", type=EXISTING_FILE, required=True,
              help="The vocabulary the model was trained with: DrillDown's vg_vocab_14284.pkl (read with a "
                   "restricted unpickler) or the vocab.json `tshsr-pipe vocab --from-drilldown` made of it.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="Where to write the tshsr-pipe checkpoint (task multi-query).")
@user_errors
def import_hmrn(hmrn_checkpoint: Path, vocab_path: Path, out: Path) -> None:
    """Convert a checkpoint of HMRN's own train.py (HMRN_CHECKPOINT: model_best.pth.tar, I-T or T-I) into a
    tshsr-pipe checkpoint to evaluate, search or serve.

    The file is read with a restricted unpickler: only tensors, plain data and
    argparse.Namespace are admitted, so a tampered file cannot run code.
    """
    from matching.importers.hmrn import import_hmrn as convert

    path, config = convert(hmrn_checkpoint, vocab_path, out)
    m = config.model
    click.echo(f"wrote {path}: HMRN {m.direction}, d={m.embed_size}, m={m.sim_dim}, λ_i2t={m.lambda_i2t:g}, "
               f"λ_t2i={m.lambda_t2i:g}, α={m.local_weight:g}, β={m.reasoning_weight:g}, τ={m.tau:g}, "
               f"vocabulary {m.vocab_size} words, {m.num_regions} regions")


@cli.command()
@click.argument("captions", type=EXISTING_FILE, required=False)
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="Where to write vocab.json (SGRAF's layout).")
@click.option("--threshold", default=4, show_default=True, type=click.IntRange(min=1),
              help="Keep words occurring at least this many times.")
@click.option("--split", "splits", multiple=True,
              help="Splits whose texts are counted (repeat the option for several) [default: train and val "
                   "for captions, train for multi-query JSONL].")
@click.option("--from-drilldown", "drilldown", type=EXISTING_FILE,
              help="Convert DrillDown's pickled vocabulary (data/caches/vg_vocab_14284.pkl, HMRN's) instead of "
                   "counting words: its word indices are kept; read with a restricted unpickler.")
@user_errors
def vocab(captions: Path | None, out: Path, threshold: int, splits: tuple[str, ...], drilldown: Path | None) -> None:
    """Build the vocabulary from the train (and val) captions of CAPTIONS, or from the training
    queries of a multi-query JSONL file; or convert DrillDown's with --from-drilldown."""
    if drilldown is not None:
        given_threshold = click.get_current_context().get_parameter_source("threshold").name != "DEFAULT"
        if captions is not None or splits or given_threshold:
            raise UserError("--from-drilldown converts DrillDown's vocabulary as it is: give no CAPTIONS, "
                            "--split or --threshold with it")
        from matching.importers.drilldown import import_drilldown_vocab

        built = import_drilldown_vocab(drilldown, out)
        click.echo(f"{len(built)} words (DrillDown's {drilldown.name}, its word indices kept) written to {out}")
        return
    if captions is None:
        raise UserError("give CAPTIONS (a caption or multi-query file) or --from-drilldown VOCAB.pkl")
    from matching.data.vocabulary import build_vocabulary

    built, counted = build_vocabulary(captions, out, splits=splits or None, threshold=threshold)
    click.echo(f"{len(built)} words (threshold {threshold}, {counted} texts) written to {out}")


@cli.command("import-precomp")
@click.argument("data_dir", type=EXISTING_DIR)
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Feature directory to write (shards, manifest.json and captions.jsonl).")
@click.option("--split", "splits", multiple=True, type=click.Choice(PRECOMP_SPLITS),
              help="Splits to import (repeat for several) [default: every {split}_ims.npy found].")
@click.option("--captions-per-image", default=5, show_default=True, type=click.IntRange(min=1),
              help="Captions of each image in {split}_caps.txt (consecutive lines).")
@click.option("--shard-size", default=1000, show_default=True, type=click.IntRange(min=1),
              help="Images per shard.")
@click.option("--float32", "float32", is_flag=True, help="Keep float32 features (default float16).")
@user_errors
def import_precomp(data_dir: Path, out: Path, splits: tuple[str, ...], captions_per_image: int,
                   shard_size: int, float32: bool) -> None:
    """Convert SCAN/SGRAF precomputed features (DATA_DIR/{split}_ims.npy + {split}_caps.txt) into shards.

    The .npy files are memory-mapped and copied shard by shard, so large
    splits convert without being loaded whole. A rerun skips images already
    converted. The captions are written to OUT/captions.jsonl with their
    split (dev becomes val; use --split testall with --protocol coco1k/coco5k
    for the MSCOCO 5K test set).
    """
    from extract.runtime import progress_bar
    from matching.importers.precomp import CAPTIONS_FILE
    from matching.importers.precomp import import_precomp as convert

    with progress_bar(None, "importing", "img") as bar:
        counts = convert(data_dir, out, splits=splits or None, captions_per_image=captions_per_image,
                         shard_size=shard_size, dtype="float32" if float32 else "float16", on_images=bar.update)
    for split, n in counts.items():
        click.echo(f"{split}: {n} images")
    click.echo(f"features in {out}, captions in {out / CAPTIONS_FILE}")


@cli.command("import-vg")
@click.argument("regions", type=click.Path(exists=True, path_type=Path))
@click.option("--splits-dir", type=EXISTING_DIR, required=True,
              help="The directory of DrillDown's split lists vg_train.txt, vg_val.txt, vg_test.txt.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="The multi-query JSONL file to write (image_id, split, queries).")
@click.option("--max-turns", default=MultiQueryConfig().max_turns, show_default=True, type=click.IntRange(min=1),
              help="Images with fewer distinct region phrases are dropped (HMRN: 10).")
@click.option("--cleaning", type=click.Choice(PHRASE_CLEANINGS), default=PHRASE_CLEANINGS[0], show_default=True,
              help="strict: phrases lower-cased and stripped, blank ones dropped; hmrn: lower-cased only, blanks "
                   "kept, as HMRN's data loader does (to reproduce its table).")
@user_errors
def import_vg(regions: Path, splits_dir: Path, out: Path, max_turns: int, cleaning: str) -> None:
    """Visual Genome region descriptions → multi-query JSONL, with DrillDown's split (HMRN's data).

    REGIONS is DrillDown's rg_jsons/ directory (one region-graph JSON per image) or Visual
    Genome's region_descriptions.json. Phrases are cleaned (--cleaning), exact duplicates
    dropped, and images with fewer than --max-turns phrases left out; the counts are printed,
    with what the other cleaning would have kept, dropped and changed.
    """
    from matching.data.queries import import_vg_queries

    counts = import_vg_queries(regions, splits_dir, out, max_turns=max_turns, cleaning=cleaning)
    click.echo(counts.summary())
    click.echo(f"query sets written to {out}")


@cli.command("import-drilldown")
@click.argument("region_dir", type=EXISTING_DIR)
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Feature directory to write (shards + manifest.json); a rerun continues.")
@click.option("--queries", type=EXISTING_FILE, help="Import only the images of this multi-query JSONL file.")
@click.option("--max-boxes", default=ModelConfig().num_regions, show_default=True, type=click.IntRange(min=1),
              help="Regions per image in the shards (DrillDown: 36).")
@click.option("--shard-size", default=1000, show_default=True, type=click.IntRange(min=1), help="Images per shard.")
@click.option("--float32", "float32", is_flag=True,
              help="Keep DrillDown's float32 values, which HMRN computes from (default float16: half the disk, "
                   "ranks may move; docs/multi-query.md, \"Float16 shards\").")
@user_errors
def import_drilldown(region_dir: Path, out: Path, queries: Path | None, max_boxes: int, shard_size: int,
                     float32: bool) -> None:
    """DrillDown's region_36_final feature pickles (REGION_DIR) → feature shards.

    The pickles are read with a restricted unpickler that admits only numpy arrays and plain
    containers, so a tampered file cannot run code.
    """
    from extract.drilldown import import_drilldown_features
    from extract.runtime import progress_bar
    from matching.data.queries import read_query_sets

    wanted = [item.image_id for item in read_query_sets(queries)] if queries else None
    with progress_bar(None, "importing", "img") as bar:
        done = import_drilldown_features(region_dir, out, image_ids=wanted, max_boxes=max_boxes,
                                         shard_size=shard_size, dtype="float32" if float32 else "float16",
                                         on_images=bar.update)
    click.echo(f"{done.written} images written, {done.skipped} already there; {done.max_boxes} × "
               f"{done.feature_dim} features in {out}")


@cli.command()
@click.option("--task", type=click.Choice(task_names()),
              help="matching: one caption ↔ one image (TSHSR, SGR); multi-query: several region queries given in "
                   "rounds → one image (HMRN, with its recipe as defaults) [default: matching; a resumed run "
                   "keeps its own].")
@click.option("--features", type=EXISTING_DIR, required=True, help="Feature directory (shards + manifest.json).")
@click.option("--captions", type=EXISTING_FILE, required=True,
              help="Captions with their splits: Karpathy JSON, TSV or JSONL; for --task multi-query the "
                   "multi-query JSONL (image_id, split, queries).")
@click.option("--vocab", "vocab_path", type=EXISTING_FILE, required=True, help="vocab.json from `tshsr-pipe vocab`.")
@click.option("--name", help="Run name: the run goes to RUNS/NAME [default: the variant and the time].")
@click.option("--runs", "runs_dir", default="runs", show_default=True, type=click.Path(file_okay=False, path_type=Path),
              help="Directory holding the runs.")
@click.option("--resume", is_flag=True,
              help="Continue the run RUNS/NAME where it stopped, with its saved config; flags may only "
                   "change what a resume allows (e.g. more --epochs), anything else is refused.")
@click.option("--overwrite", is_flag=True, help="Delete the run already in RUNS/NAME and start again.")
@click.option("--init-from", type=EXISTING_FILE,
              help="Start from this checkpoint's model config and weights (fine-tuning); a new run.")
@click.option("--config", "config_file", type=EXISTING_FILE, help="YAML file with model: and train: sections.")
@click.option("--preset", type=click.Choice(list(PRESETS)),
              help="A published schedule: " + "; ".join(
                  f"{name} = {values['epochs']} epochs, decay at {values['lr_decay_epoch']}"
                  for name, values in PRESETS.items()) + " (hmrn: lr 4e-4, the multi-query default).")
@click.option("--variant", type=click.Choice(list(VARIANTS)),
              help="Model of the paper's tables [default: tshsr]; see README 'Variants'.")
@click.option("--epochs", type=click.IntRange(min=1), help=f"[default: {TRAIN.epochs}]")
@click.option("--batch-size", type=click.IntRange(min=2), help=f"[default: {TRAIN.batch_size}]")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True),
              help=f"Adam learning rate [default: {TRAIN.learning_rate:g}].")
@click.option("--embed-size", type=click.IntRange(min=1),
              help=f"d, the joint embedding size [default: {MODEL.embed_size}].")
@click.option("--sim-dim", type=click.IntRange(min=1),
              help=f"m, the similarity vector size [default: {MODEL.sim_dim}].")
@click.option("--word-dim", type=click.IntRange(min=1), help=f"Word embedding size [default: {MODEL.word_dim}].")
@click.option("--steps", type=click.IntRange(min=0),
              help=f"M, the number of reasoning layers [default: {MODEL.reasoning_steps}].")
@click.option("--warmup-epochs", type=click.IntRange(min=0),
              help="Epochs summing the hinge over all negatives before the hardest-negative loss; "
                   f"1 or more keeps small datasets from collapsing [default: {TRAIN.warmup_epochs}].")
@click.option("--global-loss-weight", type=click.FloatRange(min=0),
              help="Add the same hinge on the model's own global vectors' cosines cos(v̄, t̄) at this weight "
                   "(0 = the paper's loss alone; above 0 it shares the encoders and can cost the paper's model "
                   "recall; the shortlist has its own head, model.first_stage_dim) "
                   f"[default: {TRAIN.global_loss_weight:g}].")
@click.option("--length-buckets", is_flag=True, default=None,
              help="Batches of captions of similar length (less padding; the paper shuffles uniformly).")
@click.option("--seed", type=int, help=f"[default: {TRAIN.seed}]")
@click.option("--workers", type=click.IntRange(min=0), help=f"DataLoader worker processes [default: {TRAIN.workers}].")
@click.option("--log-every", type=click.IntRange(min=0),
              help=f"Steps between log lines when there is no progress bar (batch jobs) [default: {TRAIN.log_every}].")
@click.option("--in-memory", is_flag=True, default=None, help="Keep all region features in RAM.")
@click.option("--mixed-precision", is_flag=True, default=None, help="bfloat16 autocast on GPU.")
@click.option("--tf32", is_flag=True, default=None, help="Allow TF32 matmuls on GPU.")
@click.option("--set", "sets", multiple=True, metavar="SECTION.FIELD=VALUE",
              help="Any config field, e.g. --set model.lambda_i2t=4 --set train.lr_decay_epoch=15.")
@device_option
@click.option("--train-split", default="train", show_default=True, help="Split whose captions (or query sets) train.")
@click.option("--val-split", default="val", show_default=True, help="Split validated after each epoch ('' = none).")
@click.option("--max-steps", type=click.IntRange(min=1), help="Stop after this many steps, saving a checkpoint.")
@user_errors
def train(task: str | None, features: Path, captions: Path, vocab_path: Path, name: str | None, runs_dir: Path,
          resume: bool,
          overwrite: bool, init_from: Path | None, config_file: Path | None, preset: str | None, variant: str | None,
          epochs: int | None, batch_size: int | None, lr: float | None, embed_size: int | None, sim_dim: int | None,
          word_dim: int | None, steps: int | None, warmup_epochs: int | None, global_loss_weight: float | None,
          length_buckets: bool | None, seed: int | None, workers: int | None, log_every: int | None,
          in_memory: bool | None, mixed_precision: bool | None, tf32: bool | None, sets: tuple[str, ...], device: str,
          train_split: str, val_split: str, max_steps: int | None) -> None:
    """Train a matching model: FEATURES + CAPTIONS + VOCAB → RUNS/NAME.

    The paper's recipe and loss are the default (Adam 2e-4, batch 128, gradient clipping 2,
    hardest negatives, margin 0.2). Beside the model, a small first-stage head learns the
    shortlist's vectors for `evaluate/search/serve --shortlist` from detached inputs, under its own
    loss: it changes nothing the paper's model learns. The run directory gets config.yaml,
    checkpoint_last.pt (resume point, also written every 500 steps and on
    Ctrl-C), model_best.pt (best validation rsum), metrics.csv, train.log and
    TensorBoard events. Stopped by Ctrl-C or SIGTERM, it saves and exits 130 or 143.
    """
    from extract.runtime import exit_code
    from matching.training.loop import train_from_choices

    flags = {"epochs": epochs, "batch_size": batch_size, "lr": lr, "embed_size": embed_size, "sim_dim": sim_dim,
             "word_dim": word_dim, "steps": steps, "warmup_epochs": warmup_epochs,
             "global_loss_weight": global_loss_weight, "length_buckets": length_buckets, "seed": seed,
             "workers": workers, "log_every": log_every, "in_memory": in_memory,
             "mixed_precision": mixed_precision, "tf32": tf32}
    result = train_from_choices(features=features, captions=captions, vocab_path=vocab_path, runs_dir=runs_dir,
                                name=name, task=task, preset=preset, config_file=config_file, variant=variant,
                                flags=flags, sets=sets, resume=resume, overwrite=overwrite, init_from=init_from,
                                device=device, train_split=train_split, val_split=val_split or None,
                                max_steps=max_steps, log=click.echo)
    if result.stopped_by is not None:
        raise SystemExit(exit_code(result.stopped_by))


@cli.command()
@click.argument("queries", nargs=-1)
@click.option("--checkpoint", "checkpoint_path", type=EXISTING_FILE, required=True, help="A tshsr-pipe checkpoint.")
@click.option("--features", type=EXISTING_DIR, required=True, help="The gallery's feature directory.")
@click.option("-k", "top_k", default=10, show_default=True, type=click.IntRange(min=1), help="How many results.")
@click.option("--image", "image_id", help="Rank captions for this image id instead of images for a text.")
@click.option("--captions", type=EXISTING_FILE,
              help="Caption gallery for --image (Karpathy JSON, TSV, JSONL); also limits a text search "
                   "to the images of --split.")
@click.option("--split", help="Only this split of --captions.")
@click.option("--images", "images_dir", type=EXISTING_DIR,
              help="Directory of the image files (as extracted), to show them in --html.")
@click.option("--html", "html_path", type=click.Path(dir_okay=False, path_type=Path),
              help="Write a page with the results and the attended boxes.")
@click.option("--index", "index_path", type=click.Path(path_type=Path),
              help="Encoded gallery directory: the gallery encoded once by the model, read row by row from the "
                   "disk (built here on first use; `tshsr-pipe index` builds one ahead, under torchrun too).")
@click.option("--rebuild-index", is_flag=True, help="Encode the gallery again into --index.")
@shortlist_option
@precision_option
@device_option
@user_errors
def search(queries: tuple[str, ...], checkpoint_path: Path, features: Path, top_k: int, image_id: str | None,
           captions: Path | None, split: str | None, images_dir: Path | None, html_path: Path | None,
           index_path: Path | None, rebuild_index: bool, shortlist: int | None, precision: str, device: str) -> None:
    """Rank the gallery's images for a text QUERY, or captions for an --image.

    A multi-query checkpoint takes several QUERIES, given in rounds: the images are ranked
    after the last one, and each hit shows its rank after every round.

    \b
      tshsr-pipe search --checkpoint runs/coco/model_best.pt --features features/ "a man riding a horse"
      tshsr-pipe search --checkpoint ... --features ... --image COCO_val2014_000000391895.jpg --captions c.json
      tshsr-pipe search --checkpoint runs/hmrn/model_best.pt --features vg/ "a red car" "a man with an umbrella"
    """
    from matching.retrieval.search import search as run_search
    from pipelines.search_page import write_search_page

    found = run_search(checkpoint_path, features, query=list(queries), image_id=image_id, captions=captions,
                       split=split, k=top_k, index_path=index_path, rebuild_index=rebuild_index,
                       with_regions=html_path is not None, device=device, shortlist=shortlist, precision=precision)
    if found.index_built:
        click.echo(f"index of {found.gallery_size} images written to {index_path}")
    if found.shortlist:
        click.echo(f"two-stage: the model re-ranked the {found.shortlist} of {found.gallery_size:,} images nearest "
                   "by first-stage cosine (--shortlist 0 scores every image)")
    if found.ignored_words:
        click.echo("note: not in the model's vocabulary, ignored: " + ", ".join(repr(w) for w in found.ignored_words))
    for hit in found.hits:
        mark = ("✓ " if hit.matches_query_image else "  ") if found.mode == "image" else ""
        moves = f"  (rank by round: {' → '.join(map(str, hit.round_ranks))})" if hit.round_ranks else ""
        click.echo(f"{hit.rank:>3}. {hit.score:.4f}  {mark}{hit.item}{moves}")
    if html_path:
        write_search_page(html_path, query=found.query, hits=found.hits, mode=found.mode, images_dir=images_dir,
                          checkpoint=str(checkpoint_path))
        click.echo(f"page written to {html_path}")


@cli.command("index")
@click.option("--checkpoint", "checkpoint_path", type=EXISTING_FILE, required=True, help="A tshsr-pipe checkpoint.")
@click.option("--features", type=EXISTING_DIR, required=True, help="The gallery's feature directory.")
@click.option("--out", type=click.Path(path_type=Path), required=True,
              help="The encoded gallery directory to write (replaced atomically when it exists).")
@click.option("--captions", type=EXISTING_FILE, help="With --split: the gallery is that split's images.")
@click.option("--split", help="Only the images of this split of --captions.")
@click.option("--dtype", type=click.Choice(GALLERY_DTYPES), default=GALLERY_DTYPES[0], show_default=True,
              help="How the region embeddings are stored: float16 halves the disk and the reads (rankings barely "
                   "move, docs/search.md), float32 is exactly what the model computes.")
@click.option("--index-kind", type=click.Choice(("auto", *INDEX_KINDS)), default="auto", show_default=True,
              help=f"The first stage's faiss index: auto is flat (exact) up to {FLAT_UP_TO:,} images and HNSW "
                   "beyond; flat, ivf or hnsw force one.")
@click.option("--batch-size", default=EVALUATE.batch_size, show_default=True, type=click.IntRange(min=1),
              help="Images per encoder batch.")
@device_option
@user_errors
def index(checkpoint_path: Path, features: Path, out: Path, captions: Path | None, split: str | None, dtype: str,
          index_kind: str, batch_size: int, device: str) -> None:
    """Encode a gallery once for `search --index` and `serve --index`: an encoded gallery directory.

    The region embeddings are written block by block and memory-mapped when searched, so a search
    reads only the images it re-scores. Under torchrun each process encodes its share of the images
    and the first process merges the parts:

    \b
      torchrun --nproc_per_node 4 -m pipelines.cli index --checkpoint C --features F --out G --device cuda
    """
    from extract.runtime import Launch, progress_bar
    from matching.retrieval.search import index_gallery

    with progress_bar(None, "encoding", "img", enabled=Launch.from_env().is_main) as bar:
        gallery = index_gallery(checkpoint_path, features, out, captions=captions, split=split, dtype=dtype,
                                index_kind=index_kind, device=device, batch_size=batch_size, progress=bar.update)
    if Launch.from_env().is_main:
        click.echo(f"{len(gallery):,} images encoded into {out} ({gallery.meta['dtype']} regions, "
                   f"{gallery.index_kind} first-stage index)")


@cli.command()
@click.argument("run_dir", type=EXISTING_DIR)
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path),
              help="PNG to write [default: RUN_DIR/curves.png].")
@user_errors
def report(run_dir: Path, out: Path | None) -> None:
    """Plot the loss and validation recall curves of RUN_DIR and print its final table."""
    from pipelines.report import final_table, plot_curves, read_metrics

    rows = read_metrics(run_dir)
    path = plot_curves(rows, out or run_dir / "curves.png", title=run_dir.name)
    click.echo(final_table(rows))
    click.echo(f"curves written to {path}")


@cli.command("run")
@click.argument("pipeline_file", type=EXISTING_FILE, required=False)
@click.option("--workdir", type=click.Path(file_okay=False), help="Where vocab.json, runs/ and metrics go.")
@click.option("--images", type=click.Path(file_okay=False), help="Raw images to extract.")
@click.option("--features", type=click.Path(file_okay=False), help="Feature directory (read, or written by extract).")
@click.option("--captions", type=click.Path(dir_okay=False), help="Captions with their splits.")
@click.option("--name", help="Run name under WORKDIR/runs.")
@click.option("--device", help=f"{DEVICE_CHOICES} [default: auto].")
@click.option("--force", multiple=True, type=click.Choice(["extract", "vocab", "train", "evaluate"]),
              help="Run this stage (and the ones after it) even if its outputs are up to date.")
@user_errors
def run_command(pipeline_file: Path | None, workdir: str | None, images: str | None, features: str | None,
                captions: str | None, name: str | None, device: str | None, force: tuple[str, ...]) -> None:
    """Run extract → vocab → train → evaluate from a PIPELINE_FILE (YAML) and/or flags.

    A stage is skipped when its outputs exist and were made from the same settings and
    inputs; editing a section reruns that stage and the ones after it; a crash at any
    stage is resumed by running the same command again. See README "run" for the file's
    fields (extract:, vocab:, model:, train:, evaluate: sections).
    """
    from matching.retrieval.metrics import format_table
    from pipelines.run import PipelineSpec, run_pipeline

    overrides = {"workdir": workdir, "images": images, "features": features, "captions": captions, "name": name,
                 "device": device}
    if pipeline_file:
        spec = PipelineSpec.from_file(pipeline_file, **overrides)
    else:
        spec = PipelineSpec.from_dict({k: v for k, v in overrides.items() if v is not None}, Path("."))
    click.echo(format_table(run_pipeline(spec, force=force, log=click.echo)))


def _demo_choices() -> list[str]:
    from pipelines.demo import DEMOS

    return list(DEMOS)


@cli.command()
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default="tshsr-demo", show_default=True,
              help="Where the demo's data, features, model and metrics go (reused by a second run).")
@click.option("--task", type=click.Choice(_demo_choices()), default="matching", show_default=True,
              help="matching: captions ↔ images (TSHSR); multi-query: one query per object, given in rounds, "
                   "find the scene (HMRN; its features are always made directly).")
@click.option("--fast", is_flag=True, help="Make region features directly instead of rendering images and "
                                           "running the detector (seconds instead of minutes).")
@click.option("--images", "num_images", type=click.IntRange(min=30),
              help="Scenes to generate (80% train, 10% val, 10% test) [default: 300; multi-query 400].")
@click.option("--seed", default=0, show_default=True, help="Seed of the generated world and of training.")
@device_option
@user_errors
def demo(out: Path, task: str, fast: bool, num_images: int | None, seed: int, device: str) -> None:
    """The whole chain on a synthetic world of coloured shapes, with metrics beside chance level.

    Scenes of one to three coloured shapes are rendered with captions that name
    them; the images go through the real extractor (random weights: no weights are
    downloaded), then vocab, training and evaluation run as `tshsr-pipe run` would.
    With --task multi-query, scenes of four shapes are described one shape per round
    and the table shows how the rank of the right scene rises with the rounds.
    """
    import time

    from pipelines.demo import run_demo

    started = time.time()
    outcome = run_demo(out, task=task, fast=fast, images=num_images, seed=seed, device=device, log=click.echo)
    click.echo(f"\ntest set: {outcome.description}")
    click.echo(outcome.table)
    click.echo(f"done in {time.time() - started:.0f} s; everything is in {out} (try: {outcome.example})")


from pipelines.extract_cmd import extract, verify  # noqa: E402

cli.add_command(extract)
cli.add_command(verify)


@cli.command()
@click.option("--checkpoint", "checkpoint_path", type=EXISTING_FILE, required=True, help="A tshsr-pipe checkpoint.")
@click.option("--features", type=EXISTING_DIR, required=True, help="The gallery's feature directory.")
@click.option("--captions", type=EXISTING_FILE, help="Captions ranked for a clicked image; with --split, "
                                                    "the gallery is that split's images.")
@click.option("--split", help="Only this split of --captions.")
@click.option("--images", "images_dir", type=EXISTING_DIR, help="Directory of the image files, for thumbnails.")
@click.option("--index", "index_path", type=click.Path(path_type=Path),
              help="Encoded gallery directory: the gallery encoded once by the model, read row by row from the "
                   "disk (built here on first use; `tshsr-pipe index` builds one ahead, under torchrun too).")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (0.0.0.0: every one).")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(1, 65535), help="Port to listen on.")
@shortlist_option
@precision_option
@device_option
@user_errors
def serve(checkpoint_path: Path, features: Path, captions: Path | None, split: str | None, images_dir: Path | None,
          index_path: Path | None, host: str, port: int, shortlist: int | None, precision: str, device: str) -> None:
    """A search page and a JSON API over a model and its gallery, loaded once (Ctrl-C stops).

    \b
      tshsr-pipe serve --checkpoint runs/coco/model_best.pt --features features/ --images coco/images
    """
    import uvicorn

    from pipelines.serve.app import build_app

    app = build_app(checkpoint_path, features, captions=captions, images_dir=images_dir, index_path=index_path,
                    device=device, settings=EvaluationSettings(split=split, shortlist=shortlist, precision=precision))
    about = app.state.engine.info
    if about.index_built:
        click.echo(f"index of {about.gallery_size} images written to {index_path}")
    scoring = f"shortlist scoring ({about.shortlist} images re-ranked)" if about.shortlist else "exact scoring"
    click.echo(f"{about.gallery_size} images, {about.captions} captions, {scoring} in {about.precision} "
               f"on {about.device} (ready in {about.start_seconds:.1f} s)")
    click.echo(f"serving http://{host}:{port}/ (Ctrl-C stops)")
    uvicorn.run(app, host=host, port=port, log_level="warning")


def main() -> None:
    cli(prog_name="tshsr-pipe")


if __name__ == "__main__":
    main()
