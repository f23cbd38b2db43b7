"""What a browser gets: the console at `/` and the API docs at /docs and /redoc, all offline."""

from app.console.router import install

__all__ = ["install"]
