"""``python -m batchuq`` runs the command-line interface."""

from batchuq.cli import main

if __name__ == "__main__":
    main()
