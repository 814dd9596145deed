from tests.testbed.fixtures import testbed, token_stats  # noqa: F401
