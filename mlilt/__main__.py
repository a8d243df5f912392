"""``python -m mlilt``: the same as the ``mlilt`` command (and what ``torchrun -m mlilt`` starts)."""
from mlilt.cli import main

if __name__ == "__main__":
    main()
