import sys

from agent.daemon import main

if __name__ == "__main__":  # a worker process started by "spawn" imports this module too
    sys.exit(main())
