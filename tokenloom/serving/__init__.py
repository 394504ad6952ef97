"""The HTTP server face (L6): OpenAI and TGI routes, metrics and a web chat page on one engine loop.

`create_app(ServerConfig(...), llm=LLM(...))` builds the FastAPI app; `tokenloom serve` runs it with
uvicorn. Handlers never touch the Engine: they prepare requests (checks, tokens) and talk to the
engine loop (`tokenloom.engine.async_engine.AsyncEngine`) through queues.
"""

from tokenloom.serving.app import create_app
from tokenloom.serving.config import ServerConfig

__all__ = ["ServerConfig", "create_app"]
