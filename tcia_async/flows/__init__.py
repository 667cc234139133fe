"""The commands' flows. Their exit codes, shared by every command (and listed in `tcia-async --help`):

0 done: every line or item has its answer;
2 usage, configuration or path error (checked before anything is written);
3 stopped early: quota, auth, or a provider failing on everything (state kept; rerun to continue);
4 finished, but some lines or items ended in an error (the summary counts them by kind);
130 interrupted (Ctrl-C; rerun to continue).
"""

EXIT_OK = 0
EXIT_USAGE = 2
EXIT_STOPPED = 3
EXIT_SOME_FAILED = 4
EXIT_INTERRUPTED = 130
