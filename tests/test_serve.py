"""`tshsr-pipe serve`: the JSON API against the library's `search`, its limits, ids and queue."""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import quote

import numpy as np
import pytest
from fastapi.testclient import TestClient

from matching.config import EvaluationSettings
from matching.data.captions import group_by_image, read_captions
from matching.retrieval.search import SearchEngine, search
from pipelines.serve.app import Limits, create_app
from tests.conftest import TINY, random_images, tiny_config, tiny_model
from tests.serve_helpers import free_port, start_server, stop_server

FEATURES: list = []  # the toy set's feature directory, for the reference computations


@pytest.fixture(scope="module")
def toy_engine(trained_toy):
    """The trained toy model served over its test split (15 images, 75 captions)."""
    features, captions, _, ckpt, _ = trained_toy
    FEATURES[:] = [features]
    return SearchEngine.open(ckpt, features, captions=captions, settings=EvaluationSettings(split="test"),
                             device="cpu")


def attended_regions(engine: SearchEngine, image_id: str, text: str, top: int = 3) -> list:
    """Eq. 2's α of the text's words over one image's regions, averaged over the words, from its features."""
    import torch

    from extract.shards import FeatureStore
    from matching.model.similarity import clipped_cosines, region_attention

    features, boxes, count, _ = FeatureStore(FEATURES[0]).get(image_id)
    tokens = engine.vocab.encode(text)
    model = engine.model
    with torch.inference_mode():
        image = model.encode_images(torch.from_numpy(features)[None], torch.tensor([count]))
        words = model.encode_captions(torch.tensor([tokens]), torch.tensor([len(tokens)]))
        cos = clipped_cosines(image.local, words.local, model.head.attention_clip)
        alpha = region_attention(cos, image.mask, words.mask, model.head.lambda_i2t)[0, 0]  # (L, K)
        weights = alpha.mean(0)[:count].numpy()
    return [(boxes[i].tolist(), float(weights[i])) for i in np.argsort(-weights)[:top]]


def client_for(engine: SearchEngine, **options) -> TestClient:
    limits = Limits(**{"queue_size": 8, **options.pop("limits", {})})
    return TestClient(create_app(engine, limits=limits, **options))


def test_text_search_equals_the_library_search(trained_toy, toy_engine):
    features, captions, _, ckpt, _ = trained_toy
    test = read_captions(captions, "test")
    with client_for(toy_engine) as client:
        for caption in test[::17]:
            served = client.get("/api/search", params={"q": caption.text, "k": 5})
            assert served.status_code == 200, served.text
            body = served.json()
            library = search(ckpt, features, query=caption.text, captions=captions, split="test", k=5,
                             with_regions=True, device="cpu")
            assert [h["image_id"] for h in body["hits"]] == [h.item for h in library.hits]
            assert [h["score"] for h in body["hits"]] == [h.score for h in library.hits]  # the same arithmetic
            assert [h["rank"] for h in body["hits"]] == [1, 2, 3, 4, 5]
            assert body["gallery_size"] == library.gallery_size == 15
            for hit, reference in zip(body["hits"], library.hits, strict=True):
                assert hit["regions"] == [{"box": box, "weight": w} for box, w in reference.regions]
                # the batched attention over the encoded gallery against Eq. 2 computed for this image alone
                expected = attended_regions(toy_engine, hit["image_id"], caption.text)
                assert [r["box"] for r in hit["regions"]] == [box for box, _ in expected]
                np.testing.assert_allclose([r["weight"] for r in hit["regions"]], [w for _, w in expected],
                                           rtol=1e-5, atol=1e-6)
                assert hit["image_size"] == [64, 64] and hit["thumbnail"] is None
        body = client.get("/api/search", params={"q": "a red zeppelin", "k": 3}).json()
        assert body["ignored_words"] == ["zeppelin"] and len(body["hits"]) == 3


