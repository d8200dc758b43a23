"""Progressive modality alignment training: recipes (YAML) and the Accelerate trainer."""

from .recipe import Recipe, Stage, load_recipe
from .trainer import plot_losses, train

__all__ = ["Recipe", "Stage", "load_recipe", "plot_losses", "train"]
