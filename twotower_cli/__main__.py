"""`python -m twotower_cli` is the `twotower` command."""

from .cli import main

if __name__ == "__main__":
    main()
