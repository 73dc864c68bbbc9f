"""`python -m llava_lightning.data.synthetic --out data/shapes --seed 0`: generate the synthetic shapes data."""

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
