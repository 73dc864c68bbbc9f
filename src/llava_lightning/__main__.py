"""`python -m llava_lightning ...`: see `cli.py`."""

from .cli import main

if __name__ == "__main__":
    main()
