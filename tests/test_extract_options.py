"""One set of option names for `tshsr-pipe extract`, pipeline files and the demo; defaults read from the dataclasses;
devices, exit codes."""

from __future__ import annotations

import dataclasses
import signal

import click
import pytest
import yaml
from click.testing import CliRunner

import extract.config
from extract.config import BACKENDS, BOX_MODES, DetectorConfig, ExtractConfig, ExtractError
from pipelines.cli import cli
from pipelines.errors import PipelineError
from pipelines.extract_cmd import build_extract_command
from pipelines.extract_stage import DEMO_EXTRACT, extract_config
from tests.extract_fixtures import published_weights, scene  # noqa: F401 - fixture

# Each option of `extract --help` and the dataclass field whose default it shows, written out here
# independently of RUN_OPTIONS, so that the table cannot drift from the dataclasses unnoticed.
FIELDS = {
    "boxes": (ExtractConfig, "box_mode"), "num_boxes": (ExtractConfig, "num_boxes"),
    "min_boxes": (ExtractConfig, "min_boxes"), "max_boxes": (ExtractConfig, "max_boxes"),
    "conf_threshold": (ExtractConfig, "conf_threshold"), "nms": (ExtractConfig, "nms_threshold"),
    "float32": (ExtractConfig, "feature_dtype"), "backend": (ExtractConfig, "backend"),
    "device": (ExtractConfig, "device"), "half": (ExtractConfig, "half"), "batch_size": (ExtractConfig, "batch_size"),
    "workers": (ExtractConfig, "workers"), "shard_size": (ExtractConfig, "shard_size"),
    "commit_minutes": (ExtractConfig, "commit_minutes"), "min_size": (DetectorConfig, "min_size"),
    "max_size": (DetectorConfig, "max_size"), "rois": (DetectorConfig, "rpn_post_nms_topk"),
    "max_megapixels": (ExtractConfig, "max_megapixels"), "retry_failed": (ExtractConfig, "retry_failed"),
}
COMMAND_ONLY = {"out", "quiet", "help"}  # the command's own options; a pipeline names the output `features`


def option_names(command: click.Command) -> dict[str, click.Option]:
    """The options of a command by the name --help shows, underscored (--num-boxes → num_boxes)."""
    return {param.opts[0].lstrip("-").replace("-", "_"): param for param in command.params
            if isinstance(param, click.Option)}


def field_default(cls: type, name: str):
    field = next(f for f in dataclasses.fields(cls) if f.name == name)
    return field.default_factory() if field.default is dataclasses.MISSING else field.default


def test_every_run_option_shows_its_dataclass_default():
    options = option_names(cli.commands["extract"])
    assert set(options) - COMMAND_ONLY == set(FIELDS) | {"weights", "list"}
    for name, (cls, field) in FIELDS.items():
        expected = field_default(cls, field)
        if name == "float32":
            expected = expected == "float32"
        assert options[name].default == expected, name
    assert list(options["boxes"].type.choices) == list(BOX_MODES)
    assert list(options["backend"].type.choices) == list(BACKENDS)


def test_a_changed_dataclass_default_changes_the_help(monkeypatch):
    @dataclasses.dataclass
    class Changed(ExtractConfig):
        num_boxes: int = 20
        detector: DetectorConfig = dataclasses.field(default_factory=lambda: DetectorConfig(rpn_post_nms_topk=50))

    monkeypatch.setattr(extract.config, "ExtractConfig", Changed)
    text = " ".join(CliRunner().invoke(build_extract_command(), ["--help"]).output.split())
    assert "--num-boxes INTEGER RANGE Regions per image in fixed mode. [default: 20; x>=1]" in text
    assert "[default: 50; x>=1]" in text.split("--rois")[1]


def test_options_by_their_command_names_make_the_config():
    config = ExtractConfig.from_options({"boxes": "adaptive", "nms": 0.5, "float32": True, "rois": 40,
                                         "min_size": 128, "commit_minutes": 2, "max_megapixels": 10})
    assert (config.box_mode, config.nms_threshold, config.feature_dtype) == ("adaptive", 0.5, "float32")
    assert (config.detector.rpn_post_nms_topk, config.detector.min_size) == (40, 128)
    assert config.commit_minutes == 2.0 and config.max_megapixels == 10.0
    assert ExtractConfig.from_options({}) == ExtractConfig()


@pytest.mark.parametrize("options, message", [
    ({"rpn_post_nms_topk": 8}, "unknown extract option\\(s\\): rpn_post_nms_topk; known: boxes, num_boxes"),
    ({"num_boxes": "ten"}, "num_boxes must be a whole number, not 'ten'"),
    ({"num_boxes": True}, "num_boxes must be a whole number"),
    ({"boxes": "some"}, "boxes \\(box_mode\\) must be one of fixed, adaptive"),
    ({"nms": 1.5}, "nms \\(nms_threshold\\) must be between 0 and 1"),
    ({"commit_minutes": 0}, "commit_minutes must be above 0"),
    ({"float32": "yes"}, "float32 \\(feature_dtype\\) must be true or false"),
    ({"min_boxes": 20, "max_boxes": 10}, "min_boxes <= max_boxes"),
])
def test_wrong_options_are_named(options, message):
    with pytest.raises(ExtractError, match=message):
        ExtractConfig.from_options(options)


