"""`python -m omniola ...` (also what `accelerate launch -m omniola train ...` runs)."""

from .cli import app

app()
