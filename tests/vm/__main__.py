import sys

from tests.vm.runner import main

sys.exit(main())
