"""`tshsr-pipe extract` (images → region features) and `tshsr-pipe verify` (features against their manifest).

The extract command's run options are `extract.config.RUN_OPTIONS`: their names, types, ranges,
choices and help come from there and their defaults from the dataclasses (`default_options`), so
`--help` always shows what `ExtractConfig` does, and a pipeline's ``extract:`` section takes the
same names (``--num-boxes 20`` → ``num_boxes: 20``).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from extract.config import RUN_OPTIONS, RunOption, default_options
from pipelines.errors import UserError, user_errors

WEIGHTS_ENV = "TSHSR_EXTRACT_WEIGHTS"


def _click_type(option: RunOption) -> click.ParamType:
    if option.choices:
        return click.Choice(option.choices)
    if option.kind is int:
        return click.IntRange(min=option.minimum, max=option.maximum)
    if option.kind is float:
        return click.FloatRange(min=option.minimum, max=option.maximum, min_open=option.above_minimum)
    return click.STRING


def _run_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """Add every `RUN_OPTIONS` entry to `command` as a click option, in the table's order."""
    defaults = default_options()
    for name, option in reversed(RUN_OPTIONS.items()):  # click lists options in reverse order of decoration
        flag = "--" + name.replace("_", "-")
        if option.kind is bool:
            command = click.option(flag, name, is_flag=True, default=defaults[name], help=option.help)(command)
        else:
            command = click.option(flag, name, type=_click_type(option), default=defaults[name], show_default=True,
                                   help=option.help)(command)
    return command


def build_extract_command() -> click.Command:
    """The `extract` command, with its run options' defaults read from the dataclasses now."""

    @click.command("extract")
    @click.argument("images_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
    @click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True,
                  help="Feature directory to write (shards + manifest.json); a rerun continues where it stopped.")
    @click.option("--weights", "weights_path", type=click.Path(path_type=Path), envvar=WEIGHTS_ENV,
                  help=f"The bottom-up-attention weights, faster_rcnn_from_caffe_attr.pkl (see extract/README.md) "
                       f"[env: {WEIGHTS_ENV}].")
    @click.option("--list", "image_list", type=click.Path(exists=True, dir_okay=False, path_type=Path),
                  help="Extract only the images in this file, one path a line, relative to IMAGES_DIR.")
    @_run_options
    @click.option("--quiet", is_flag=True, help="No progress bar.")
    @user_errors
    def extract(images_dir: Path, out: Path, weights_path: Path | None, image_list: Path | None, quiet: bool,
                **options: Any) -> None:
        """Detect regions in every image under IMAGES_DIR and write their features to --out.

        The bottom-up-attention Faster R-CNN (ResNet-101, Visual Genome 1600
        objects / 400 attributes) proposes 300 RoIs per image; the 36 best after
        per-class NMS are kept (--boxes adaptive: 10 to 100) with their 2048-d
        features, boxes in original pixels, object and attribute labels. Image
        ids are paths relative to IMAGES_DIR. In a pipeline file, the options
        go in the extract: section with underscores (--num-boxes 20 is
        num_boxes: 20; weights and list too).

        \b
        Interrupting is safe: completed shards are kept (exit 130 on Ctrl-C,
        143 on SIGTERM), and running the same command again skips the images
        already done (and those that failed; see manifest.json, --retry-failed).
        Several GPUs or machines:
          torchrun --nproc-per-node 4 -m pipelines.cli extract IMAGES --out F --device cuda --weights W
        """
        from extract.config import ExtractConfig
        from extract.run import extract_features
        from extract.runtime import Launch, exit_code
        from extract.weights import WEIGHTS_SOURCE

        if weights_path is None:
            raise UserError(f"--weights is required: the extractor needs {WEIGHTS_SOURCE}")
        config = ExtractConfig.from_options(options)
        launch = Launch.from_env()
        summary = extract_features(images_dir, out, weights_path, config, image_list=image_list, launch=launch,
                                   progress=not quiet)
        prefix = f"rank {launch.rank}/{launch.world_size}: " if launch.distributed else ""
        rate = f", {summary.done / summary.seconds:.2f} images/s" if summary.done and summary.seconds > 0 else ""
        click.echo(f"{prefix}{summary.done} extracted, {summary.skipped} skipped (done or failed before), "
                   f"{len(summary.failed)} failed; {summary.total} images in all{rate} "
                   f"[{summary.backend or 'no'} backend]")
        for item in summary.failed[:10]:
            click.echo(f"{prefix}  failed: {item['path']}: {item['reason']}")
        if len(summary.failed) > 10:
            click.echo(f"{prefix}  … {len(summary.failed) - 10} more in {out / 'manifest.json'}")
        if summary.interrupted:
            click.echo(f"{prefix}interrupted: what was extracted is saved; run the same command again to continue")
            raise SystemExit(exit_code(summary.signum))
        click.echo(f"{prefix}features in {out}")

    return extract


extract = build_extract_command()


@click.command()
@click.argument("features", type=click.Path(path_type=Path))
@click.option("--quiet", is_flag=True, help="No progress bar.")
@user_errors
def verify(features: Path, quiet: bool) -> None:
    """Check the feature directory FEATURES against its manifest.json, reading every shard whole.

    Checks each shard's size and sha256, its datasets' shapes and dtypes, its image
    count, that image ids are unique, that num_boxes lies within K, and that the
    failed list is sane. Prints one line per problem and exits 2 when there is any,
    0 when the directory is clean. (Opening features for train, evaluate or search
    checks only sizes and headers, which is fast.)
    """
    from extract.runtime import progress_bar
    from extract.shards import verify_report

    with progress_bar(None, "verifying", "shard", enabled=not quiet) as bar:
        report = verify_report(features, on_start=lambda shards: bar.reset(total=shards),
                               on_shard=lambda name: bar.update(1))
    for problem in report.problems:
        click.echo(problem)
    if report.problems:
        raise UserError(f"{features}: {len(report.problems)} problem(s) found")
    click.echo(report.summary(features))