def test_a_search_index_serves_the_same_ranking(trained_toy, toy_engine, tmp_path):
    features, captions, _, ckpt, _ = trained_toy
    text = read_captions(captions, "test")[3].text
    test_split = EvaluationSettings(split="test")
    built = SearchEngine.open(ckpt, features, captions=captions, settings=test_split, index_path=tmp_path / "g.idx")
    loaded = SearchEngine.open(ckpt, features, captions=captions, settings=test_split, index_path=tmp_path / "g.idx")
    assert built.info.index_built and not loaded.info.index_built
    ranked = [[(h.item, h.score) for h in engine.search_text(text, 6).hits] for engine in (toy_engine, built, loaded)]
    # the gallery on disk keeps the regions in float16 by default: the same ranking, scores within 1e-3
    assert [item for item, _ in ranked[1]] == [item for item, _ in ranked[0]] and ranked[1] == ranked[2]
    np.testing.assert_allclose([score for _, score in ranked[1]], [score for _, score in ranked[0]], atol=1e-3)


def test_captions_of_an_image_equal_the_library_search(trained_toy, toy_engine):
    features, captions, _, ckpt, _ = trained_toy
    groups = group_by_image(read_captions(captions, "test"))
    with client_for(toy_engine) as client:
        for image_id in list(groups)[:4]:
            body = client.get(f"/api/images/{image_id}/captions", params={"k": 6}).json()
            library = search(ckpt, features, image_id=image_id, captions=captions, split="test", k=6, device="cpu")
            assert [c["text"] for c in body["captions"]] == [h.item for h in library.hits]
            np.testing.assert_allclose([c["score"] for c in body["captions"]], [h.score for h in library.hits],
                                       rtol=1e-5)
            assert [c["ground_truth"] for c in body["captions"]] == [h.matches_query_image for h in library.hits]
            assert body["own_captions"] == [c.text for c in groups[image_id]]


def test_rounds_rank_by_the_mean_of_the_queries_scores(trained_toy, toy_engine):
    features, captions, _, ckpt, _ = trained_toy
    groups = group_by_image(read_captions(captions, "test"))
    queries = [group[0].text for group in list(groups.values())[:3]]
    every = {}  # the library's score of every gallery image for each query
    for q in queries:
        every[q] = {h.item: h.score for h in search(ckpt, features, query=q, captions=captions, split="test",
                                                    k=100, device="cpu").hits}
    ids = sorted(every[queries[0]])
    with client_for(toy_engine) as client:
        single = client.post("/api/search", json={"queries": queries[:1], "k": 5}).json()
        plain = client.get("/api/search", params={"q": queries[0], "k": 5}).json()
        assert [(h["image_id"], h["score"]) for h in single["hits"]] == [(h["image_id"], h["score"])
                                                                          for h in plain["hits"]]
        body = client.post("/api/search", json={"queries": queries, "k": 15}).json()
    assert body["combination"] == "mean" and body["queries"] == queries
    mean = {i: np.mean([every[q][i] for q in queries]) for i in ids}
    assert [h["image_id"] for h in body["hits"]] == sorted(ids, key=lambda i: -mean[i])  # no ties here
    np.testing.assert_allclose([h["score"] for h in body["hits"]], sorted(mean.values(), reverse=True), rtol=1e-6)
    for hit in body["hits"]:
        expected = []
        for r in range(1, len(queries) + 1):
            partial = {i: np.mean([every[q][i] for q in queries[:r]]) for i in ids}
            expected.append(1 + sum(v > partial[hit["image_id"]] for v in partial.values()))
        assert hit["rank_by_round"] == expected
    assert body["hits"][-1]["rank_by_round"][-1] == 15


