"""The web app of `tshsr-pipe serve`: the page, the JSON API, its limits and its errors.

| route | answer |
|---|---|
| `GET /` | the search page (static files under /static) |
| `GET /api/search?q=…&k=…` | text → images, with the attended regions |
| `POST /api/search` `{"queries": [...], "k": …}` | queries in rounds → images, with each image's rank per round |
| `GET /api/images/{id}/captions?k=…` | image → captions, the image's own marked |
| `GET /api/images/{id}/thumbnail` | JPEG thumbnail of a gallery image (with --images) |
| `GET /api/info` | what is served: gallery size, captions, ranker, multi-query mode, limits |
| `GET /healthz` | liveness and the queue's length |
| `GET /openapi.json` | the OpenAPI schema |

Errors are `{"detail": "one line"}`: 422 for a request outside the limits or a query the model
cannot read, 404 for an id that is not in the gallery, 503 when the model's queue is full.
Every model call runs on one worker thread (`ModelWorker`); image ids are looked up in the
gallery, never used as paths from the request (`ImageFiles`).
"""

# No `from __future__ import annotations`: FastAPI reads the route signatures' types at run time,
# and some are made inside create_app from the limits.
import asyncio
import os
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import quote

from fastapi import Body, FastAPI, Query, Request
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field, StringConstraints

from matching.config import EvaluationSettings
from matching.retrieval.search import Hit, QueryError, SearchEngine, UnknownImageError
from pipelines.serve.images import ImageFiles
from pipelines.serve.worker import ModelWorker, WorkerBusy, WorkerStopped

STATIC = Path(__file__).parent / "static"
# The page loads nothing from elsewhere; data never becomes markup (the script uses textContent).
PAGE_POLICY = ("default-src 'self'; img-src 'self'; style-src 'self'; script-src 'self'; "
               "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'")


@dataclass(frozen=True)
class Limits:
    """What one request may ask; beyond it the answer is 422 with the limit named."""

    max_query_chars: int = 300  # characters of one query
    max_queries: int = 10  # queries of one POST /api/search (rounds)
    max_k: int = 100  # results of one request
    queue_size: int = 32  # requests waiting for the model; one more gets 503


class Region(BaseModel):
    box: list[float] = Field(description="x1 y1 x2 y2 in the image's pixels")
    weight: float = Field(description="attention of the query's words on this region, averaged over the words")


class ImageResult(BaseModel):
    rank: int
    score: float
    image_id: str
    image_size: tuple[int, int] = Field(description="(height, width) the boxes refer to")
    regions: list[Region] = Field(description="the most attended regions, strongest first")
    thumbnail: str | None = Field(description="URL of the thumbnail, null without an image file")
    rank_by_round: list[int] | None = Field(None, description="POST: the rank after each round of queries")


class SearchResponse(BaseModel):
    query: str
    k: int
    ignored_words: list[str] = Field(description="query words outside the model's vocabulary")
    gallery_size: int
    ranker: str
    milliseconds: float = Field(description="time in the model, queueing excluded")
    hits: list[ImageResult]


class RoundsResponse(BaseModel):
    queries: list[str]
    k: int
    combination: str = Field(description="how the queries' scores are combined: 'mean' for a single-query model")
    ignored_words: list[list[str]]
    gallery_size: int
    ranker: str
    milliseconds: float
    hits: list[ImageResult]


class CaptionResult(BaseModel):
    rank: int
    score: float
    text: str
    ground_truth: bool = Field(description="one of the image's own captions")


class CaptionsResponse(BaseModel):
    image_id: str
    k: int
    milliseconds: float
    captions: list[CaptionResult]
    own_captions: list[str] = Field(description="the image's captions in the caption file")


class Health(BaseModel):
    status: str
    waiting: int
    queue_size: int


