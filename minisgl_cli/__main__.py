from minisgl_cli.cli.app import main

main()
