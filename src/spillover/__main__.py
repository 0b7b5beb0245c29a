"""``python -m spillover`` (also what ``accelerate launch -m spillover`` runs)."""

from .cli import main

main()