class Info(BaseModel):
    checkpoint: str = Field(description="the checkpoint's file name")
    gallery_size: int
    captions: int = Field(description="captions ranked by image → text (0: no caption gallery)")
    images: bool = Field(description="thumbnails are served (--images)")
    device: str
    ranker: str = Field(description="exact (every image scored) or shortlist (two-stage)")
    shortlist: int = Field(description="images re-ranked by the full model after the first-stage shortlist "
                                       "(0: every image)")
    multi_query: str = Field(description="how POST /api/search combines queries")
    limits: dict[str, int]


def _thumbnail_url(image_id: str) -> str:
    return f"/api/images/{quote(image_id, safe='')}/thumbnail"


def create_app(engine: SearchEngine, *, images_dir: str | os.PathLike | None = None,
               limits: Limits = Limits(), worker: ModelWorker | None = None) -> FastAPI:
    """The app over a loaded engine; the worker thread starts (unless `worker` is given started: the one that
    opened the engine, `open_engine`) and stops with the app's lifespan."""
    files = ImageFiles(images_dir, engine.gallery)
    worker = worker or ModelWorker(limits.queue_size)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        worker.start()
        try:
            yield
        finally:
            worker.stop()

    app = FastAPI(title="tshsr-pipe serve", version="1", lifespan=lifespan, docs_url=None, redoc_url=None,
                  description="Image–text search with a TSHSR matching model (see README 'serve').")
    app.state.engine, app.state.worker, app.state.files, app.state.limits = engine, worker, files, limits

    async def on_worker(call: Callable[..., Any], *args: Any) -> tuple[Any, float]:
        """Run a model call on the worker; (its result, milliseconds it ran)."""
        def timed() -> tuple[Any, float]:
            started = time.perf_counter()
            return call(*args), 1000 * (time.perf_counter() - started)

        return await asyncio.wrap_future(worker.submit(timed))

    def one_line(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
        return JSONResponse({"detail": message.strip().splitlines()[0] if message.strip() else "error"},
                            status_code=status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, error: RequestValidationError) -> JSONResponse:
        parts = []
        for problem in error.errors():
            where = ".".join(str(p) for p in problem.get("loc", ()) if p not in ("query", "body", "path"))
            parts.append(f"{where}: {problem.get('msg', 'invalid')}" if where else problem.get("msg", "invalid"))
        return one_line(422, "; ".join(parts) or "invalid request")

    @app.exception_handler(QueryError)
    async def unreadable(request: Request, error: QueryError) -> JSONResponse:
        return one_line(422, str(error))

    @app.exception_handler(UnknownImageError)
    async def unknown(request: Request, error: UnknownImageError) -> JSONResponse:
        return one_line(404, str(error))

    @app.exception_handler(WorkerBusy)
    async def busy(request: Request, error: WorkerBusy) -> JSONResponse:
        return one_line(503, str(error), {"Retry-After": "1"})

    @app.exception_handler(WorkerStopped)
    async def stopping(request: Request, error: WorkerStopped) -> JSONResponse:
        return one_line(503, str(error))

    def image_results(hits: list[Hit], rounds: bool) -> list[ImageResult]:
        return [ImageResult(rank=h.rank, score=h.score, image_id=h.image_id, image_size=h.image_size,
                            regions=[Region(box=box, weight=w) for box, w in h.regions or []],
                            thumbnail=_thumbnail_url(h.image_id) if files.path(h.image_id) else None,
                            rank_by_round=h.round_ranks if rounds else None) for h in hits]

    QueryText = Annotated[str, StringConstraints(min_length=1, max_length=limits.max_query_chars)]
    TopK = Annotated[int, Field(ge=1, le=limits.max_k)]

    class RoundsRequest(BaseModel):
        queries: list[QueryText] = Field(min_length=1, max_length=limits.max_queries,
                                         description="the queries, in the order of the rounds")
        k: TopK = 10

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC / "index.html", headers={"Content-Security-Policy": PAGE_POLICY,
                                                            "Cache-Control": "no-cache"})

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/healthz", response_model=Health)
    async def health() -> Health:
        return Health(status="ok", waiting=worker.waiting, queue_size=worker.queue_size)

    @app.get("/api/info", response_model=Info)
    async def info() -> Info:
        about = engine.info
        return Info(checkpoint=Path(about.checkpoint).name, gallery_size=about.gallery_size,
                    captions=about.captions, images=files.root is not None, device=about.device,
                    ranker=about.ranker, shortlist=about.shortlist, multi_query=about.multi_query,
                    limits=asdict(limits))

    @app.get("/api/search", response_model=SearchResponse)
    async def search(q: Annotated[QueryText, Query(description="the text to search for")],
                     k: Annotated[TopK, Query(description="how many images")] = 10) -> SearchResponse:
        found, ms = await on_worker(engine.search_text, q, k)
        return SearchResponse(query=q, k=k, ignored_words=found.ignored_words[0], gallery_size=len(engine.gallery),
                              ranker=engine.info.ranker, milliseconds=ms, hits=image_results(found.hits, False))

    @app.post("/api/search", response_model=RoundsResponse)
    async def search_rounds(request: Annotated[RoundsRequest, Body()]) -> RoundsResponse:
        found, ms = await on_worker(engine.search, request.queries, request.k)
        return RoundsResponse(queries=request.queries, k=request.k, combination=found.combination,
                              ignored_words=found.ignored_words, gallery_size=len(engine.gallery),
                              ranker=engine.info.ranker, milliseconds=ms, hits=image_results(found.hits, True))

    @app.get("/api/images/{image_id:path}/captions", response_model=CaptionsResponse)
    async def captions(image_id: Annotated[str, PathParam(description="a gallery image id (may hold slashes)")],
                       k: Annotated[TopK, Query(description="how many captions")] = 10) -> CaptionsResponse:
        engine.require(image_id)  # 404 before queueing
        found, ms = await on_worker(engine.image_captions, image_id, k)
        return CaptionsResponse(image_id=image_id, k=k, milliseconds=ms, own_captions=found.own_captions,
                                captions=[CaptionResult(rank=h.rank, score=h.score, text=h.item,
                                                        ground_truth=h.matches_query_image) for h in found.hits])

    @app.get("/api/images/{image_id:path}/thumbnail", response_class=Response,
             responses={200: {"content": {"image/jpeg": {}}}, 404: {"description": "no such image or file"}})
    async def thumbnail(image_id: Annotated[str, PathParam(description="a gallery image id")]) -> Response:
        engine.require(image_id)
        if files.root is None:
            return one_line(404, "no image files: start the server with --images DIR")
        data = await asyncio.get_running_loop().run_in_executor(None, files.thumbnail, image_id)
        if data is None:
            return one_line(404, f"no readable image file for {image_id!r} under --images")
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "max-age=3600"})

    return app


