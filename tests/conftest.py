"""Shared test set-up."""

import pytest
from accelerate.state import AcceleratorState, PartialState


@pytest.fixture(autouse=True)
def fresh_accelerator_state():
    """accelerate keeps one process-wide state: a test that asks for another mixed precision (or device) than an
    earlier test's `Accelerator` would be refused. Reset it after every test, as accelerate's own test cases do."""
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    PartialState._reset_state()
