from trainer.optim.ngd import NGD

__all__ = ["NGD"]
