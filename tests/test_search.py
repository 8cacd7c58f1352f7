"""`tshsr-pipe search`: the known matching image first, captions of an image, the HTML page."""

from __future__ import annotations

from click.testing import CliRunner

from matching import checkpoint
from matching.config import EvaluationSettings
from matching.data.captions import group_by_image, read_captions
from matching.retrieval.search import SearchEngine
from pipelines.cli import cli


def test_a_test_caption_finds_its_image_first(trained_toy):
    features, captions, _, ckpt, _ = trained_toy
    engine = SearchEngine.open(ckpt, features, captions=captions, device="cpu",
                               settings=EvaluationSettings(split="test"))
    groups = group_by_image(read_captions(captions, "test"))
    assert sorted(engine.gallery) == sorted(groups)
    found = 0
    for image_id, group in groups.items():
        hits = engine.search_text(group[0].text, 3).hits
        assert len(hits) == 3 and hits[0].score >= hits[1].score >= hits[2].score
        found += hits[0].item == image_id
    # chance is 1 in 15
    assert found >= len(groups) // 2, f"{found}/{len(groups)} test captions found their image first"


def test_images_rank_their_own_captions_far_above_chance(trained_toy):
    features, captions, _, ckpt, _ = trained_toy
    test = read_captions(captions, "test")
    engine = SearchEngine.open(ckpt, features, captions=captions, device="cpu",
                               settings=EvaluationSettings(split="test"))
    images = list(group_by_image(test))
    own = [sum(hit.matches_query_image for hit in engine.image_captions(image_id, 5).hits) for image_id in images]
    # 15 images × 5 captions: by chance 5 × 5/75 = 0.33 of an image's top 5 are its own. Averaged over
    # every test image, a margin of 4× chance holds on any machine's arithmetic (one image's count does not).
    assert sum(own) / len(own) > 4 * 5 * 5 / len(test), own


def test_search_command_page_and_errors(trained_toy, tmp_path):
    from PIL import Image

    features, captions, _, ckpt, _ = trained_toy
    test = read_captions(captions, "test")
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (64, 64), "white").save(images / test[0].image_id)
    runner = CliRunner()
    base = ["search", "--checkpoint", str(ckpt), "--features", str(features)]
    result = runner.invoke(cli, [*base, test[0].text, "-k", "4", "--captions", str(captions), "--split", "test",
                                 "--images", str(images), "--html", str(tmp_path / "page.html")])
    assert result.exit_code == 0, result.output
    lines = [line for line in result.output.splitlines() if line.strip().startswith(("1.", "2.", "3.", "4."))]
    assert len(lines) == 4 and test[0].image_id in lines[0]
    page = (tmp_path / "page.html").read_text()
    assert page.count("<figure>") == 4 and "data:image/jpeg;base64," in page and "image file not found" in page
    result = runner.invoke(cli, [*base, "--image", test[0].image_id, "--captions", str(captions), "--split", "test",
                                 "-k", "3"])
    assert result.exit_code == 0 and result.output.count("✓") >= 2, result.output
    for args, message in ((["zzzz qqqq"], "none of the words"), ([], "either a text QUERY or --image"),
                          (["--image", "x.png"], "--image needs --captions"),
                          (["--image", "nope.png", "--captions", str(captions)], "'nope.png' is not in")):
        result = runner.invoke(cli, [*base, *args])
        assert result.exit_code == 2 and message in result.output, result.output


def test_index_gives_the_same_ranking_and_refuses_another_model(trained_toy, tmp_path):
    features, captions, _, ckpt, _ = trained_toy
    text = read_captions(captions, "test")[0].text
    runner = CliRunner()
    base = ["search", "--checkpoint", str(ckpt), "--features", str(features), text, "-k", "5"]
    plain = runner.invoke(cli, base)
    built = runner.invoke(cli, [*base, "--index", str(tmp_path / "g.idx")])
    used = runner.invoke(cli, [*base, "--index", str(tmp_path / "g.idx")])
    assert "index of 150 images written" in built.output and "written" not in used.output
    ranked = [[line.split()[-1] for line in r.output.splitlines() if line.strip()[:2] in ("1.", "2.", "3.")]
              for r in (plain, built, used)]
    assert ranked[0] == ranked[1] == ranked[2] and len(ranked[0]) == 3
    import shutil

    shutil.copy(ckpt, tmp_path / "other.pt")
    with open(tmp_path / "other.pt", "ab") as handle:
        handle.write(b"\0")  # another file: another checksum
    stale = runner.invoke(cli, ["search", "--checkpoint", str(tmp_path / "other.pt"), "--features", str(features),
                                text, "--index", str(tmp_path / "g.idx")])
    assert stale.exit_code == 2 and "built for another checkpoint" in stale.output


def test_search_errors_name_the_split_and_the_feature_sizes(trained_toy, tmp_path):
    from matching.config import Config
    from matching.model.tshsr import build_model
    from tests.conftest import tiny_config

    features, captions, _, ckpt, _ = trained_toy
    runner = CliRunner()
    base = ["search", "--checkpoint", str(ckpt), "--features", str(features)]
    result = runner.invoke(cli, [*base, "a red circle", "--captions", str(captions), "--split", "tset"])
    assert result.exit_code == 2 and "no captions of split 'tset'" in result.output and "test (" in result.output
    result = runner.invoke(cli, [*base, "a red circle", "--split", "test"])
    assert result.exit_code == 2 and "--split test needs --captions" in result.output
    _, _, vocab = checkpoint.load(ckpt)
    wide = tiny_config(img_dim=48, vocab_size=len(vocab))
    checkpoint.save(tmp_path / "wide.pt", build_model(wide), Config(model=wide), vocab)
    result = runner.invoke(cli, ["search", "--checkpoint", str(tmp_path / "wide.pt"), "--features", str(features),
                                 "a red circle"])
    assert result.exit_code == 2 and "features are 32-d" in result.output and "expects 48-d" in result.output
    assert "Traceback" not in result.output
    for device, message in (("gpu", "not a device"),):
        result = runner.invoke(cli, [*base, "a red circle", "--device", device])
        assert result.exit_code == 2 and message in result.output


def test_words_outside_the_vocabulary_are_named(trained_toy):
    features, _, _, ckpt, _ = trained_toy
    result = CliRunner().invoke(cli, ["search", "--checkpoint", str(ckpt), "--features", str(features),
                                      "a red zeppelin near qwerty", "-k", "2"])
    assert result.exit_code == 0, result.output
    assert "note: not in the model's vocabulary, ignored: 'zeppelin', 'near', 'qwerty'" in result.output
