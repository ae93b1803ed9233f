"""goemo's command line: `python main.py fit|validate|test|predict --help`."""

import gc

from goemo.cli import main

if __name__ == "__main__":
    main()
    # Skip the interpreter's garbage collections at exit: they walk every object torch, transformers and Lightning
    # made (~1 s; 0.2 s frozen, 2-core CPU). By now Lightning has closed the logger and the checkpoints are on disk.
    gc.freeze()
