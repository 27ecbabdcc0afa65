import sys

from clip_utils.app.cli import main

sys.exit(main())
