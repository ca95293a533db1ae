import sys

from napari_omniseg.cli import main

sys.exit(main())
