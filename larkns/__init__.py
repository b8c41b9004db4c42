"""larkns: a network namespace of its own for every HTCondor job, accounted byte by byte."""

__version__ = "0.1.0"
