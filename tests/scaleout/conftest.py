"""The session's Prefect test server of tests/flows, for the scale-out tests that run flows."""
from tests.flows.conftest import prefect_server  # noqa: F401
