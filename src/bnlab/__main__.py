"""``python -m bnlab`` is the ``bnlab`` command (torchrun uses this form: ``-m bnlab``)."""

from bnlab.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
