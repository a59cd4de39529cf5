import sys

from bigkernels.cli import main

sys.exit(main())
