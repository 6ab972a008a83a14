"""``stora-gateway``, the command line: parser, commands, rendering.

* ``main.py``: the entry point, ``main(argv)``; ``parser.py``: the argparse tree;
  ``shell.py``: exit statuses, ``CliError``, ``Context`` and the command table that
  loads each command's module only when it runs (the CLI's one lazy seam).
* The commands: ``doors.py`` (``locks``, ``unlock``, ``lock``), ``technician.py``
  (``test``, ``scan``), ``status.py``, ``records.py`` (``outbox``, ``clock``),
  ``watch.py``, ``check_config.py`` (with ``check_online.py``), ``init_config.py``
  (with ``init_answers.py``, ``init_prompts.py``, ``init_options.py``), ``ports.py``,
  ``run.py``, ``completion.py``; plugins' commands: ``plugins.py``.
* Shared by them: ``site_access.py`` (config, hardware, agent), ``outcomes.py`` (one
  shape in both modes), ``interrupts.py`` (Ctrl-C in direct mode), ``render.py``.
"""
