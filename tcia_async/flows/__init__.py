"""The commands' flows. Their exit codes, shared by every command (and documented in cli.py):
0 done, 2 usage or configuration error, 3 stopped early on quota/auth/unreachable (rerun to continue),
130 interrupted (rerun to continue)."""

EXIT_OK = 0
EXIT_USAGE = 2
EXIT_STOPPED = 3
EXIT_INTERRUPTED = 130
