"""The test suite, a package mirroring the source tree (tests/pipeline, tests/stages/<subpackage>,
tests/store_schema): its modules import as tests.stages.collect.test_x, so that the folders named like
the packages never shadow them. Shared helpers are in tests/helpers, shared fixtures in conftest.py."""
