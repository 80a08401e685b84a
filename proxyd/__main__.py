from proxyd.cli import main

main()
