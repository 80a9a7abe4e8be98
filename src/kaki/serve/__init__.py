"""`kaki serve`: an inference server with continuous batching.

- `client`: what the routes need of an engine (`EngineClient`: submit, abort, fit, stats, encode,
  defaults, the tokenizer for text out); `engine`: the real one, kaki.engine's scheduler behind a
  worker thread (no HTTP);
- `schemas`: request and response bodies; `app.create_app(engine)`: the FastAPI app, with the
  routes in `adept_api` (PUT /api, GET /healthz) and `openai_api` (/v1/...);
- `metrics`: what GET /metrics reports.
"""
