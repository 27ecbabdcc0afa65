"""`python -m clip_utils.testkit FOLDER [--informative]`: see `clip_utils.testkit`."""

from clip_utils.testkit import main

main()
