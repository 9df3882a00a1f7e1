"""`qst-serve`: the decoding engine behind an OpenAI-compatible HTTP API (FastAPI + uvicorn).

  app.py         Server: models, side loading under a root, parsing, submission
  routes.py      the FastAPI routes: JSON, SSE streams, API key, disconnects
  openai_api.py  the OpenAI request fields and response shapes
  runner.py      the engine on its own thread; callbacks to asyncio queues; drain
  metrics.py     Prometheus metrics
  page.py        the chat and side-by-side page at `/`
"""
