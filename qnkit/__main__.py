from qnkit.cli import main

main()
