"""``python -m gateway.cli``: the ``stora-gateway`` command."""

from gateway.cli.main import main

raise SystemExit(main())
