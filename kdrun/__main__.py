"""``python -m kdrun`` is the ``kdrun`` command."""
from kdrun.cli import main

if __name__ == "__main__":
    main()