def test_limits_and_unreadable_queries_are_422_with_a_message(toy_engine):
    limits = {"max_query_chars": 40, "max_queries": 3, "max_k": 7}
    with client_for(toy_engine, limits=limits) as client:
        cases = [(client.get("/api/search", params={"q": "a" * 41}), "at most 40 characters"),
                 (client.get("/api/search", params={"q": "a red circle", "k": 8}), "less than or equal to 7"),
                 (client.get("/api/search", params={"q": "a red circle", "k": 0}), "greater than or equal to 1"),
                 (client.get("/api/search", params={"q": "a red circle", "k": "ten"}), "k: Input should be"),
                 (client.get("/api/search"), "q: Field required"),
                 (client.get("/api/search", params={"q": "qqq zzz"}), "none of the words"),
                 (client.post("/api/search", json={"queries": [], "k": 3}), "at least 1 item"),
                 (client.post("/api/search", json={"queries": ["a red circle"] * 4}), "at most 3 items"),
                 (client.post("/api/search", json={"queries": ["a red circle", "qqq"]}), "query 2: none of the words"),
                 (client.post("/api/search", json={"queries": ["a red circle", "b" * 41]}), "at most 40 characters"),
                 (client.post("/api/search", content="not json", headers={"content-type": "application/json"}),
                  "JSON"),
                 (client.get("/api/images/scene_00135.png/captions", params={"k": 99}), "less than or equal to 7")]
        for response, message in cases:
            assert response.status_code == 422, response.text
            detail = response.json()["detail"]
            assert isinstance(detail, str) and "\n" not in detail and message in detail, detail
        assert client.get("/api/search", params={"q": "a red circle", "k": 7}).status_code == 200


def write_gallery(root: Path, ids: list[str]) -> tuple[Path, Path, Path]:
    """A feature directory, a caption file and a checkpoint (random tiny model) for `ids`."""
    from extract.shards import RegionRecord, ShardWriter
    from matching import checkpoint
    from matching.config import Config
    from matching.data.text import Vocabulary

    features, num_boxes = random_images(len(ids), TINY["num_regions"], TINY["img_dim"], seed=5)
    writer = ShardWriter(root / "features", max_boxes=TINY["num_regions"], feature_dim=TINY["img_dim"],
                         dtype="float32")
    for i, image_id in enumerate(ids):
        k = int(num_boxes[i])
        boxes = np.array([[2 * j, j, 2 * j + 8, j + 6] for j in range(k)], np.float32)
        writer.add(RegionRecord(image_id, features[i, :k], boxes, (20, 30)))
    writer.commit()
    texts = ["a red circle", "a blue square", "a green star", "two red squares"]
    with open(root / "captions.jsonl", "w", encoding="utf-8") as handle:
        for i, image_id in enumerate(ids):
            handle.write(json.dumps({"image_id": image_id, "caption": texts[i % len(texts)]}) + "\n")
    vocab = Vocabulary.build(texts, threshold=1)
    config = tiny_config(vocab_size=len(vocab))
    checkpoint.save(root / "model.pt", tiny_model(vocab_size=len(vocab)), Config(model=config), vocab)
    return root / "features", root / "captions.jsonl", root / "model.pt"


SLASHED = ["val2014/COCO_val2014_01.jpg", "val2014/a b%20c.jpg", "train2014/x/deep.jpg", "../outside.jpg"]


@pytest.fixture
def slashed(tmp_path):
    """A gallery whose ids hold slashes, spaces, a percent sign, and one hostile '../outside.jpg'."""
    from PIL import Image

    features, captions, ckpt = write_gallery(tmp_path, SLASHED)
    images = tmp_path / "site" / "images"
    for image_id in SLASHED[:3]:
        (images / image_id).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (30, 20), "white").save(images / image_id, format="JPEG")
    Image.new("RGB", (30, 20), "red").save(tmp_path / "site" / "outside.jpg", format="JPEG")  # ../outside.jpg
    engine = SearchEngine.open(ckpt, features, captions=captions, device="cpu")
    return engine, images


