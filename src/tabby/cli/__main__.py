from tabby.cli import main

main()
