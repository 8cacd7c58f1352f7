"""`tshsr-pipe serve`: a search page and a JSON API over a loaded model (FastAPI + uvicorn).

- `app.py`: the routes, limits and error mapping (`create_app`, `build_app`);
- `worker.py`: the one thread that runs every model call, behind a bounded queue;
- `images.py`: image files found by gallery id only, thumbnails;
- `static/`: the page (plain HTML, CSS and JS, no build step).

The model-facing part is `matching.retrieval.search.SearchEngine`. Nothing heavy is imported here.
"""
