"""Packaging for the Hub: pipeline folders (model index, the remote-code shims and their verification), conversion of
the authors' released checkpoints, and model cards."""