def test_ids_with_slashes_are_served_by_id(slashed):
    engine, images = slashed
    with client_for(engine, images_dir=images) as client:
        hits = client.get("/api/search", params={"q": "a red circle", "k": 4}).json()["hits"]
        assert {h["image_id"] for h in hits} == set(SLASHED)
        for hit in hits:
            if hit["image_id"] == "../outside.jpg":
                assert hit["thumbnail"] is None  # a gallery id that climbs out is never joined to --images
                continue
            assert hit["thumbnail"] == f"/api/images/{quote(hit['image_id'], safe='')}/thumbnail"
            if "%" in hit["image_id"]:
                continue  # Starlette's test client decodes a path twice; the real server test fetches this one
            picture = client.get(hit["thumbnail"])
            assert picture.status_code == 200 and picture.headers["content-type"] == "image/jpeg"
            assert picture.content[:2] == b"\xff\xd8"
        # the plain path form of an id with slashes reaches the same image
        assert client.get("/api/images/val2014/COCO_val2014_01.jpg/thumbnail").status_code == 200
        body = client.get(f"/api/images/{quote(SLASHED[2], safe='')}/captions", params={"k": 2}).json()
        assert body["image_id"] == SLASHED[2] and body["own_captions"] == ["a green star"]
        assert len(body["captions"]) == 2
        for unknown in ("val2014/nope.jpg", "val2014", "COCO_val2014_01.jpg"):
            for route in ("captions", "thumbnail"):
                response = client.get(f"/api/images/{quote(unknown, safe='')}/{route}")
                assert response.status_code == 404 and "not in the gallery" in response.json()["detail"]
    with client_for(engine) as client:  # without --images
        response = client.get(f"/api/images/{quote(SLASHED[0], safe='')}/thumbnail")
        assert response.status_code == 404 and "--images" in response.json()["detail"]


def test_paths_from_the_request_read_nothing(slashed, monkeypatch):
    import builtins

    from PIL import Image

    engine, images = slashed
    opened: list[str] = []
    real_open, real_image_open = builtins.open, Image.open

    def spy_open(file, *args, **kwargs):
        opened.append(str(file))
        return real_open(file, *args, **kwargs)

    def spy_image_open(fp, *args, **kwargs):
        opened.append(str(fp))
        return real_image_open(fp, *args, **kwargs)

    passwd = ["../../etc/passwd", "..%2F..%2Fetc%2Fpasswd", "%2e%2e%2f%2e%2e%2fetc%2fpasswd", "%2Fetc%2Fpasswd",
              "/etc/passwd", "..%252F..%252Fetc%252Fpasswd", "%00", "..\\..\\etc\\passwd"]
    # these reach '../outside.jpg' or a path to it; the captions route answers for the gallery id (its
    # features, no file), the thumbnail route never opens the file
    outside = ["val2014/..%2F..%2Foutside.jpg", "..%2Foutside.jpg", "val2014%2F..%2F..%2Foutside.jpg",
               "%2e%2e/outside.jpg"]
    requests = [(a, route) for a in passwd for route in ("thumbnail", "captions")] + [(a, "thumbnail") for a in outside]
    with client_for(engine, images_dir=images) as client:
        monkeypatch.setattr(builtins, "open", spy_open)
        monkeypatch.setattr(Image, "open", spy_image_open)
        for attack, route in requests:
            response = client.get(f"/api/images/{attack}/{route}")
            assert response.status_code == 404, (attack, route, response.text)
            assert b"root:" not in response.content and response.headers["content-type"] == "application/json"
        # '../outside.jpg' IS a gallery id (a hostile feature file): it is still never read as a file
        response = client.get(f"/api/images/{quote('../outside.jpg', safe='')}/thumbnail")
        assert response.status_code == 404 and "no readable image file" in response.json()["detail"]
        monkeypatch.undo()
    assert not [path for path in opened if "passwd" in path or Path(path).name == "outside.jpg"], opened
    assert opened == []  # not one file was opened for these requests


def test_a_full_queue_answers_503_until_it_drains(toy_engine):
    with client_for(toy_engine, limits={"queue_size": 2}) as client:
        worker = client.app.state.worker
        started, release = threading.Event(), threading.Event()
        blockers = [worker.submit(lambda: started.set() or release.wait())]
        assert started.wait(10)  # the worker is busy with it
        blockers += [worker.submit(release.wait) for _ in range(2)]  # two wait: the queue is full
        assert client.get("/healthz").json() == {"status": "ok", "waiting": 2, "queue_size": 2}
        for request in (lambda: client.get("/api/search", params={"q": "a red circle"}),
                        lambda: client.post("/api/search", json={"queries": ["a red circle"]}),
                        lambda: client.get("/api/images/scene_00135.png/captions")):
            response = request()
            assert response.status_code == 503 and response.headers["retry-after"] == "1"
            assert "2 requests are already waiting" in response.json()["detail"]
        release.set()
        for blocker in blockers:
            blocker.result(timeout=10)
        assert client.get("/api/search", params={"q": "a red circle"}).status_code == 200


