"""``python -m mergekit_aim`` (also under ``torchrun``) = the ``mergekit-aim`` CLI."""

from mergekit_aim.cli import main

if __name__ == "__main__":
    main()
