"""`python -m llava_lightning.bench`: run every benchmark (what `make bench` does)."""

from . import model_step

if __name__ == "__main__":
    model_step.main()
