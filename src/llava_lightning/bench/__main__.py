"""`python -m llava_lightning.bench`: run every benchmark (what `make bench` does)."""

from . import loader, model_step, packing, trainer_overhead

if __name__ == "__main__":
    loader.main([])
    model_step.main([])
    trainer_overhead.main([])
    packing.main([])
