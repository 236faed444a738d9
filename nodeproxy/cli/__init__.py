"""Command-line interface: one module per subcommand, dispatched by main."""
