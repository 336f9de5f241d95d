"""`python -m pillsnap.serve`: the API process (see command.py)."""
import sys

from pillsnap.serve.command import main

if __name__ == "__main__":
    sys.exit(main())
