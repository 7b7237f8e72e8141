from routelog.cli import main

main()
