from xattn_cli.cli.app import main

main()
