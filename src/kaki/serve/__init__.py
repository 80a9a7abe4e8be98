"""`kaki serve`: an inference server with continuous batching.

- `engine`: the model, the KV cache and the batching worker (no HTTP);
- `schemas`: request and response bodies; `app.create_app(engine)`: the FastAPI app, with the
  routes in `adept_api` (PUT /api, GET /healthz) and `openai_api` (/v1/...);
- `metrics`: what GET /metrics reports.
"""
