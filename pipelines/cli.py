"""`tshsr-pipe`: extract → vocab → train → evaluate → search, one command each.

Every command parses its options, calls one library function and reports.
Heavy imports (torch, the model) happen inside the commands so that
``tshsr-pipe --help`` answers at once.
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from pipelines.errors import UserError, user_errors

EXISTING_FILE = click.Path(exists=True, dir_okay=False, path_type=Path)
EXISTING_DIR = click.Path(exists=True, file_okay=False, path_type=Path)


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


def _write_json(path: Path, payload: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    tmp.replace(path)


@cli.command()
@click.option("--checkpoint", "checkpoint_path", type=EXISTING_FILE, required=True,
              help="A tshsr-pipe checkpoint (from train or import-sgraf).")
@click.option("--features", type=EXISTING_DIR, required=True, help="Feature directory (shards + manifest.json).")
@click.option("--captions", type=EXISTING_FILE, required=True,
              help="Captions: Karpathy split JSON, TSV (image_id<TAB>caption[<TAB>split]) or JSONL.")
@click.option("--split", default="test", show_default=True,
              help="Split to evaluate; captions without a split always count.")
@click.option("--protocol", type=click.Choice(["all", "full", "coco1k", "coco5k", "f30k"]), default="all",
              show_default=True,
              help="coco1k: mean of 5 folds of 1000 images; coco5k: all 5000; f30k: 1000 images; "
                   "full: all images of the split; all: every protocol the split fits.")
@click.option("--captions-per-image", default=5, show_default=True, type=click.IntRange(min=1),
              help="Captions per image used for evaluation (the first ones of each image).")
@click.option("--vocab", "vocab_path", type=EXISTING_FILE,
              help="Check that this vocabulary is the checkpoint's own.")
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda or cuda:N.")
@click.option("--batch-size", default=128, show_default=True, type=click.IntRange(min=1),
              help="Images or captions per encoder batch.")
@click.option("--memory-budget", type=click.FloatRange(min=0.01),
              help="GiB of working memory for scoring blocks [default: half the free GPU memory, 2 GiB on CPU].")
@click.option("--save-sims", type=click.Path(dir_okay=False, path_type=Path),
              help="Write the (images × captions) score matrix as .npy.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path),
              help="Write the metrics as JSON.")
@user_errors
def evaluate(checkpoint_path: Path, features: Path, captions: Path, split: str, protocol: str,
             captions_per_image: int, vocab_path: Path | None, device: str, batch_size: int,
             memory_budget: float | None, save_sims: Path | None, json_path: Path | None) -> None:
    """Retrieval metrics (R@1/5/10, medr, meanr, rsum) of a checkpoint on a split."""
    import numpy as np

    from matching.evaluation import format_table
    from matching.inference import evaluate_checkpoint

    try:
        outcome = evaluate_checkpoint(
            checkpoint_path, features, captions, split=split, protocol=protocol,
            captions_per_image=captions_per_image, vocab_path=vocab_path, device=device,
            batch_size=batch_size, memory_budget=int(memory_budget * 2**30) if memory_budget else None,
            progress=True)
    except ValueError as error:  # protocol / size mismatches from the metrics
        if type(error) is ValueError:
            raise UserError(str(error)) from None
        raise
    click.echo(f"{len(outcome.image_ids)} images, {outcome.num_captions} captions ({split} split)")
    click.echo(format_table(outcome.results))
    if save_sims:
        save_sims.parent.mkdir(parents=True, exist_ok=True)
        np.save(save_sims, outcome.sims)
        click.echo(f"scores written to {save_sims}")
    if json_path:
        _write_json(json_path, {"checkpoint": str(checkpoint_path), "features": str(features),
                                "captions": str(captions), "split": split,
                                "num_images": len(outcome.image_ids), "num_captions": outcome.num_captions,
                                "results": outcome.results})
        click.echo(f"metrics written to {json_path}")


@cli.command("import-sgraf")
@click.argument("sgraf_checkpoint", type=EXISTING_FILE)
@click.option("--vocab", "vocab_path", type=EXISTING_FILE, required=True,
              help="The SGRAF vocabulary JSON the model was trained with (e.g. coco_precomp_vocab.json).")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="Where to write the tshsr-pipe checkpoint.")
@user_errors
def import_sgraf(sgraf_checkpoint: Path, vocab_path: Path, out: Path) -> None:
    """Convert a published SGRAF SGR checkpoint (model_best.pth.tar) into a tshsr-pipe checkpoint.

    The file is read with a restricted unpickler: only tensors, plain data and
    argparse.Namespace are admitted, so a tampered file cannot run code.
    """
    from matching.sgraf import import_sgraf as convert

    path, config = convert(sgraf_checkpoint, vocab_path, out)
    m = config.model
    click.echo(f"wrote {path}: SGR, M={m.reasoning_steps}, d={m.embed_size}, m={m.sim_dim}, "
               f"vocabulary {m.vocab_size} words, {m.num_regions} regions")


@cli.command()
@click.argument("captions", type=EXISTING_FILE)
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="Where to write vocab.json (SGRAF's layout).")
@click.option("--threshold", default=4, show_default=True, type=click.IntRange(min=1),
              help="Keep words occurring at least this many times.")
@click.option("--split", "splits", multiple=True, default=("train", "val"), show_default=True,
              help="Splits whose captions are counted (repeat the option for several).")
@user_errors
def vocab(captions: Path, out: Path, threshold: int, splits: tuple[str, ...]) -> None:
    """Build the vocabulary from the train (and val) captions of CAPTIONS."""
    from matching.captions import read_captions
    from matching.text import Vocabulary

    selected = read_captions(captions, list(splits))
    built = Vocabulary.build((c.text for c in selected), threshold)
    out.parent.mkdir(parents=True, exist_ok=True)
    built.save(out)
    click.echo(f"{len(built)} words (threshold {threshold}, {len(selected)} captions) written to {out}")


@cli.command("import-precomp")
@click.argument("data_dir", type=EXISTING_DIR)
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Feature directory to write (shards, manifest.json and captions.jsonl).")
@click.option("--split", "splits", multiple=True, type=click.Choice(["train", "dev", "test", "testall"]),
              help="Splits to import (repeat for several) [default: every {split}_ims.npy found].")
@click.option("--captions-per-image", default=5, show_default=True, type=click.IntRange(min=1))
@click.option("--shard-size", default=1000, show_default=True, type=click.IntRange(min=1),
              help="Images per shard.")
@click.option("--float32", "float32", is_flag=True, help="Keep float32 features (default float16).")
@user_errors
def import_precomp(data_dir: Path, out: Path, splits: tuple[str, ...], captions_per_image: int,
                   shard_size: int, float32: bool) -> None:
    """Convert SCAN/SGRAF precomputed features ({split}_ims.npy + {split}_caps.txt) into shards.

    The .npy files are memory-mapped and copied shard by shard, so large
    splits convert without being loaded whole. A rerun skips images already
    converted. The captions are written to OUT/captions.jsonl with their
    split (dev becomes val; use --split testall with --protocol coco1k/coco5k
    for the MSCOCO 5K test set).
    """
    from tqdm import tqdm

    from matching.precomp import CAPTIONS_FILE
    from matching.precomp import import_precomp as convert

    with tqdm(desc="importing", unit="img", dynamic_ncols=True) as bar:
        counts = convert(data_dir, out, splits=splits or None, captions_per_image=captions_per_image,
                         shard_size=shard_size, dtype="float32" if float32 else "float16", on_images=bar.update)
    for split, n in counts.items():
        click.echo(f"{split}: {n} images")
    click.echo(f"features in {out}, captions in {out / CAPTIONS_FILE}")


def main() -> None:
    cli(prog_name="tshsr-pipe")


if __name__ == "__main__":
    main()
