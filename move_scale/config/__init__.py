"""Configuration as data: frozen dataclasses filled from YAML plus dotted overrides, every value
checked as it loads.

    tree.py       dicts and overrides → a tree of dataclasses; unknown keys, types, rules, relations
    rules.py      the rules a field declares beside its default (one_of, at_least, ...)
    files.py      the bundled YAMLs (top-level configs/), loading one into a stage's schema, dumping
    sections.py   the sections every stage shares: data, train, tracking
    cli_args.py   command-line value types that apply the same rules

A stage's own schema lives with the stage (stages/<stage>/config.py); the shared networks' sections
with the networks (models/sections.py).

May import: core.
"""
