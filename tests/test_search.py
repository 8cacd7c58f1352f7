"""`tshsr-pipe search`: the known matching image first, captions of an image, the HTML page."""

from __future__ import annotations

from click.testing import CliRunner

from extract.shards import FeatureStore
from matching import checkpoint
from matching.captions import group_by_image, read_captions
from matching.inference import search_captions, search_images
from pipelines.cli import cli


def test_a_test_caption_finds_its_image_first(trained_toy):
    features, captions, _, ckpt, _ = trained_toy
    model, _, vocab = checkpoint.load(ckpt)
    store = FeatureStore(features)
    groups = group_by_image(read_captions(captions, "test"))
    gallery = list(groups)
    found = 0
    for image_id, group in groups.items():
        hits = search_images(model, vocab, store, group[0].text, k=3, image_ids=gallery)
        assert len(hits) == 3 and hits[0].score >= hits[1].score >= hits[2].score
        found += hits[0].item == image_id
    # chance is 1 in 15
    assert found >= len(groups) // 2, f"{found}/{len(groups)} test captions found their image first"


def test_an_image_ranks_its_own_captions_first(trained_toy):
    features, captions, _, ckpt, _ = trained_toy
    model, _, vocab = checkpoint.load(ckpt)
    test = read_captions(captions, "test")
    image_id = test[0].image_id
    hits = search_captions(model, vocab, FeatureStore(features), image_id, test, k=5)
    assert sum(hit.matches_query_image for hit in hits) >= 4


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
