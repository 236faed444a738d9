"""``python -m nodeproxy.cni``: run the plugin (also the entry point of the packed executable)."""

import sys

from nodeproxy.cni.plugin import main

sys.exit(main())
