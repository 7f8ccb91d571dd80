"""``python -m streamrec``: the command line (``torchrun -m streamrec train ...`` needs it)."""

from streamrec.cli import main

if __name__ == "__main__":
    main()
