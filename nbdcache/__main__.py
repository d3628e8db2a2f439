from nbdcache.cli import main
import sys
sys.exit(main())
