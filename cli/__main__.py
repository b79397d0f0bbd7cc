import sys

from kdcache.cli.main import main

sys.exit(main())
