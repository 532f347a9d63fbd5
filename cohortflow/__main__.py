"""``python -m cohortflow``: the same CLI as the ``cohortflow`` script."""

from cohortflow.cli.main import main

if __name__ == "__main__":
    main()