def test_the_pipeline_stage_and_the_demo_use_the_command_names():
    names = set(option_names(cli.commands["extract"]))
    assert set(DEMO_EXTRACT) <= names and ExtractConfig.from_options(DEMO_EXTRACT).detector.rpn_post_nms_topk == 24
    weights, image_list, config = extract_config({"weights": "w.pkl", "list": "l.txt", "rois": 8, "float32": True},
                                                 device="cpu")
    assert (str(weights), str(image_list), config.device) == ("w.pkl", "l.txt", "cpu")
    assert config.detector.rpn_post_nms_topk == 8 and config.feature_dtype == "float32"
    assert extract_config({"weights": "w.pkl", "device": "cuda:1"}, device="cpu")[2].device == "cuda:1"
    with pytest.raises(PipelineError, match="unknown extract option\\(s\\): out \\(the output directory is the "
                                            "pipeline's 'features'\\); known .*: weights, list, boxes"):
        extract_config({"weights": "w.pkl", "out": "f"}, device="cpu")
    with pytest.raises(PipelineError, match="needs 'weights'"):
        extract_config({"rois": 8}, device="cpu")


def test_a_pipeline_file_with_the_option_names_of_extract_help_runs(tmp_path, published_weights):  # noqa: F811
    from extract.shards import FeatureStore
    from pipelines.run import PipelineSpec, run_pipeline
    from pipelines.synthetic import make_scenes, write_image_dataset
    from tests.conftest import SMALL_MODEL

    write_image_dataset(tmp_path / "data", make_scenes(20, seed=7), size=64)
    (tmp_path / "data" / "list.txt").write_text("".join(f"scene_{i:05d}.png\n" for i in range(20)))
    options = option_names(cli.commands["extract"])
    section = {name: option.default for name, option in options.items() if name not in COMMAND_ONLY}
    section.update(weights=str(published_weights), list=str(tmp_path / "data" / "list.txt"), min_size=64,
                   max_size=64, rois=2, num_boxes=2, workers=0, shard_size=8, device="cpu", nms=0.5)
    assert set(section) == set(options) - COMMAND_ONLY  # every name --help shows, and only those
    pipeline = {"workdir": "work", "images": "data/images", "features": "work/features",
                "captions": "data/captions.jsonl", "name": "yaml", "extract": section, "vocab": {"threshold": 1},
                "model": dict(SMALL_MODEL), "train": {"epochs": 1, "batch_size": 16, "warmup_epochs": 1,
                                                      "workers": 0, "checkpoint_every": 0},
                "evaluate": {"split": "test", "protocol": "full"}}
    (tmp_path / "pipeline.yaml").write_text(yaml.safe_dump(pipeline))
    lines: list[str] = []
    run_pipeline(PipelineSpec.from_file(tmp_path / "pipeline.yaml"), log=lines.append, progress=False)
    assert any(line.startswith("extract: 20 images extracted") for line in lines), lines
    store = FeatureStore(tmp_path / "work" / "features")
    assert len(store) == 20 and store.max_boxes == 2 and len(store.manifest.shards) == 3
    assert store.manifest.settings["output"]["selection"]["nms_threshold"] == 0.5


@pytest.mark.parametrize("device, message", [("gpu", "--device 'gpu': not a device; use auto, cpu, cuda or cuda:N"),
                                             ("cuda", "--device cuda: CUDA is not available on this machine")])
def test_a_device_that_does_not_exist_is_one_line(tmp_path, published_weights, device, message):  # noqa: F811
    if device == "cuda" and __import__("torch").cuda.is_available():
        pytest.skip("a GPU is present")
    (tmp_path / "images").mkdir()
    result = CliRunner().invoke(cli, ["extract", str(tmp_path / "images"), "--out", str(tmp_path / "f"),
                                      "--weights", str(published_weights), "--device", device])
    assert result.exit_code == 2 and result.output.startswith(f"Error: {message}")
    assert result.output.count("\n") == 1 and not (tmp_path / "f").exists()


@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_an_interrupted_extract_exits_with_the_signals_code(tmp_path, monkeypatch, signum, code):
    import extract.run

    def stopped(*args, **kwargs):
        return extract.run.ExtractSummary(total=3, done=1, signum=signum, backend="torchvision")

    monkeypatch.setattr(extract.run, "extract_features", stopped)
    (tmp_path / "images").mkdir()
    result = CliRunner().invoke(cli, ["extract", str(tmp_path / "images"), "--out", str(tmp_path / "f"),
                                      "--weights", "w.pkl"])
    assert result.exit_code == code and "interrupted: what was extracted is saved" in result.output
