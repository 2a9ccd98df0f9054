"""The user guide's workflow script: ``python unified_workflow.py --help``."""

from bitlm.workflow import main

if __name__ == "__main__":
    main()
