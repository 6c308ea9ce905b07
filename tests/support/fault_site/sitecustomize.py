"""Python imports this module at start when this folder is on PYTHONPATH (tests/support/faults.py's
`subprocess_env`): it arms the faults FTKIT_TEST_FAULT names in the child process, and in every
process `ftkit train --nproc` starts from it (they inherit the environment)."""

import os

if os.environ.get("FTKIT_TEST_FAULT"):
    from tests.support.faults import install_from_env

    install_from_env()
