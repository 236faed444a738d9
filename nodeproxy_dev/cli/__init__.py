"""`nodeproxy` subcommands that need the development tooling (registered by
`nodeproxy.cli.main` when this package is importable)."""

SUBCOMMANDS = {
    "demo": "nodeproxy_dev.cli.demo",
    "bench": "nodeproxy_dev.cli.bench",
}
