import sys

from segohem.cli.main import main

sys.exit(main())
