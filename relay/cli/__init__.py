"""``stora-relay``: the relay's command line (contract §7.1).

``main.py`` parses and dispatches; ``commands.py`` holds one function per command;
``render.py`` prints tables for people and JSON for machines.
"""
