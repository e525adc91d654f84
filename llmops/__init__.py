"""Shared code for the pipeline stages: config validation, logging, atomic I/O, chat encoding."""