def test_concurrent_requests_run_one_at_a_time_on_one_thread(toy_engine, trained_toy):
    _, captions, _, _, _ = trained_toy
    queries = [c.text for c in read_captions(captions, "test")[:12]]
    threads, active, overlap = set(), [0], [False]
    guard = threading.Lock()
    real = toy_engine.search_text

    def watched(query: str, k: int):
        with guard:
            threads.add(threading.get_ident())
            active[0] += 1
            overlap[0] |= active[0] > 1
        try:
            time.sleep(0.01)  # widen the window in which a second call would overlap
            return real(query, k)
        finally:
            with guard:
                active[0] -= 1

    with client_for(toy_engine, limits={"queue_size": 16}) as client:
        expected = [client.get("/api/search", params={"q": q, "k": 4}).json()["hits"] for q in queries]
        toy_engine.search_text = watched
        try:
            with ThreadPoolExecutor(8) as pool:
                got = list(pool.map(lambda q: client.get("/api/search", params={"q": q, "k": 4}), queries))
        finally:
            del toy_engine.search_text
        assert [r.json()["hits"] for r in got] == expected
        assert threads == {client.app.state.worker.thread_id} and not overlap[0]


def test_the_engine_is_opened_on_the_thread_that_answers_the_searches(trained_toy, monkeypatch):
    """`build_app` loads the model on the worker thread (torch's CPU operations ran 15–20% slower on a thread
    other than the one that ran them first); an opening that fails stops that thread and reports its error."""
    from pipelines.serve.app import build_app
    from pipelines.serve.worker import ModelWorker

    features, captions, _, ckpt, _ = trained_toy
    opened_on, searched_on = [], []
    real_open, real_search = SearchEngine.open, SearchEngine.search

    def spied_open(*args, **options):
        opened_on.append(threading.get_ident())
        return real_open(*args, **options)

    def spied_search(self, *args, **options):
        searched_on.append(threading.get_ident())
        return real_search(self, *args, **options)

    monkeypatch.setattr(SearchEngine, "open", spied_open)
    monkeypatch.setattr(SearchEngine, "search", spied_search)
    app = build_app(ckpt, features, captions=captions, device="cpu", settings=EvaluationSettings(split="test"))
    with TestClient(app) as client:
        assert client.get("/api/search", params={"q": "a red circle", "k": 3}).status_code == 200
        assert opened_on == searched_on == [app.state.worker.thread_id] != [threading.get_ident()]
    started = []
    real_start = ModelWorker.start

    def spied_start(self):
        started.append(self)
        return real_start(self)

    monkeypatch.setattr(ModelWorker, "start", spied_start)
    from matching.checkpoint import CheckpointError

    with pytest.raises(CheckpointError, match="missing.pt: no such checkpoint"):
        build_app(ckpt.parent / "missing.pt", features, device="cpu")
    assert len(started) == 1 and not started[0]._thread.is_alive()


def test_page_schema_and_info(toy_engine):
    with client_for(toy_engine) as client:
        page = client.get("/")
        assert page.status_code == 200 and "text/html" in page.headers["content-type"]
        assert "default-src 'self'" in page.headers["content-security-policy"]
        script = client.get("/static/app.js")
        assert script.status_code == 200 and "textContent" in script.text
        assert "innerHTML" not in script.text and "insertAdjacentHTML" not in script.text
        assert client.get("/static/style.css").status_code == 200
        assert client.get("/static/../app.py").status_code == 404
        schema = client.get("/openapi.json").json()
        assert set(schema["paths"]) >= {"/api/search", "/api/images/{image_id}/captions",
                                        "/api/images/{image_id}/thumbnail", "/healthz", "/api/info"}
        assert set(schema["paths"]["/api/search"]) == {"get", "post"}
        info = client.get("/api/info").json()
        assert info["gallery_size"] == 15 and info["captions"] == 75 and info["multi_query"] == "mean"
        assert info["ranker"] == "exact" and info["images"] is False and info["limits"]["max_k"] == 100


