"""`python -m nodeproxy` is the CLI."""

from nodeproxy.cli.main import main

raise SystemExit(main())
