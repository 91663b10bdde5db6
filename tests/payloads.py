"""A tampered pickle for the tests that check no checkpoint or model pickle is ever loaded."""

from pathlib import Path


class Payload:
    """Unpickling it creates the file `marker`: what a tampered pickle could do instead."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")
