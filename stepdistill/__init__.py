"""stepdistill: diffusion step distillation."""
__version__ = "0.1.0"
