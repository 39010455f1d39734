from cloudfilm.cli import main

main()
