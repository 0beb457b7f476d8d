"""`python -m artdist` entry point."""
from artdist.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
