"""The `artdist` subcommands: each module has add_arguments(parser) and run(args) -> int, and only parses."""
