"""Offline evaluation harnesses: run in-process on the service classes, no stack needed."""
