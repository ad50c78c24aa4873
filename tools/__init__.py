"""Course tooling: the exercise generator and notebook runners (run with `python -m tools.<name>`)."""
