"""goemo's command line: `python main.py fit|validate|test|predict --help`."""

from goemo.cli import main

if __name__ == "__main__":
    main()
