"""The command line: the dispatcher (``cli``) and every subcommand's entry point, one module each.

Nothing outside this package imports it; the library code a command runs stays in its own package."""