def build_app(checkpoint_path: str | os.PathLike, features: str | os.PathLike, *,
              captions: str | os.PathLike | None = None, images_dir: str | os.PathLike | None = None,
              index_path: str | os.PathLike | None = None, device: str = "auto", limits: Limits = Limits(),
              settings: EvaluationSettings | None = None) -> FastAPI:
    """Load the model and the gallery once (`SearchEngine.open`, `settings`: the split of `captions`, the
    shortlist), on the thread that will answer the searches (`open_engine`), and make the app over them."""
    worker = ModelWorker(limits.queue_size)
    engine = open_engine(worker, checkpoint_path, features, captions=captions, index_path=index_path,
                         device=device, settings=settings or EvaluationSettings(split=None))
    return create_app(engine, images_dir=images_dir, limits=limits, worker=worker)


def open_engine(worker: ModelWorker, *args: Any, **options: Any) -> SearchEngine:
    """`SearchEngine.open(*args, **options)` run on `worker`'s thread (started here), which then runs every search.

    On a CPU, torch's parallel operations run 15–20% slower in a thread when another thread of the process
    has run them before (measured on 2 cores: a search of 5,000 images took 68 ms on the thread that opened
    the engine, 85 ms on another one; docs/search.md, "serve"), so the loading and the searches share one.
    The worker is stopped again when the opening fails.
    """
    worker.start()
    try:
        return worker.call(SearchEngine.open, *args, **options)
    except BaseException:
        worker.stop()
        raise
