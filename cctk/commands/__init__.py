"""The built-in ``cctk`` commands, one module each (``models``, ``train``, ``eval``, ``demo``,
``export``), every one with ``HELP``, ``add_arguments(parser)`` and ``run(args) -> int``: the
protocol :data:`cctk.cli.COMMAND_MODULES` registers every command by (the science layers'
commands, ``cctk.snp.cli``, ``cctk.prune.cli`` and ``cctk.experiments.study_cli``, follow it
beside their code). ``options`` holds the argument helpers they share."""