def test_the_caption_gallery_is_encoded_once_within_the_budget_and_per_request_past_it(trained_toy, toy_engine,
                                                                                     monkeypatch):
    """Within `CAPTION_CACHE_BYTES` the caption gallery is encoded on the first request only; past it, for each
    request. The answers are the same either way."""
    import matching.tasks.matching as matching_task

    features, captions, _, ckpt, _ = trained_toy
    calls = []
    real = matching_task.encode_captions
    monkeypatch.setattr(matching_task, "encode_captions", lambda *a, **k: calls.append(1) or real(*a, **k))
    answers = {}
    for budget in (matching_task.CAPTION_CACHE_BYTES, 0):
        monkeypatch.setattr(matching_task, "CAPTION_CACHE_BYTES", budget)
        engine = SearchEngine.open(ckpt, features, captions=captions, settings=EvaluationSettings(split="test"),
                                   device="cpu")
        calls.clear()
        answers[budget] = [[(h.item, h.score) for h in engine.image_captions(image_id, 8).hits]
                           for image_id in engine.gallery[:3]]
        assert len(calls) == (1 if budget else 3), budget
    assert answers[0] == next(answer for budget, answer in answers.items() if budget)


def test_serve_command_refuses_bad_input_in_one_line(trained_toy, tmp_path):
    from click.testing import CliRunner

    from pipelines.cli import cli

    features, captions, _, ckpt, _ = trained_toy
    base = ["serve", "--checkpoint", str(ckpt), "--features", str(features)]
    for args, message in ((["--split", "test"], "--split test needs --captions"),
                          (["--captions", str(captions), "--split", "tset"], "no captions of split 'tset'"),
                          (["--device", "gpu"], "not a device")):
        result = CliRunner().invoke(cli, [*base, *args])
        assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output, result.output


def test_serve_answers_on_localhost_and_stops_cleanly_on_ctrl_c(slashed, tmp_path):
    """The real server (uvicorn decodes a path once): ids with '%' and raw '..' paths, then Ctrl-C."""
    import http.client

    import httpx

    _, images = slashed
    port = free_port()
    process = start_server(["--checkpoint", str(tmp_path / "model.pt"), "--features", str(tmp_path / "features"),
                            "--captions", str(tmp_path / "captions.jsonl"), "--images", str(images)], port)
    try:
        base = f"http://127.0.0.1:{port}"
        response = httpx.get(f"{base}/api/search", params={"q": "a red circle", "k": 2})
        assert response.status_code == 200 and len(response.json()["hits"]) == 2
        percent = quote(SLASHED[1], safe="")  # 'val2014/a b%20c.jpg'
        picture = httpx.get(f"{base}/api/images/{percent}/thumbnail")
        assert picture.status_code == 200 and picture.content[:2] == b"\xff\xd8"
        body = httpx.get(f"{base}/api/images/{percent}/captions", params={"k": 1}).json()
        assert body["image_id"] == SLASHED[1] and body["own_captions"] == ["a blue square"]
        for raw in ("/api/images/../../etc/passwd/thumbnail", "/api/images/..%2F..%2Fetc%2Fpasswd/thumbnail",
                    "/api/images/%2e%2e%2f%2e%2e%2fetc%2fpasswd/captions", "/api/images/..%2Foutside.jpg/thumbnail"):
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            connection.request("GET", raw)  # sent as written: no client-side normalisation of '..'
            answer = connection.getresponse()
            content = answer.read()
            connection.close()
            assert answer.status == 404 and b"root:" not in content, (raw, content)
    finally:
        code, out, err = stop_server(process)
    assert code == 0, err
    assert "serving http://127.0.0.1:" in out and "Traceback" not in err
