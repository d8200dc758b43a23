"""omniola's OpenAI-compatible server: `omniola serve`, or `create_app(ServerSettings(), model, processor)`."""

from .app import create_app
from .settings import ServerSettings

__all__ = ["ServerSettings", "create_app"]
