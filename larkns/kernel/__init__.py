"""Thin kernel layer: one module per kind of kernel object larkns creates."""
