"""Every routing test starts and ends with empty telemetry (routes are counted there)."""
import pytest

from nsa_ref import telemetry


@pytest.fixture(autouse=True)
def _clean_telemetry():
    telemetry.reset()
    yield
    telemetry.reset()
