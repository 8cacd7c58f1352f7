"""`tshsr-pipe extract`: images → region features (HDF5 shards + manifest.json)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import click

from pipelines.errors import UserError, user_errors

WEIGHTS_ENV = "TSHSR_EXTRACT_WEIGHTS"


@click.command()
@click.argument("images_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Feature directory to write (shards + manifest.json); a rerun continues where it stopped.")
@click.option("--weights", "weights_path", type=click.Path(path_type=Path), envvar=WEIGHTS_ENV,
              help=f"The bottom-up-attention weights, faster_rcnn_from_caffe_attr.pkl (see extract/README.md) "
                   f"[env: {WEIGHTS_ENV}].")
@click.option("--list", "image_list", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Extract only the images in this file, one path a line, relative to IMAGES_DIR.")
@click.option("--boxes", "box_mode", type=click.Choice(["fixed", "adaptive"]), default="fixed", show_default=True,
              help="fixed: the top --num-boxes regions; adaptive: the regions scoring at least --conf-threshold, "
                   "between --min-boxes and --max-boxes (the original 10-100).")
@click.option("--num-boxes", default=36, show_default=True, type=click.IntRange(min=1),
              help="Regions per image in fixed mode.")
@click.option("--min-boxes", default=10, show_default=True, type=click.IntRange(min=1))
@click.option("--max-boxes", default=100, show_default=True, type=click.IntRange(min=1))
@click.option("--conf-threshold", default=0.2, show_default=True, type=click.FloatRange(0, 1))
@click.option("--nms", "nms_threshold", default=0.3, show_default=True, type=click.FloatRange(0, 1),
              help="IoU threshold of the per-class NMS that ranks regions.")
@click.option("--float32", is_flag=True, help="Store float32 features (default float16).")
@click.option("--backend", type=click.Choice(["auto", "torchvision", "detectron2"]), default="auto",
              show_default=True, help="auto: detectron2 when it is installed, else torchvision (same results).")
@click.option("--device", default="cpu", show_default=True,
              help="cpu, cuda or cuda:N; under torchrun each rank takes cuda:LOCAL_RANK.")
@click.option("--half", is_flag=True, help="float16 autocast on GPU (checked against float32 by the tests).")
@click.option("--batch-size", default=0, type=click.IntRange(min=0),
              help="Images per forward pass [default: 1 on CPU, 4 on GPU].")
@click.option("--workers", default=2, show_default=True, type=click.IntRange(min=0),
              help="Image-decoding processes running alongside the detector (0: decode in the main process).")
@click.option("--shard-size", default=1000, show_default=True, type=click.IntRange(min=1), help="Images per shard.")
@click.option("--commit-minutes", default=5.0, show_default=True, type=click.FloatRange(min=0, min_open=True),
              help="Also close a shard after this long, so an interruption loses at most this much work.")
@click.option("--min-size", default=600, show_default=True, type=click.IntRange(min=16),
              help="Shorter image side after resizing.")
@click.option("--max-size", default=1000, show_default=True, type=click.IntRange(min=16),
              help="Longer image side is capped at this.")
@click.option("--rois", default=300, show_default=True, type=click.IntRange(min=1),
              help="RoIs per image after the RPN; res5 over them is most of the time.")
@click.option("--max-megapixels", default=250, show_default=True, type=click.IntRange(min=1),
              help="Larger JPEGs are decoded at reduced scale, other larger images are skipped.")
@click.option("--retry-failed", is_flag=True, help="Try again the images a previous run listed as failed.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@user_errors
def extract(images_dir: Path, out: Path, weights_path: Path | None, image_list: Path | None, box_mode: str,
            num_boxes: int, min_boxes: int, max_boxes: int, conf_threshold: float, nms_threshold: float,
            float32: bool, backend: str, device: str, half: bool, batch_size: int, workers: int, shard_size: int,
            commit_minutes: float, min_size: int, max_size: int, rois: int, max_megapixels: int,
            retry_failed: bool, quiet: bool) -> None:
    """Detect regions in every image under IMAGES_DIR and write their features to --out.

    The bottom-up-attention Faster R-CNN (ResNet-101, Visual Genome 1600
    objects / 400 attributes) proposes 300 RoIs per image; the 36 best after
    per-class NMS are kept (--boxes adaptive: 10 to 100) with their 2048-d
    features, boxes in original pixels, object and attribute labels. Image
    ids are paths relative to IMAGES_DIR.

    \b
    Interrupting is safe: completed shards are kept, and running the same
    command again skips the images already done (and those that failed;
    see manifest.json, --retry-failed). Several GPUs or machines:
      torchrun --nproc-per-node 4 -m pipelines.cli extract IMAGES --out F --device cuda --weights W
    """
    from extract.config import DetectorConfig, ExtractConfig
    from extract.run import RankInfo, extract_features
    from extract.weights import WEIGHTS_SOURCE

    if weights_path is None:
        raise UserError(f"--weights is required: the extractor needs {WEIGHTS_SOURCE}")
    config = ExtractConfig(
        detector=dataclasses.replace(DetectorConfig(), min_size=min_size, max_size=max_size, rpn_post_nms_topk=rois),
        box_mode=box_mode, num_boxes=num_boxes, min_boxes=min_boxes, max_boxes=max_boxes,
        conf_threshold=conf_threshold, nms_threshold=nms_threshold,
        feature_dtype="float32" if float32 else "float16", backend=backend, device=device, half=half,
        batch_size=batch_size, workers=workers, shard_size=shard_size, commit_seconds=commit_minutes * 60,
        max_pixels=max_megapixels * 1_000_000, retry_failed=retry_failed)
    rank = RankInfo.from_env()
    summary = extract_features(images_dir, out, weights_path, config, image_list=image_list, rank=rank,
                               progress=not quiet)
    prefix = f"rank {rank.rank}/{rank.world_size}: " if rank.world_size > 1 else ""
    rate = f", {summary.done / summary.seconds:.2f} images/s" if summary.done and summary.seconds > 0 else ""
    click.echo(f"{prefix}{summary.done} extracted, {summary.skipped} skipped (done or failed before), "
               f"{len(summary.failed)} failed; {summary.total} images in all{rate} [{summary.backend or 'no'} backend]")
    for item in summary.failed[:10]:
        click.echo(f"{prefix}  failed: {item['path']}: {item['reason']}")
    if len(summary.failed) > 10:
        click.echo(f"{prefix}  … {len(summary.failed) - 10} more in {out / 'manifest.json'}")
    if summary.interrupted:
        click.echo(f"{prefix}interrupted: what was extracted is saved; run the same command again to continue")
        raise SystemExit(130)
    click.echo(f"{prefix}features in {out}")
