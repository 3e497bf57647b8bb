"""``python -m kvindex_service`` runs the ``kvindex`` command line."""

from kvindex_service.cli import main

raise SystemExit(main())
