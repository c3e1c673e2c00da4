"""Sub-commands of the ``sepconv`` command line, one module each (``add_parser(commands)`` registers it)."""
